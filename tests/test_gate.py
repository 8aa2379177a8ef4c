"""The budget's gate never scores a calibration sample under a refit that was fitted on it
(tnopt/refine.py: four-fold cross-fitting from one correction run); the plan that is saved is
refitted on all samples."""

import dataclasses

import numpy as np
from conftest import MODELS, budgeted_cnn4
from helpers import relative_difference
from test_switchboard import RUNTIME, lower, widest_choices

from tnopt import correct, refine, refit_equations
from tnopt.analyze import analyze
from tnopt.correct import Corrector
from tnopt.data import Dataset
from tnopt.io import load_model
from tnopt.runner import PlanRunner
from tnopt.switchboard import Switchboard


def vgg_setup(samples=96):
    model = load_model(str(MODELS / "vgg.onnx"))
    layers = [layer for layer in analyze(model) if layer.candidate]
    with np.load(MODELS / "calib.npz") as data:
        inputs = {"input": data["input"][:samples]}
    plan = [lower(c, 1) for c in widest_choices(layers, ["svd", "tucker2"])]
    return model, layers, inputs, plan


def board_runner(model, plan):
    runner = PlanRunner(model, RUNTIME)
    runner.board = Switchboard(model, plan, RUNTIME, Corrector.hidden_tensors(plan))
    return runner


class Scores:
    """A runner that tags each sample with the plan it ran under."""

    def run(self, plan, inputs):
        return [np.array([[plan, x] for x in inputs["x"][:, 0]], dtype=np.float64)]

    def lift(self, plan, tensor_names=(), board=True):
        pass


def test_gate_runs_each_sample_under_its_folds_plan_in_order():
    ids = np.arange(11, dtype=np.float32)[:, None]
    outputs = refine.gated_outputs(Scores(), [10.0, 20.0, 30.0, 40.0], {"x": ids})[0]
    assert outputs[:, 1].tolist() == list(range(11))  # every sample once, in order
    assert outputs[:, 0].tolist() == [10.0 * (1 + i % 4) for i in range(11)]  # sample i: fold i mod 4
    calib = Dataset({"x": ids}, None, "ids")
    assert refine.cross_fitted_refiners(None, None, [], calib, correct=False) == []


def test_a_folds_refit_is_the_refit_on_the_other_folds_samples(monkeypatch):
    """Moment subtraction: one capture, fold k solved with (total − fold k). With one wave (every
    layer's H from the uncorrected plan) nothing upstream is fitted either, so each fold's factors
    equal a correction run on the other folds' samples alone."""
    monkeypatch.setattr(refit_equations, "ENOUGH_ROWS_PER_UNKNOWN", 10**9)  # no early stop: same samples
    model, layers, inputs, plan = vgg_setup()
    runner = board_runner(model, plan)
    fold_of = np.repeat(np.arange(4), 24)  # contiguous folds
    corrector = Corrector(runner, layers, inputs, folds=4, fold_of_sample=fold_of, max_waves=1)
    everything, by_fold = corrector.cross_fitted(plan)
    assert corrector.last_waves == 1 and len(by_fold) == 4
    direct_all = Corrector(runner, layers, inputs, max_waves=1)(plan)
    for fold in range(4):
        others = {"input": inputs["input"][fold_of != fold]}
        direct = Corrector(runner, layers, others, max_waves=1)(plan)
        refitted = 0
        for a, b in zip(direct, by_fold[fold]):
            assert a.layer.name == b.layer.name
            refitted += bool(b.factors.notes.get("corrected"))
            for key in a.factors.arrays:
                assert relative_difference(a.factors.arrays[key], b.factors.arrays[key]) < 1e-4, key
        assert refitted >= 3
    for a, b in zip(direct_all, everything):
        for key in a.factors.arrays:
            assert relative_difference(a.factors.arrays[key], b.factors.arrays[key]) < 1e-4, key
    # A fold's refit differs from the refit on all samples: it did not see its own samples.
    changed = [
        relative_difference(a.factors.arrays[k], b.factors.arrays[k])
        for a, b in zip(everything, by_fold[0])
        if a.factors.notes.get("corrected")
        for k in a.factors.arrays
    ]
    assert max(changed) > 1e-3


def test_the_reference_models_keep_the_exact_correction_and_big_work_economises():
    model, layers, inputs, plan = vgg_setup()
    runner = board_runner(model, plan)
    exact = correct.correction_mode(runner, layers, 512, refine.CROSS_FIT_FOLDS)
    assert exact == {"max_waves": None, "shared_capture": False, "early_stop": False}
    heavy = [dataclasses.replace(layer, flops=layer.flops * 1000) for layer in layers]
    economy = correct.correction_mode(runner, heavy, 512, refine.CROSS_FIT_FOLDS)
    assert economy["max_waves"] == correct.MAX_CORRECTION_WAVES and economy["shared_capture"]


def test_verifying_a_plan_costs_a_bounded_number_of_passes_whatever_it_rewrites(monkeypatch):
    """VGG's rewritten layers form one chain: corrected one after the other they need a capture per
    layer; economising, the waves stay at MAX_CORRECTION_WAVES, and the ORT sample-forwards of a
    cross-fitted verification (captures, targets, the gate's run) at a few passes, for 3 or all
    layers."""
    monkeypatch.setattr(correct, "ECONOMY_ABOVE_FLOPS", 0)
    model, layers, inputs, plan = vgg_setup()
    assert len(plan) > correct.MAX_CORRECTION_WAVES + 1
    runner = board_runner(model, plan)
    calib = Dataset(inputs, None, "vgg")
    costs = {}
    for count in (3, len(plan)):
        cross_fit = refine.cross_fitted_refiners(None, runner, layers, calib, correct=True)
        before = RUNTIME.sample_forwards
        outputs, refitted = cross_fit.gated(runner, plan[:count], inputs)
        costs[count] = (RUNTIME.sample_forwards - before) / len(calib)
        assert cross_fit.corrector.last_waves <= min(count, correct.MAX_CORRECTION_WAVES)
        assert sum(bool(c.factors.notes.get("corrected")) for c in refitted) >= min(count, 3)
        assert len(outputs[0]) == len(calib)
    # Per wave: one capture and one pass for the targets (held after the first), plus the gate's run.
    assert costs[len(plan)] <= 2 * correct.MAX_CORRECTION_WAVES + 1, costs
    sequential = Corrector(runner, layers, inputs, max_waves=None)
    sequential(plan)
    assert sequential.last_waves == len(plan)  # what the bound saves: one wave per layer


def test_budgeted_run_gates_cross_fitted_and_saves_a_plan_refitted_on_all(small_splits):
    calib, evaluation = small_splits
    _, report = budgeted_cnn4(calib, evaluation, latency_guard=False)
    assert report.search["gate"].startswith("cross-fitted")
    assert report.rewritten and report.budget_met
    # The saved layers carry the refit on all samples (the verified plans were unrefined until the
    # gate's folds refitted them); a refit with too few rows per unknown is skipped, so: some layer.
    assert any(layer.factor_notes.get("corrected") for layer in report.rewritten), [
        (layer.name, layer.method, layer.factor_notes) for layer in report.rewritten
    ]
    _, unrefined = budgeted_cnn4(calib, evaluation, latency_guard=False, correct=False)
    # Without refits the data-aware factors are still the gate's fitted step: cross-fitted alone.
    gate = unrefined.search["gate"]
    assert gate.startswith("cross-fitted") and "whitened on the other parts" in gate, gate
    assert "refits fitted" not in gate, gate


def test_exact_cross_fitting_equals_a_correction_on_the_other_folds_in_every_wave(monkeypatch):
    """Without the shared capture each fold's chain of refits runs the other folds' samples: with
    two sequential waves, fold k's plan is the correction of the other folds' samples alone."""
    monkeypatch.setattr(refit_equations, "ENOUGH_ROWS_PER_UNKNOWN", 10**9)
    model, layers, inputs, plan = vgg_setup()
    plan = plan[:3]
    runner = board_runner(model, plan)
    fold_of = np.repeat(np.arange(4), 24)
    options = {"max_waves": 2, "shared_capture": False}
    corrector = Corrector(runner, layers, inputs, folds=4, fold_of_sample=fold_of, **options)
    _, by_fold = corrector.cross_fitted(plan)
    assert corrector.last_waves == 2
    for fold in (0, 3):
        others = {"input": inputs["input"][fold_of != fold]}
        direct = Corrector(runner, layers, others, max_waves=2)(plan)
        for a, b in zip(direct, by_fold[fold]):
            for key in a.factors.arrays:
                assert relative_difference(a.factors.arrays[key], b.factors.arrays[key]) < 1e-4, key


def test_off_the_board_the_folds_of_a_wave_share_one_session(monkeypatch):
    """Without a board every plan is exported: the folds' plans of a wave (and of the gate's run)
    differ in factor values only, so one lifted graph serves them all (one per wave, one for the
    gate, instead of one per fold), with the same outputs."""
    from tnopt import runner as runner_module

    monkeypatch.setattr(correct, "ECONOMY_ABOVE_FLOPS", 0)
    model, layers, inputs, plan = vgg_setup()
    plan = plan[:3]
    calib = Dataset(inputs, None, "vgg")
    splice, lift = runner_module.splice_plan, runner_module.lift_factors
    results = {}
    for lifting in (True, False):
        graphs = []
        monkeypatch.setattr(runner_module, "splice_plan", lambda *a: graphs.append(1) or splice(*a))
        monkeypatch.setattr(runner_module, "lift_factors", lambda *a: graphs.append(1) or lift(*a))
        runner = PlanRunner(model, RUNTIME)  # no board
        if not lifting:
            monkeypatch.setattr(runner, "lift", lambda *a, **k: None)
        cross_fit = refine.cross_fitted_refiners(None, runner, layers, calib, correct=True)
        outputs, refitted = cross_fit.gated(runner, plan, inputs)
        results[lifting] = (outputs[0], len(graphs), cross_fit.corrector.last_waves, refitted)
    waves = results[True][2]
    assert waves >= 2 and results[False][2] == waves
    assert results[True][1] == waves + 1, results[True][1]
    assert results[False][1] == (waves + 1) * refine.CROSS_FIT_FOLDS
    assert relative_difference(results[False][0], results[True][0]) < 1e-5
    for a, b in zip(results[False][3], results[True][3]):
        for key in a.factors.arrays:
            assert relative_difference(a.factors.arrays[key], b.factors.arrays[key]) < 1e-4, key
