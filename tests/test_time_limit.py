"""--time-limit: validated like every option; the search stops when time is up, keeps the best plan it
verified so far and says so; no plan verified within the budget is exit 3, as for a missed budget."""

import json
from types import SimpleNamespace

import pytest
from conftest import MODELS
from contract import mlp, run_case
from tnopt.passes import METHODS

import tnopt
from tnopt import pipeline, runner, verify
from tnopt import search as search_module
from tnopt.analyze import analyze
from tnopt.sweep import widest_paths


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("0", "--time-limit must be more than 0 seconds"),
        ("-3", "--time-limit must be more than 0 seconds"),
        ("nan", "--time-limit must be a number of seconds"),
        ("inf", "--time-limit must be a number of seconds"),
        ("soon", "--time-limit"),
    ],
)
def test_bad_time_limits_are_one_line_errors(tmp_path, model_path, labelled, value, fragment):
    run_case(
        tmp_path,
        model_path,
        "--budget",
        "1%",
        "--data",
        labelled,
        "--time-limit",
        value,
        expect=2,
        fragment=fragment,
    )


def test_time_limit_needs_a_budget(tmp_path, model_path, labelled):
    run_case(
        tmp_path, model_path, "--data", labelled, "--time-limit", "60", expect=2, fragment="give --budget"
    )


def test_time_up_before_any_verification_is_a_missed_budget(tmp_path, small_splits, monkeypatch):
    """The limit runs out before the sweep measured anything: nothing was verified, so the original
    layers are saved, the reason says why, and the exit code is the missed budget's. The statistics
    pass ran to its end whatever the limit (ResNet-50: minutes past 120 s): it stops after the batch
    in which the limit ran out, saves no partial moments to the cache, and no board is built."""
    calib, evaluation = small_splits
    monkeypatch.setattr(pipeline, "batch_size_for", lambda sample_bytes: 32)  # 256 samples: 8 batches
    prepared = []
    monkeypatch.setattr(runner.PlanRunner, "prepare", lambda self, *a, **k: prepared.append(a))
    report_path, cache = tmp_path / "r.json", tmp_path / "cache"
    result = run_case(
        tmp_path,
        MODELS / "cnn4.onnx",
        "--budget",
        "1%",
        "--data",
        calib,
        "--eval-data",
        evaluation,
        "--time-limit",
        "0.001",
        "--cache",
        cache,
        "--report",
        report_path,
        expect=3,
    )
    assert "the time limit of 0.001 s ran out in the statistics stage" in result.stderr
    assert "budget not met" in result.stderr
    report = json.loads(report_path.read_text())
    limit = report["search"]["time_limit"]
    assert limit == {"limit_s": 0.001, "reached": True, "stopped_in": "statistics"}
    assert report["timings"]["stats_stopped_at_samples"] == 32
    assert report["search"]["verifications"] == 0 and report["search"]["sweep_measurements"] == 0
    assert {layer["reason"] for layer in report["layers"]} == {
        "not measured: --time-limit ran out before the sweep reached it; kept dense"
    }
    assert report["budget_met"] is False
    assert not list(cache.glob("*-stats3.npz")) and prepared == []


def test_time_up_during_verification_keeps_the_best_verified_plan(tmp_path, small_splits, monkeypatch):
    """The clock runs out after the third verified plan (simulated: wall time is not a test input):
    the search stops there, keeps the best plan that passed among those three, and says so."""
    calib, evaluation = small_splits
    calls = {"n": 0}
    evaluate = verify._Verifier.evaluate

    def counted(self, allocation):
        calls["n"] += 1
        return evaluate(self, allocation)

    monkeypatch.setattr(verify._Verifier, "evaluate", counted)
    monkeypatch.setattr(search_module.SearchContext, "out_of_time", lambda self: calls["n"] >= 3)
    said = []
    common = dict(
        budget="2%", data=str(calib), eval_data=str(evaluation), provider="cpu", latency_guard=False
    )
    cache = str(tmp_path / "cache")
    _, limited = tnopt.compress(
        str(MODELS / "cnn4.onnx"), cache_dir=cache, log=said.append, time_limit=60, **common
    )
    assert limited.search["time_limit"] == {"limit_s": 60, "reached": True, "stopped_in": "verify"}
    assert limited.search["verifications"] == 3 == len(limited.search["curve"])
    passed = [point for point in limited.search["curve"] if point["passed"]]
    best = max(passed, key=lambda point: point["saving"])
    assert best["layers"] > 0, "cnn4 at 2% passes with some layer rewritten within three τ points"
    assert len(limited.rewritten) == best["layers"]
    assert limited.budget_met is True
    assert any("time limit of 60 s reached in the verify stage" in line for line in said)
    # Without the limit the search verifies more plans and saves at least as much.
    monkeypatch.setattr(search_module.SearchContext, "out_of_time", lambda self: False)
    _, full = tnopt.compress(str(MODELS / "cnn4.onnx"), cache_dir=cache, **common)
    assert full.search["verifications"] > 3 and full.search["time_limit"]["reached"] is False
    assert full.after.flops <= limited.after.flops


def test_time_up_stops_the_widest_rank_fits_at_a_layer_boundary():
    """The board's widest-rank fits (CP-ALS of every conv) ran to the end after the limit."""
    layers = [layer for layer in analyze(mlp()) if layer.candidate]
    fitted = []

    def estimate_for(layer, method, rank):
        fitted.append(layer.name)
        return METHODS[method].decompose(layer, rank)

    ctx = SimpleNamespace(methods=METHODS, estimate_for=estimate_for, out_of_time=lambda: bool(fitted))
    widest = widest_paths(ctx, layers, {layer.name: ["svd"] for layer in layers})
    assert len(layers) == 2 and fitted == [layers[0].name] and [c.layer.name for c in widest] == fitted
