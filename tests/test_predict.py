"""The predicted sensitivities: local errors in closed form equal the layer's measured output error,
and the search with them spends less ORT work than the measured sweep and still meets the budget."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from helpers import init, make_model, run, tensor
from onnx import helper
from tnopt.passes import METHODS

import tnopt
from tnopt.analyze import analyze
from tnopt.local_error import dense_weight, local_error, reconstructed_weight
from tnopt.plan import Choice
from tnopt.predict import subsample_indices
from tnopt.profile import collect_stats
from tnopt.runner import PlanRunner
from tnopt.runtime import Runtime

MODELS = Path(__file__).resolve().parents[1] / "models"


def _measured_local_error(model, layer, method, factors, feeds) -> float:
    """‖y_rewritten − y‖² / ‖y‖² of the single-layer model (no bias) in onnxruntime."""
    compressed = PlanRunner(model, None).export([Choice(layer, method, factors)])
    (reference,), (rewritten,) = run(model, feeds), run(compressed, feeds)
    reference = reference.astype(np.float64)
    return float(np.sum((rewritten - reference) ** 2) / np.sum(reference**2))


def _correlated(rng, shape, mixing_axis=-1):
    """Inputs with a strongly non-isotropic second moment (so data-blind errors would differ)."""
    x = rng.standard_normal(shape).astype(np.float32)
    mixing = rng.standard_normal((shape[mixing_axis], shape[mixing_axis])) * np.linspace(
        3, 0.1, shape[mixing_axis]
    )
    return np.moveaxis(np.moveaxis(x, mixing_axis, -1) @ mixing.astype(np.float32), -1, mixing_axis) + 0.5


def test_local_error_of_a_gemm_equals_its_measured_output_error():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 40)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W"], ["y"])],
        [tensor("x", [None, 48])],
        [tensor("y", 2)],
        [init("W", weight)],
    )
    feeds = {"x": _correlated(rng, (600, 48))}
    (layer,) = analyze(model)
    stats = collect_stats(model, [layer], feeds, Runtime("cpu"))[layer.name]
    method = METHODS["svd"]
    for rank, data_aware in ((8, False), (16, True)):
        factors = method.decompose(layer, rank, stats if data_aware else None)
        predicted = local_error(layer, stats, method, factors)
        measured = _measured_local_error(model, layer, "svd", factors, feeds)
        assert predicted == pytest.approx(measured, rel=2e-3), (rank, predicted, measured)
        if data_aware:  # whitened factors trade weight error for output error: not the weight error
            assert predicted < 0.9 * factors.rel_error**2


@pytest.mark.parametrize("method_name", ["tucker2", "cut-o", "cp"])
def test_local_error_of_a_conv_equals_its_measured_output_error(method_name):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((12, 6, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    model = make_model([node], [tensor("x", [None, 6, 9, 9])], [tensor("y", 4)], [init("W", weight)])
    feeds = {"x": _correlated(rng, (64, 6, 9, 9), mixing_axis=1)}
    (layer,) = analyze(model)
    # 64·5·5 = 1600 patch rows: every position is in the patch moment (no row sampling).
    stats = collect_stats(model, [layer], feeds, Runtime("cpu"), want_patches=True)[layer.name]
    assert stats.patch_moment is not None
    method = METHODS[method_name]
    rank = method.candidate_ranks(layer)[len(method.candidate_ranks(layer)) // 2]
    factors = method.decompose(layer, rank)
    predicted = local_error(layer, stats, method, factors)
    measured = _measured_local_error(model, layer, method_name, factors, feeds)
    assert predicted == pytest.approx(measured, rel=2e-3), (predicted, measured)


def test_reconstruction_of_a_grouped_conv_matches_the_weight_error():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2)
    model = make_model([node], [tensor("x", [None, 8, 6, 6])], [tensor("y", 4)], [init("W", weight)])
    (layer,) = analyze(model)
    method = METHODS["tucker2-grouped"]
    assert method.check(layer) is None
    factors = method.decompose(layer, method.candidate_ranks(layer)[0])
    dense = dense_weight(layer)
    error = np.linalg.norm(dense - reconstructed_weight(layer, method, factors)) / np.linalg.norm(dense)
    assert error == pytest.approx(factors.rel_error, rel=1e-5)
    assert error > 0.05  # a real truncation, not the identity


def test_subsample_is_stratified_along_the_output_spread():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal(500)
    outputs = np.outer(scores, rng.standard_normal(10)) + 0.01 * rng.standard_normal((500, 10))
    picked = subsample_indices([outputs.astype(np.float32)], 20)
    assert len(set(picked)) == 20
    # One sample per stratum: the picked scores span the range evenly (a random draw rarely does).
    ranks = np.sort(np.argsort(np.argsort(scores))[picked])
    assert np.all(np.abs(ranks - (np.arange(20) + 0.5) * 25) <= 3)


@pytest.mark.slow
def test_predicted_search_spends_fewer_sample_forwards_and_meets_the_budget():
    with np.load(MODELS / "calib.npz") as a:
        calib = {"input": a["input"][:512], "labels": a["labels"][:512]}
    with np.load(MODELS / "eval.npz") as a:
        evaluation = {"input": a["input"][:1024], "labels": a["labels"][:1024]}
    results = {}
    for mode in ("measured", "predicted"):
        start = time.perf_counter()
        _, report = tnopt.compress(
            str(MODELS / "lenet5.onnx"),
            budget=0.01,
            data=calib,
            eval_data=evaluation,
            provider="cpu",
            cache_dir=None,
            sensitivity=mode,
            latency_guard=False,
        )
        results[mode] = (report, time.perf_counter() - start)
    predicted = results["predicted"][0]
    assert predicted.budget_met and predicted.metrics["top1_original"] - predicted.metrics["top1"] <= 0.01
    sweep_forwards = {m: r.search["steps"]["sensitivity"]["sample_forwards"] for m, (r, _) in results.items()}
    assert sweep_forwards["predicted"] * 4 <= sweep_forwards["measured"], sweep_forwards
    assert (
        predicted.search["prediction"]["predicted"] > predicted.search["prediction"]["measured_on_subsample"]
    )
    # The plan is still a real compression, not the empty plan that trivially meets the budget.
    assert predicted.after.flops < predicted.before.flops


@pytest.mark.parametrize(
    "method_name", ["tucker2", "cut-o", "cut-i", "cut-spatial", "svd", "cp", "mpo", "mpo-storage"]
)
def test_closed_form_reconstruction_equals_the_forward_probe(method_name):
    model = MODELS / "lenet5.onnx"
    import onnx

    method = METHODS[method_name]
    layers = [
        a
        for a in analyze(onnx.load(model))
        if a.candidate and method.check(a) is None and method.candidate_ranks(a)
    ]
    assert layers
    from tnopt.passes import Refusal

    checked = 0
    for layer in layers:
        fits = (method.decompose(layer, rank) for rank in method.candidate_ranks(layer))
        factors = next((f for f in fits if not isinstance(f, Refusal)), None)
        if factors is None:
            continue
        checked += 1
        direct = reconstructed_weight(layer, method, factors)
        probed = reconstructed_weight(layer, method, factors, probe=True)
        assert np.abs(direct - probed).max() <= 1e-9 * max(np.abs(probed).max(), 1.0), layer.name
    assert checked


def test_unknown_sensitivity_mode_is_a_one_line_error():
    from helpers import cli

    from tnopt.errors import TnoptError

    with pytest.raises(TnoptError, match="--sensitivity 'guess': choose auto, predicted or measured"):
        tnopt.RunConfig(sensitivity="guess")
    result = cli(
        MODELS / "lenet5.onnx", "-o", "/nonexistent/x.onnx", "--budget", "1%", "--sensitivity", "guess"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
