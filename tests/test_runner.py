"""The plan runner: per-batch outputs and captures, board-vs-export, factor swaps without re-export,
the run configuration (no global method state) and tnopt's own failures kept apart from the user's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import init, make_model, relative_difference, tensor
from onnx import helper
from tnopt.passes import METHODS, Factors

import tnopt
from tnopt import runner as runner_module
from tnopt.analyze import analyze
from tnopt.config import RunConfig
from tnopt.errors import InternalError, TnoptError
from tnopt.pipeline import factorize
from tnopt.plan import Choice, Plan
from tnopt.runner import PlanRunner
from tnopt.runtime import Runtime

MODELS = Path(__file__).resolve().parents[1] / "models"
RUNTIME = Runtime("cpu", batch_size=16)


def mlp():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [
        init("W1", rng.standard_normal((32, 24))),
        init("b1", rng.standard_normal(32)),
        init("W2", rng.standard_normal((10, 32))),
        init("b2", rng.standard_normal(10)),
    ]
    model = make_model(nodes, [tensor("x", ["n", 24])], [tensor("y", ["n", 10])], inits)
    layers = [layer for layer in analyze(model) if layer.candidate]
    feeds = {"x": rng.standard_normal((40, 24)).astype(np.float32)}
    return model, layers, feeds


def svd_choice(layer, rank):
    return Choice(layer, "svd", factorize(layer, "svd", rank))


def test_outputs_and_capture_come_one_batch_at_a_time():
    model, layers, feeds = mlp()
    runner = PlanRunner(model, RUNTIME)
    plan = Plan((svd_choice(layers[0], 4),))
    batches = list(runner.outputs(plan, feeds))
    assert [rows for rows, _ in batches] == [slice(0, 16), slice(16, 32), slice(32, 40)]
    whole = RUNTIME.run(runner.export(plan), feeds)[0]
    assert np.array_equal(np.concatenate([out[0] for _, out in batches]), whole)
    # A stream of batches (any sizes) gives the same rows.
    stream = [{"x": feeds["x"][:10]}, {"x": feeds["x"][10:]}]
    assert np.array_equal(runner.run(plan, stream)[0], whole)
    hidden = "fc1/svd/factor_a_out"
    captured = list(runner.capture(plan, [hidden], feeds))
    assert len(captured) == 3 and captured[0][1][hidden].shape == (16, 4)


def _lifted_mlp(monkeypatch, hidden=()):
    """An MLP's two-layer SVD plan lifted (cut after `hidden` when given), a copy of it with other
    factor values, and the list every later export is recorded in."""
    model, layers, feeds = mlp()
    runner = PlanRunner(model, RUNTIME)
    first = Plan((svd_choice(layers[0], 4), svd_choice(layers[1], 3)))
    runner.lift(first, hidden)
    exports = []
    splice = runner_module.splice_plan
    monkeypatch.setattr(runner_module, "splice_plan", lambda *a: exports.append(a) or splice(*a))
    scaled = first.replaced(
        first.choices[0].with_factors(
            Factors({k: v * 0.5 for k, v in first.choices[0].factors.arrays.items()}, 4, 0.0)
        )
    )
    return model, layers, feeds, runner, first, scaled, exports, splice


def test_a_lifted_plan_runs_new_factor_values_without_a_new_export(monkeypatch):
    model, layers, feeds, runner, first, scaled, exports, splice = _lifted_mlp(monkeypatch)
    for plan in (first, scaled):
        got = runner.run(plan, feeds)[0]
        assert not exports  # fed to the lifted session
        expected = RUNTIME.run(splice(model, plan, METHODS), feeds)[0]
        assert relative_difference(expected, got) < 1e-5
    assert not np.allclose(runner.run(first, feeds)[0], runner.run(scaled, feeds)[0])
    # Another structure is exported as usual.
    runner.run([svd_choice(layers[0], 2)], feeds)
    assert len(exports) == 1


def test_run_configuration_is_frozen_and_keeps_the_registry_unchanged():
    config = RunConfig(mpo_cores=2, methods="mpo,svd")
    assert config.method_table["mpo"].cores == 2 and config.method_table["mpo-storage"].cores == 2
    assert METHODS["mpo"].cores == 3 and METHODS["mpo-storage"].cores == 3
    assert config.method_names == ("mpo", "svd")
    with pytest.raises(AttributeError):
        config.budget = 0.01
    with pytest.raises(TnoptError, match="not a regular expression"):
        RunConfig(exclude="(")
    with pytest.raises(TnoptError, match="unknown method"):
        RunConfig(methods="tucker3")


def test_compress_takes_a_config_or_the_same_keywords():
    model, _, feeds = mlp()
    by_config, report_a = tnopt.compress(model, RunConfig(rank_ratio=0.25, data=feeds, provider="cpu"))
    by_keywords, report_b = tnopt.compress(model, rank_ratio=0.25, data=feeds, provider="cpu")
    assert by_config.SerializeToString() == by_keywords.SerializeToString()
    assert [(lay.name, lay.method, lay.rank) for lay in report_a.rewritten] == [
        (lay.name, lay.method, lay.rank) for lay in report_b.rewritten
    ]
    with pytest.raises(TypeError):
        tnopt.compress(model, RunConfig(), rank_ratio=0.5)


def test_mpo_cores_reach_the_factors_of_one_run_only():
    model, _, feeds = mlp()

    def cores(compressed):
        return sum(1 for t in compressed.graph.initializer if t.name.startswith("fc1/mpo/G"))

    options = dict(methods="mpo", rank_ratio=1.0, allow_growth=True, data=feeds, provider="cpu")
    two, _ = tnopt.compress(model, mpo_cores=2, **options)
    default, _ = tnopt.compress(model, **options)
    assert cores(two) == 2 and cores(default) == 3 and METHODS["mpo"].cores == 3


def test_own_graph_failures_are_internal_errors_and_user_model_failures_are_not():
    broken = make_model(
        [helper.make_node("Gemm", ["x", "W"], ["y"], name="g")],
        [tensor("x", ["n", 3])],
        [tensor("y", ["n", 2])],
        [init("W", np.ones((5, 4)))],  # does not fit x: onnxruntime refuses to run it
    )
    feeds = {"x": np.ones((2, 3), np.float32)}
    with pytest.raises(TnoptError):
        RUNTIME.run(RUNTIME.session(broken), feeds)
    with pytest.raises(InternalError):
        RUNTIME.run(RUNTIME.session(broken, own=True), feeds)
    assert not issubclass(InternalError, TnoptError)


def test_a_lifted_capture_reads_new_factor_values_without_a_new_export(monkeypatch):
    hidden = ["fc1/svd/factor_a_out"]
    model, _, feeds, runner, first, scaled, exports, splice = _lifted_mlp(monkeypatch, hidden)
    for plan in (first, scaled):
        got = np.concatenate([values[hidden[0]] for _, values in runner.capture(plan, hidden, feeds)])
        assert not exports  # captured on the lifted session
        expected = RUNTIME.run(runner_module.truncate(splice(model, plan, METHODS), hidden), feeds)[0]
        assert relative_difference(expected, got) < 1e-5
    # The lifted capture is not the lifted run (other outputs): a run of the plan is exported.
    runner.run(scaled, feeds)
    assert len(exports) == 1
    # Another factor layout (a refitted intercept) is another graph: exported as usual.
    arrays = dict(first.choices[1].factors.arrays, bias=np.zeros(10, np.float32))
    with_bias = first.replaced(first.choices[1].with_factors(Factors(arrays, 3, 0.0)))
    list(runner.capture(with_bias, hidden, feeds))
    assert len(exports) == 2


def test_lifted_sessions_are_bounded():
    model, layers, feeds = mlp()
    runner = PlanRunner(model, RUNTIME)
    for rank in (2, 3, 4, 5):
        runner.lift(Plan((svd_choice(layers[0], rank),)))
    assert len(runner._lifted) == runner_module.MAX_LIFTED_SESSIONS


def test_a_board_slower_at_the_prepared_count_runs_plans_on_few_samples(monkeypatch):
    """The board costs more per sample, an export a fixed graph export and session: a board timed
    slower on the prepared samples still runs plans on few samples (a sweep's subsample), and the
    outputs are the exported plan's."""
    model, layers, feeds = mlp()
    widest = [svd_choice(layers[0], 8)]
    timings = {"switchboard": 4.0, "exported": 3.0, "export_fixed": 2.0}  # on 40 samples
    timed = []
    monkeypatch.setattr(runner_module, "TIMING_SAMPLES", 40)
    monkeypatch.setattr(
        runner_module, "time_plan_runs", lambda *a: timed.append(len(a[3]["x"])) or dict(timings)
    )
    assert runner_module.board_wins_below(timings, 40) == pytest.approx(2 / (0.1 - 0.025))
    runner = PlanRunner(model, RUNTIME)
    runner.prepare(widest, feeds)
    assert runner.board is None and runner.few_board is not None
    plan = Plan((svd_choice(layers[0], 4),))
    few = {"x": feeds["x"][:8]}
    got = runner.run(plan, few)[0]
    assert runner.runs == {"switchboard": 1, "exported": 0}
    assert relative_difference(RUNTIME.run(runner.export(plan), few)[0], got) < 1e-5
    timings["export_fixed"] = 0.1  # now the board wins below ~4 samples only: 8 are exported
    runner.prepare(widest, feeds)
    runner.run(plan, few)
    assert runner.few_samples == pytest.approx(0.1 / (0.1 - 2.9 / 40))
    assert runner.runs["exported"] == 1
    assert runner_module.board_wins_below({"switchboard": 1.0, "exported": 3.0, "export_fixed": 0.5}, 10) == (
        float("inf")
    )
    # Timed on 10 of the 40 samples, extrapolated: per sample 0.4 on the board, 0.1 + 2 fixed
    # exported, so the board wins below ~6.7 samples; at 40 it is not the prepared board.
    monkeypatch.setattr(runner_module, "TIMING_SAMPLES", 10)
    timings.update(switchboard=4.0, exported=3.0, export_fixed=2.0)
    runner.prepare(widest, feeds)
    assert timed[-1] == 10 and runner.board is None and runner.few_samples == pytest.approx(2 / 0.3)
    timings.update(switchboard=0.5)  # 0.05 per sample: wins at any count
    runner.prepare(widest, feeds)
    assert runner.board is not None and runner.few_board is None


def test_a_board_kept_for_few_samples_holds_no_session_until_it_runs(monkeypatch):
    """The few-sample board is timed (its session opened) and then released: idle through the search
    it would hold the model's weights, kernels and arena (ResNet-50: ~0.7 GB, never run). A run on
    few samples reopens it and gives the exported plan's outputs."""
    model, layers, feeds = mlp()
    monkeypatch.setattr(runner_module, "board_wins_below", lambda timings, samples: 12.0)
    runner = PlanRunner(model, RUNTIME)
    runner.prepare([svd_choice(layers[0], 8)], feeds)
    assert runner.board is None and runner.few_board is not None
    assert runner.few_board._session is None
    plan, few = Plan((svd_choice(layers[0], 4),)), {"x": feeds["x"][:8]}
    got = runner.run(plan, few)[0]
    assert runner.runs["switchboard"] == 1 and runner.few_board._session is not None
    assert relative_difference(RUNTIME.run(runner.export(plan), few)[0], got) < 1e-5
