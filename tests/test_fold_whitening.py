"""The gate's data-aware factors are cross-fitted (tnopt/fold_stats.py): each calibration fold is
scored under factors whitened from the other folds' input moments, never its own."""

import numpy as np
from helpers import init, make_model, relative_difference, tensor
from onnx import helper
from tnopt.passes._linalg import refit_last_factor

from tnopt import refine, refit_equations
from tnopt.analyze import analyze
from tnopt.correct import Corrector
from tnopt.data import Dataset
from tnopt.fold_stats import FoldFactors, held_out
from tnopt.pipeline import factorize
from tnopt.plan import Choice, Plan
from tnopt.profile import collect_stats
from tnopt.runner import PlanRunner
from tnopt.runtime import Runtime

RUNTIME = Runtime("cpu")
K, N, T = 48, 40, 2
SPECTRUM = np.exp(-np.arange(K) / 8.0)  # anisotropic inputs: whitening matters, and overfits


def tokens(samples, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((samples, T, K)) * SPECTRUM).astype(np.float32)


def matmul_chain(layers=1):
    """x (n, T, K) → MatMul → [Relu → MatMul]: token rows like a transformer's projections."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0")]
    weights = [init("w0", rng.standard_normal((K, N)) / np.sqrt(K))]
    for i in range(1, layers):
        nodes.append(helper.make_node("Relu", [f"h{i - 1}"], [f"r{i}"], name=f"relu{i}"))
        nodes.append(helper.make_node("MatMul", [f"r{i}", f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        weights.append(init(f"w{i}", rng.standard_normal((N, N)) / np.sqrt(N)))
    model = make_model(nodes, [tensor("x", ["n", T, K])], [tensor(f"h{layers - 1}", 3)], weights)
    return model, [layer for layer in analyze(model) if layer.candidate]


def fit(layer, method, rank, stats):
    return factorize(layer, method, rank, stats)


def _chain_setup(layers_count, seed, samples=96, folds=4):
    """A MatMul chain, its calibration tokens with fold moments, the rank-10 SVD plan of every layer,
    a runner, each sample's fold and the fold-major sample order."""
    model, layers = matmul_chain(layers_count)
    calib = tokens(samples, seed)
    stats = collect_stats(model, layers, {"x": calib}, RUNTIME, folds=folds)
    plan = Plan(tuple(Choice(layer, "svd", fit(layer, "svd", 10, stats[layer.name])) for layer in layers))
    fold_of = np.arange(samples) % folds
    order = np.argsort(fold_of, kind="stable")
    return model, layers, samples, calib, stats, plan, PlanRunner(model, RUNTIME), fold_of, order


def test_fold_moments_are_the_moments_of_each_folds_samples():
    """Sample i's rows go to fold i mod 4, and the moments without fold k are those of a pass over
    the other folds' samples alone (exact statistics)."""
    model, layers = matmul_chain(2)
    x = tokens(30, 1)  # folds of 8, 8, 7, 7 samples; 60 rows > 48 features (no shrinkage)
    stats = collect_stats(model, layers, {"x": x}, RUNTIME, folds=4)
    for layer in layers:
        item = stats[layer.name]
        assert len(item.fold_moments) == 4 and item.fold_rows == [16, 16, 14, 14]
        total = sum(m.astype(np.float64) for m in item.fold_moments) / item.rows
        assert relative_difference(item.input_moment, total) < 1e-6
        for fold in range(4):
            direct = collect_stats(model, [layer], {"x": x[np.arange(30) % 4 != fold]}, RUNTIME)[layer.name]
            without = held_out(item, fold)
            assert without.rows == direct.rows
            assert relative_difference(direct.input_moment, without.input_moment) < 1e-5
    # Without folds (a fixed-rank run) nothing more is kept.
    assert collect_stats(model, layers, {"x": x}, RUNTIME)[layers[0].name].fold_moments is None


def test_a_layer_past_the_byte_cap_keeps_no_fold_moments(monkeypatch):
    from tnopt import profile

    model, layers = matmul_chain(2)
    one_layer = 4 * 4 * K * K  # 4 folds of float32 (K, K): the first layer's fold sums
    monkeypatch.setattr(profile, "FOLD_MOMENT_MAX_BYTES", one_layer)
    stats = collect_stats(model, layers, {"x": tokens(16, 1)}, RUNTIME, folds=4)
    assert stats[layers[0].name].fold_moments is not None
    assert stats[layers[1].name].fold_moments is None  # N = 40 < K, but the budget is spent
    assert held_out(stats[layers[1].name], 0) is None


def test_the_gate_scores_each_fold_under_factors_whitened_without_it():
    """The fails-before test: the gate's fold plans are fitted from the other folds' moments, so its
    drop matches fresh samples', where the all-sample whitening flatters its own samples."""
    model, layers = matmul_chain(1)
    layer = layers[0]
    calib, fresh = tokens(64, 1), tokens(512, 2)
    stats = collect_stats(model, layers, {"x": calib}, RUNTIME, folds=4)
    plan = Plan((Choice(layer, "svd", fit(layer, "svd", 12, stats[layer.name])),))
    runner = PlanRunner(model, RUNTIME)
    data = Dataset({"x": calib}, None, "calib")
    cross_fit = refine.cross_fitted_refiners(
        None, runner, layers, data, correct=False, fold_factors=FoldFactors(stats, fit, 4)
    )
    # Fold k's factors are exactly the fit on the moments without fold k, and not the all-sample one.
    bases = cross_fit.fold_factors.plans(plan)
    for fold, base in enumerate(bases):
        direct = fit(
            layer,
            "svd",
            12,
            collect_stats(model, layers, {"x": calib[np.arange(64) % 4 != fold]}, RUNTIME)[layer.name],
        )
        assert relative_difference(direct.arrays["A"], base.choices[0].factors.arrays["A"]) < 1e-4
        assert (
            relative_difference(plan.choices[0].factors.arrays["A"], base.choices[0].factors.arrays["A"])
            > 1e-2
        )

    def loss(x, outputs):
        reference = RUNTIME.run(model, {"x": x})[0]
        return float(np.sum((reference - outputs) ** 2) / np.sum(reference**2))

    gated, saved = cross_fit.gated(runner, plan, {"x": calib})
    assert saved is plan  # what the search saves: the factors whitened on every sample
    in_sample = loss(calib, runner.run(plan, {"x": calib})[0])
    on_fresh = loss(fresh, runner.run(plan, {"x": fresh})[0])
    gate = loss(calib, gated[0])
    assert in_sample < 0.8 * on_fresh, (in_sample, on_fresh)  # the whitening's in-sample optimism
    assert gate > 0.85 * on_fresh, (gate, on_fresh)  # the gate sees what new samples see
    assert "whitened on the other parts" in cross_fit.describe()


def test_a_shared_capture_refits_each_folds_own_first_factors_from_the_layer_input(monkeypatch):
    """Economy correction (one capture for every fold): fold k's refit of B rebuilds H = x·A_k
    from the captured input on the other folds' rows; it equals the least squares on those rows
    directly, and the plan refitted on all samples is the correction's usual refit."""
    monkeypatch.setattr(refit_equations, "ENOUGH_ROWS_PER_UNKNOWN", 10**9)  # no early stop
    model, layers, samples, calib, stats, plan, runner, fold_of, order = _chain_setup(2, seed=3)
    options = {"max_waves": 1, "shared_capture": True}
    inputs = {"x": calib[order]}
    corrector = Corrector(runner, layers, inputs, folds=4, fold_of_sample=fold_of[order], **options)
    # The first layer reads the graph input (nothing to capture): it keeps its all-sample factors
    # in every fold; the second reads an intermediate tensor and gets its folds' own.
    assert corrector.input_space_tensors(plan) == ["r1"]
    bases = FoldFactors(stats, fit, 4).plans(plan, corrector.refits_fold_factors)
    assert all(base.choices[0] is plan.choices[0] for base in bases)
    assert all(base.choices[1] is not plan.choices[1] for base in bases)
    refitted, by_fold = corrector.cross_fitted(plan, bases)
    plain = Corrector(runner, layers, inputs, **options)(plan)
    for ours, theirs in zip(refitted, plain):
        assert ours.factors.notes.get("corrected")
        assert relative_difference(theirs.factors.arrays["B"], ours.factors.arrays["B"]) < 1e-5
    second = layers[1]
    hidden = np.maximum(calib.reshape(-1, K).astype(np.float64) @ layers[0].weight, 0.0)
    targets = hidden @ second.weight.astype(np.float64)
    # One wave: the second layer's input comes from the first layer's unrefitted factors.
    x = np.maximum(
        calib.reshape(-1, K).astype(np.float64)
        @ plan.choices[0].factors.arrays["A"]
        @ plan.choices[0].factors.arrays["B"],
        0.0,
    )
    rows_fold = np.repeat(fold_of, T)
    for fold in range(4):
        mine = by_fold[fold].choices[1].factors
        assert mine.notes.get("corrected")
        a_k = bases[fold].choices[1].factors.arrays["A"]
        assert mine.arrays["A"] is a_k  # the fold's own first factor, refitted on its own H
        keep = rows_fold != fold
        h = x[keep] @ a_k.astype(np.float64)
        direct = refit_last_factor(h.T @ h, h.T @ targets[keep])
        assert relative_difference(direct, mine.arrays["B"]) < 1e-4


def test_exact_cross_fitting_starts_each_folds_chain_from_its_own_factors(monkeypatch):
    """Exact cross-fitting (each fold's chain runs the other folds' samples): fold k's plan is the
    correction, on the other folds' samples alone, of the plan whitened without fold k."""
    monkeypatch.setattr(refit_equations, "ENOUGH_ROWS_PER_UNKNOWN", 10**9)
    model, layers, samples, calib, stats, plan, runner, fold_of, order = _chain_setup(3, seed=4)
    options = {"max_waves": None, "shared_capture": False}
    corrector = Corrector(
        runner, layers, {"x": calib[order]}, folds=4, fold_of_sample=fold_of[order], **options
    )
    bases = FoldFactors(stats, fit, 4).plans(plan, corrector.refits_fold_factors)
    assert all(b is not p for base in bases for b, p in zip(base, plan))  # every layer: its own
    _, by_fold = corrector.cross_fitted(plan, bases)
    for fold in (1, 3):
        direct = Corrector(runner, layers, {"x": calib[fold_of != fold]}, **options)(bases[fold])
        for a, b in zip(direct, by_fold[fold]):
            assert b.factors.notes.get("corrected")
            for key in a.factors.arrays:
                assert relative_difference(a.factors.arrays[key], b.factors.arrays[key]) < 1e-4, key


def test_the_gate_line_says_when_the_whitening_could_not_be_cross_fitted():
    """A layer without statistics (not data-aware) is neither cross-fitted nor a fallback; a gate
    whose statistics kept no fold moments says its factors were whitened on the scored samples."""
    _, (layer,) = matmul_chain()
    plan = Plan((Choice(layer, "svd", factorize(layer, "svd", 12, None)),))
    folds = FoldFactors({}, fit, 4)
    by_fold = folds.plans(plan)
    assert all(p.choices == plan.choices for p in by_fold)
    assert not folds.covered and not folds.fallbacks
    gate = refine.CrossFit(None, 4, None, None, "no layer kept per-fold moments")
    assert "whitened on all samples" in gate.describe() and "no layer kept" in gate.describe()
    assert "whitened on all samples" not in refine.CrossFit(None, 4, None, folds, "x").describe()
