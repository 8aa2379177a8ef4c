"""The budgeted search: budgets are honoured, monotone, cached, and a miss still saves a model."""

import json

import pytest
from conftest import MODELS

import tnopt

MODEL = MODELS / "lenet5.onnx"


def search(budget, splits, cache, **kwargs):
    calib, evaluation = splits
    return tnopt.compress(
        str(MODEL),
        budget=budget,
        data=str(calib),
        eval_data=str(evaluation),
        cache_dir=None if cache is None else str(cache),
        provider="cpu",
        **kwargs,
    )


def test_zero_budget_keeps_the_evaluation_metric(small_splits, tmp_path):
    _, report = search(0.0, small_splits, tmp_path / "cache")
    assert report.budget["metric"] == "top1"
    assert report.metrics["top1"] == report.metrics["top1_original"]
    assert report.budget_met


def test_larger_budget_never_compresses_less(small_splits, tmp_path):
    flops = []
    for budget in (0.005, 0.01, 0.02, 0.05):
        _, report = search(budget, small_splits, tmp_path / "cache")
        flops.append(report.after.flops)
        calibration_drop = report.budget["drop_calibration"]
        assert calibration_drop + report.budget["margin_calibration"] <= budget + 1e-12
    assert all(b <= a for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] < flops[0] or flops[0] < report.before.flops  # the search compresses something


def test_second_run_with_another_budget_reuses_the_sweep(small_splits, tmp_path):
    cache = tmp_path / "cache"
    _, first = search(0.01, small_splits, cache)
    assert first.search["sweep_cache_hits"] == 0
    assert first.search["sweep_measurements"] > 0
    _, second = search(0.02, small_splits, cache)
    assert (
        second.search["sweep_cache_hits"]
        == second.search["sweep_measurements"]
        == first.search["sweep_measurements"]
    )


def test_no_cache_measures_again(small_splits, tmp_path):
    _, report = search(0.01, small_splits, None)
    assert report.search["sweep_cache_hits"] == 0 and report.search["cache_file"] is None


def test_plans_run_on_the_switchboard_where_it_is_faster(small_splits, tmp_path, monkeypatch):
    """Where the board is timed faster, every Tucker-2/SVD plan runs on its one session; where it is
    slower (LeNet-5 here: exporting a tiny model is cheap) none does; MPO never pads."""
    from tnopt import runner

    _, report = search(0.02, small_splits, None, methods="tucker2,svd")
    timed = report.timings
    runs = report.search["plan_runs"]
    # The runner's rule (timed on a few samples, the export's fixed cost spread over the prepared
    # count): the board for every plan, none, or only runs on fewer samples than the break-even.
    wins_below, prepared = timed["plan_run_board_wins_below_samples"], timed["plan_run_prepared_samples"]
    if wins_below > prepared:
        assert runs["switchboard"] > 0
    elif wins_below <= 1:
        assert runs["switchboard"] == 0
    else:
        assert runs["exported"] > 0  # plans on all samples are exported
    board_faster = {"switchboard": 0.0, "exported": 1.0}
    monkeypatch.setattr(runner, "time_plan_runs", lambda *args: board_faster)
    _, report = search(0.02, small_splits, None, methods="tucker2,svd")
    # Every sensitivity one run, every verified plan one run per cross-fitted fold (the empty plan
    # none: its outputs are the reference), no export.
    from tnopt.refine import CROSS_FIT_FOLDS

    empty = int(any(point["layers"] == 0 for point in report.search["curve"]))
    verified = report.search["verifications"]
    assert report.search["plan_runs"] == {
        "switchboard": report.search["sweep_measurements"] + CROSS_FIT_FOLDS * (verified - empty),
        "exported": 0,
    }
    _, report = search(0.02, small_splits, None, methods="mpo")
    assert report.search["plan_runs"]["switchboard"] == 0 and report.search["plan_runs"]["exported"] > 0


def test_cli_budget_prints_cache_use_and_writes_plot(small_splits, tmp_path):
    # The miss path (exit 3) is tests/test_contract_interruption.py's, on a held-out set built to miss.
    from helpers import cli

    calib, evaluation = small_splits
    common = [MODEL, "--data", calib, "--eval-data", evaluation, "--cache", tmp_path / "c"]
    runs = []
    for budget, name in (("1%", "a"), ("2%", "b")):
        report = tmp_path / f"{name}.json"
        extra = ["--plot", tmp_path / "s.png"] if name == "b" else []
        result = cli(*common, "-o", tmp_path / f"{name}.onnx", "--budget", budget, "--report", report, *extra)
        met = json.loads(report.read_text())["budget_met"]
        # Exit 0 exactly when the held-out check met the budget, else 3 with the reason; a model either way.
        assert result.returncode == (0 if met else 3), result.stderr
        assert ("budget not met" in result.stderr) is (not met)
        assert (tmp_path / f"{name}.onnx").exists()
        runs.append(result)
    second = runs[1]
    assert "from cache" in second.stderr
    import re

    measured, cached = map(
        int, re.search(r"sensitivity: (\d+) measurements, (\d+) from cache", second.stderr).groups()
    )
    assert measured == cached > 0
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_metric_needs_labels(tmp_path):
    import numpy as np

    with np.load(MODELS / "calib.npz") as archive:
        np.savez(tmp_path / "nolabels.npz", input=archive["input"][:32])
    with pytest.raises(tnopt.errors.DataError, match="needs labels"):
        tnopt.compress(
            str(MODEL),
            budget=0.01,
            data=str(tmp_path / "nolabels.npz"),
            metric="top1",
            provider="cpu",
            cache_dir=None,
        )


def test_default_metric_without_labels_agreement_for_classifier_fidelity_for_embedding():
    import numpy as np
    from helpers import init, make_model, planted_matrix, tensor
    from onnx import helper

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 32)).astype(np.float32)}
    classifier = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 10])],
        [init("w", planted_matrix(32, 10, 10))],
    )
    embedding = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
            helper.make_node("Div", ["h", "scale"], ["y"]),
        ],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 24])],
        [init("w", planted_matrix(32, 24, 24)), init("scale", [2.0])],
    )
    for model, expected in ((classifier, "agreement"), (embedding, "fidelity")):
        _, report = tnopt.compress(
            model, budget=0.05, data=data, provider="cpu", cache_dir=None, latency_guard=False
        )
        assert report.budget["metric"] == expected


def test_search_times_and_rewrites_a_convtranspose():
    import numpy as np
    from helpers import init, make_model, planted_tucker, tensor
    from onnx import helper

    weight = planted_tucker(32, 32, (3, 3), (8, 8), seed=3)
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", strides=[2, 2])],
        [tensor("x", ["N", 32, 8, 8])],
        [tensor("y", 4)],
        [init("w", weight), init("b", np.zeros(32))],
    )
    data = {"x": np.random.default_rng(0).standard_normal((64, 32, 8, 8)).astype(np.float32)}
    _, report = tnopt.compress(model, budget=0.001, data=data, provider="cpu", cache_dir=None)
    assert report.budget["metric"] == "fidelity"
    (entry,) = report.layers
    assert entry.latency_before_ms is not None and entry.latency_before_ms > 0
    assert entry.decision in ("rewritten", "kept") and entry.reason


def test_the_search_runs_numpy_on_one_blas_thread(monkeypatch):
    """Beside onnxruntime's worker threads a multi-threaded BLAS fights it for the cores (measured
    10-50x slower solves on 2 busy cores): the whole search, correction included, runs on one."""
    import numpy as np
    from helpers import init, make_model, planted_matrix, tensor
    from onnx import helper
    from threadpoolctl import threadpool_info

    from tnopt import search

    seen = []
    run = search.Search.run

    def recorded(self):
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return run(self)

    monkeypatch.setattr(search.Search, "run", recorded)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 24])],
        [init("w", planted_matrix(32, 24, 24))],
    )
    data = {"x": np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)}
    tnopt.compress(model, budget=0.05, data=data, provider="cpu", cache_dir=None, latency_guard=False)
    assert seen and set(seen) == {1}, seen
