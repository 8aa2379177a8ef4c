"""The switchboard runs any plan of zero-paddable rewrites in one session: its outputs must equal
those of the model apply_plan exports, and the correction refitted on it must equal the one refitted
on exported, truncated models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import init, make_model, relative_difference, tensor
from onnx import helper
from tnopt.passes import METHODS, Refusal

from tnopt.analyze import analyze
from tnopt.correct import Corrector
from tnopt.io import load_model
from tnopt.pipeline import factorize
from tnopt.plan import Choice
from tnopt.runner import PlanRunner, apply_plan
from tnopt.runtime import Runtime
from tnopt.switchboard import Switchboard

MODELS = Path(__file__).resolve().parents[1] / "models"
RUNTIME = Runtime("cpu")


def widest_choices(layers, methods):
    widest = []
    for layer in layers:
        for method in methods:
            m = METHODS[method]
            if layer.op not in m.op_types or m.check(layer) is not None or not m.candidate_ranks(layer):
                continue
            rank = max(m.candidate_ranks(layer), key=lambda r: m.cost(layer, r).params)
            factors = factorize(layer, method, rank)
            if not isinstance(factors, Refusal):  # a degenerate CP fit is never emitted
                widest.append(Choice(layer, method, factors))
    return widest


def lower(choice, index=1):
    """`choice` at its index-th candidate rank, or at the next one above where that fit is refused."""
    ranks = METHODS[choice.method].candidate_ranks(choice.layer)
    for rank in ranks[index:]:
        factors = factorize(choice.layer, choice.method, rank)
        if not isinstance(factors, Refusal):
            return Choice(choice.layer, choice.method, factors)
    return choice


def assert_same_outputs(model, board, choices, feeds):
    expected = RUNTIME.run(apply_plan(model, choices)[0], feeds)
    got = board.run(choices, feeds)
    assert got is not None
    for e, g in zip(expected, got):
        assert relative_difference(e, g) < 1e-5


@pytest.fixture(scope="module")
def cnn4():
    model = load_model(str(MODELS / "cnn4.onnx"))
    with np.load(MODELS / "calib.npz") as data:
        feeds = {"input": data["input"][:48]}
    return model, [layer for layer in analyze(model) if layer.candidate], feeds


def test_each_method_at_a_lower_rank_matches_the_exported_model(cnn4):
    model, layers, feeds = cnn4
    widest = widest_choices(layers, ["tucker2", "cp", "cut-o", "cut-i", "cut-spatial", "svd"])
    assert {c.method for c in widest} == {"tucker2", "cp", "cut-o", "cut-i", "cut-spatial", "svd"}
    board = Switchboard(model, widest, RUNTIME)
    reference = RUNTIME.run(model, feeds)
    assert np.array_equal(board.run([], feeds)[0], reference[0])  # every gate on the dense node
    for choice in widest:
        assert_same_outputs(model, board, [lower(choice)], feeds)
    # Several layers at once, each with another method.
    plan = {}
    for choice in widest:
        plan.setdefault(choice.layer.name, lower(choice, 0))
    assert_same_outputs(model, board, list(plan.values()), feeds)


def test_a_factor_wider_than_the_board_is_refused(cnn4):
    model, layers, feeds = cnn4
    layer = layers[1]
    ranks = METHODS["tucker2"].candidate_ranks(layer)
    board = Switchboard(model, [Choice(layer, "tucker2", factorize(layer, "tucker2", ranks[0]))], RUNTIME)
    wider = Choice(layer, "tucker2", factorize(layer, "tucker2", ranks[-1]))
    assert board.run([wider], feeds) is None
    assert board.run([Choice(layers[2], "tucker2", factorize(layers[2], "tucker2", ranks[0]))], feeds) is None


def gemm_model():
    """Gemm with beta ≠ 1 and C of shape (1, N), then a MatMul whose weight is on the left."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="gemm", beta=0.5, alpha=2.0, transB=1),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["L", "ht"], ["y"], name="left"),
    ]
    initializers = [
        init("W", rng.standard_normal((24, 32))),
        init("C", rng.standard_normal((1, 24))),
        init("L", rng.standard_normal((20, 24))),
    ]
    return make_model(nodes, [tensor("x", ["n", 32])], [tensor("y", 2)], initializers)


def test_gemm_bias_and_left_matmul_including_a_refitted_bias():
    model = gemm_model()
    layers = [layer for layer in analyze(model) if layer.candidate]
    widest = widest_choices(layers, ["svd"])
    board = Switchboard(model, widest, RUNTIME)
    feeds = {"x": np.random.default_rng(4).standard_normal((40, 32)).astype(np.float32)}
    plan = [lower(c, 2) for c in widest]
    assert_same_outputs(model, board, plan, feeds)
    # A refit replaces the Gemm's bias (and beta·C): the board feeds it into the path's own bias.
    gemm = plan[0]
    arrays = dict(gemm.factors.arrays, bias=np.linspace(-1, 1, 24).astype(np.float32))
    refitted = Choice(gemm.layer, "svd", type(gemm.factors)(arrays, gemm.factors.rank, 0.0, {}))
    assert_same_outputs(model, board, [refitted, plan[1]], feeds)


def test_correction_on_the_board_equals_the_correction_on_cut_models():
    """ResNet: residual branches make some layers independent of others, so the board refits them
    in waves; the factors must be those of the one-layer-at-a-time reference."""
    model = load_model(str(MODELS / "resnet.onnx"))
    layers = [layer for layer in analyze(model) if layer.candidate]
    with np.load(MODELS / "calib.npz") as data:
        inputs = {"input": data["input"][:96]}
    plan = [lower(c, 2) for c in widest_choices(layers, ["tucker2"])[:9]]
    exported = PlanRunner(model, RUNTIME)
    reference = Corrector(exported, layers, inputs, max_waves=None)(plan)
    assert exported.board is None and exported.runs == {"switchboard": 0, "exported": 0}
    runner = PlanRunner(model, RUNTIME)
    runner.board = Switchboard(model, plan, RUNTIME, Corrector.hidden_tensors(plan))
    calls = []
    iter_capture = runner.board.iter_capture
    runner.board.iter_capture = lambda *a: calls.append(a[1]) or iter_capture(*a)
    on_board = Corrector(runner, layers, inputs, max_waves=None)(plan)  # sequential, as cut one by one
    assert len(calls) < len(plan)  # independent layers were refitted from a shared run
    for a, b in zip(reference, on_board):
        assert a.layer.name == b.layer.name and b.factors.notes.get("corrected")
        for key in a.factors.arrays:
            assert relative_difference(a.factors.arrays[key], b.factors.arrays[key]) < 1e-4, key
