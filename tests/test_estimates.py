"""Estimates instead of fits where the search only reads errors and shapes: a method's `estimate`
(the truncated HOSVD for Tucker-2) has the fit's shapes and nearly its error from two SVDs for a whole
rank ladder, and a predicted search fits only the ranks it measures or runs in a plan."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS, budgeted_cnn4, subset_npz
from helpers import init, make_model, tensor
from onnx import helper
from tnopt.passes import METHODS, _linalg

from tnopt import latency, pipeline, predict
from tnopt.analyze import analyze
from tnopt.local_error import local_error
from tnopt.profile import collect_stats
from tnopt.runtime import Runtime


def _conv_with_stats(seed=0, o=24, i=16):
    """A 3x3 conv whose kernel has decaying channel spectra, with channel and patch moments of
    correlated inputs (so the whitened fit differs from the weight-only one)."""
    rng = np.random.default_rng(seed)
    weight = np.einsum(
        "ab...,oa,ib->oi...",
        rng.standard_normal((o, i, 3, 3)),
        rng.standard_normal((o, o)) * np.geomspace(1, 0.05, o),
        rng.standard_normal((i, i)) * np.geomspace(1, 0.05, i),
    ).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = make_model([node], [tensor("x", [None, i, 8, 8])], [tensor("y", 4)], [init("W", weight)])
    mixing = rng.standard_normal((i, i)) * np.linspace(3, 0.1, i)
    x = np.einsum("nchw,cd->ndhw", rng.standard_normal((48, i, 8, 8)), mixing).astype(np.float32)
    (layer,) = analyze(model)
    stats = collect_stats(model, [layer], {"x": x}, Runtime("cpu"), want_patches=True)[layer.name]
    return layer, stats


def _whitened_residual(layer, stats, factors) -> float:
    """‖(W − Ŵ) ×_I Sᵀ‖² / ‖W ×_I Sᵀ‖²: the objective Tucker-2's whitened fit minimises."""
    s = _linalg.whitening(stats.input_moment)
    w = np.asarray(layer.weight, np.float64)
    a = factors.arrays
    approx = np.einsum("ab...,oa,ib->oi...", a["core"], a["U_out"], a["U_in"]).astype(np.float64)
    return float(
        np.sum(_linalg.mode_product(w - approx, s.T, 1) ** 2) / np.sum(_linalg.mode_product(w, s.T, 1) ** 2)
    )


@pytest.mark.parametrize("data_aware", [True, False])
def test_tucker2_estimate_is_the_hosvd_start_of_the_fit_and_nearly_its_error(data_aware):
    layer, stats = _conv_with_stats()
    used = stats if data_aware else None
    method = METHODS["tucker2"]
    for rank in method.candidate_ranks(layer):
        fit, estimate = method.decompose(layer, rank, used), method.estimate(layer, rank, used)
        assert estimate.notes.get("estimate") and not fit.notes.get("estimate")
        assert estimate.rank == fit.rank
        assert {k: v.shape for k, v in estimate.arrays.items()} == {k: v.shape for k, v in fit.arrays.items()}
        if data_aware:
            # HOOI starts at the truncated HOSVD and never raises the residual it minimises, and
            # the HOSVD is quasi-optimal: its squared residual is at most 2x the best (2 modes cut).
            e_fit, e_est = _whitened_residual(layer, stats, fit), _whitened_residual(layer, stats, estimate)
            # (Factors are stored in float32: equal up to its round-off.)
            assert e_fit <= e_est * (1 + 1e-4) and e_est <= 2 * e_fit + 1e-9, (rank, e_est, e_fit)
            # On a kernel where HOOI converges from HOSVD the local errors agree to a few percent
            # (measured on the reference models' 179 Tucker-2 ranks: est/fit 0.97–1.24, median 1.01).
            local_fit = local_error(layer, stats, method, fit)
            local_est = local_error(layer, stats, method, estimate)
            assert local_est == pytest.approx(local_fit, rel=0.1), (rank, local_est, local_fit)
        else:
            assert fit.rel_error <= estimate.rel_error * (1 + 1e-4) <= np.sqrt(2) * fit.rel_error + 1e-6


def test_a_rank_ladder_of_estimates_costs_two_svds_where_fits_cost_many(monkeypatch):
    layer, stats = _conv_with_stats(seed=1)
    method = METHODS["tucker2"]
    ranks = method.candidate_ranks(layer)
    calls = []
    real_svd = np.linalg.svd
    monkeypatch.setattr(np.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    _linalg._SVD_CACHE.clear()
    for rank in ranks:
        method.estimate(layer, rank, stats)
    estimates = len(calls)
    for rank in ranks:
        method.decompose(layer, rank, stats)
    fits = len(calls) - estimates
    assert estimates == 2, estimates  # the O- and I-mode unfoldings of the whitened kernel, once
    assert fits >= 2 * len(ranks), fits  # HOOI: two SVDs per sweep per rank


def test_methods_without_a_cheaper_form_estimate_by_their_fit():
    layer, stats = _conv_with_stats(seed=2)
    for name in ("cut-o", "cut-i", "cut-spatial", "cp"):  # CP of a 3x3 kernel: the ALS fit
        method = METHODS[name]
        rank = method.candidate_ranks(layer)[0]
        fit, estimate = method.decompose(layer, rank, stats), method.estimate(layer, rank, stats)
        assert not estimate.notes.get("estimate")
        for key, array in fit.arrays.items():
            np.testing.assert_array_equal(array, estimate.arrays[key])


def test_cp_estimate_of_a_1x1_conv_is_the_optimal_truncation():
    """A rank-r CP of a 1x1 kernel is a rank-r matrix: the (whitened) truncated SVD is the best one,
    so the estimate's whitened error is at most the ALS fit's, and its local error too."""
    rng = np.random.default_rng(4)
    o, i = 20, 24
    weight = rng.standard_normal((o, 6)) @ rng.standard_normal((6, i)) + 0.3 * rng.standard_normal((o, i))
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[1, 1])
    model = make_model(
        [node], [tensor("x", [None, i, 6, 6])], [tensor("y", 4)], [init("W", weight[:, :, None, None])]
    )
    mixing = rng.standard_normal((i, i)) * np.linspace(3, 0.1, i)
    x = np.einsum("nchw,cd->ndhw", rng.standard_normal((40, i, 6, 6)), mixing).astype(np.float32)
    (layer,) = analyze(model)
    stats = collect_stats(model, [layer], {"x": x}, Runtime("cpu"), want_patches=True)[layer.name]
    method = METHODS["cp"]
    for rank in method.candidate_ranks(layer):
        fit, estimate = method.decompose(layer, rank, stats), method.estimate(layer, rank, stats)
        assert estimate.notes.get("estimate") and estimate.rank == fit.rank
        assert {k: v.shape for k, v in estimate.arrays.items()} == {k: v.shape for k, v in fit.arrays.items()}
        local_fit = local_error(layer, stats, method, fit)
        local_est = local_error(layer, stats, method, estimate)
        assert local_est <= local_fit * (1 + 1e-3) + 1e-7, (rank, local_est, local_fit)


@pytest.mark.slow
def test_a_predicted_search_fits_only_the_ranks_it_measures_or_runs_in_a_plan(monkeypatch, tmp_path):
    """The predicted sweep and the latency guard read estimates; fits happen only for the ranks that
    run on data (anchors, frontier plans, verified plans). Before, every candidate rank was fitted."""
    calib = subset_npz(MODELS / "calib.npz", tmp_path / "calib.npz", 0, 96)
    evaluation = subset_npz(MODELS / "eval.npz", tmp_path / "eval.npz", 0, 128)
    fitted, estimated, used = [], [], set()
    real_factorize = pipeline.factorize

    def recording_factorize(layer, method, rank, stats=None, table=None, *, estimate=False):
        (estimated if estimate else fitted).append((layer.name, method, rank))
        return real_factorize(layer, method, rank, stats, table, estimate=estimate)

    monkeypatch.setattr(pipeline, "factorize", recording_factorize)
    real_measure, real_plan_drop = predict._Subsample.measure, predict._Subsample.plan_drop

    def measure(self, ctx, layer, method, rank, factors):
        used.add((layer.name, method, rank))
        return real_measure(self, ctx, layer, method, rank, factors)

    def plan_drop(self, ctx, choices):
        used.update((c.layer.name, c.method, c.factors.rank) for c in choices)
        return real_plan_drop(self, ctx, choices)

    monkeypatch.setattr(predict._Subsample, "measure", measure)
    monkeypatch.setattr(predict._Subsample, "plan_drop", plan_drop)
    fitted_in_sweep = []
    real_sweep, real_guard = predict.predicted_sweep, latency.measure_latency

    def sweep(ctx, *args):
        start = len(fitted)
        result = real_sweep(ctx, *args)
        fitted_in_sweep.extend(fitted[start:])
        return result

    def guard(*args, **kwargs):
        start = len(fitted)
        result = real_guard(*args, **kwargs)
        assert len(fitted) == start, fitted[start:]  # timing reads shapes: no fit
        return result

    monkeypatch.setattr(predict, "predicted_sweep", sweep)
    monkeypatch.setattr(latency, "measure_latency", guard)
    _, report = budgeted_cnn4(calib, evaluation, sensitivity="predicted", methods="tucker2,svd")
    prediction = report.search["prediction"]
    assert fitted_in_sweep, "the sweep measured nothing"
    assert set(fitted_in_sweep) <= used, set(fitted_in_sweep) - used
    assert prediction["fits"] == len(fitted_in_sweep)
    # Far fewer fits than candidate ranks, each of which was estimated.
    candidates = {k for k in estimated if k[1] == "tucker2"}
    assert len({k for k in fitted_in_sweep if k[1] == "tucker2"}) < len(candidates) / 2
    assert report.rewritten and report.after.flops < report.before.flops


def test_factorization_memos_stay_under_their_byte_bound(monkeypatch):
    """The SVD and whitening memos drop their oldest entries past _CACHE_BYTES (ResNet-50's patch
    whitenings are 170 MB each), keeping the newest, which the next rank of the same layer reuses."""
    monkeypatch.setattr(_linalg, "_CACHE_BYTES", 1_500_000)  # one SVD (0.96 MB), four whitenings
    _linalg._SVD_CACHE.clear()
    _linalg._WHITENING_CACHE.clear()
    rng = np.random.default_rng(5)
    for _ in range(6):
        x = rng.standard_normal((400, 200))
        _linalg.svd(x)
        _linalg.whitening(x.T @ x / 400)
    for cache in (_linalg._SVD_CACHE, _linalg._WHITENING_CACHE):
        assert 1 <= len(cache) < 6
        assert sum(_linalg._nbytes(v) for v in cache.values()) <= _linalg._CACHE_BYTES
    last = _linalg.svd(x)
    assert last is next(reversed(_linalg._SVD_CACHE.values()))  # the newest stays memoised
