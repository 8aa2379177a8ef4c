"""The budget's gate never scores a calibration sample under a refit that was fitted on it
(tnopt/refine.py: two-fold cross-fitting); the plan that is saved is refitted on all samples."""

import numpy as np
from conftest import MODELS

import tnopt
from tnopt import refine
from tnopt.data import Dataset
from tnopt.plan import Plan


class Memorising:
    """A refiner that remembers the samples it was fitted on (its `inputs`)."""

    def __init__(self, inputs):
        self.seen = set(inputs["x"][:, 0].tolist())

    def __call__(self, plan):
        return ("fitted on", frozenset(self.seen))


class Runner:
    """Scores each sample 0 when the plan's refit saw it (a memorised sample), else 1."""

    def run(self, plan, inputs):
        _, seen = plan
        return [np.array([0.0 if x in seen else 1.0 for x in inputs["x"][:, 0]])]


def test_cross_fitted_gate_never_scores_a_fitted_sample(monkeypatch):
    monkeypatch.setattr(
        refine,
        "build_refiners",
        lambda config, runner, layers, calib, correct, **kw: [Memorising(calib.inputs)],
    )
    ids = np.arange(11, dtype=np.float32)[:, None]
    calib = Dataset({"x": ids}, None, "ids")
    folds = refine.cross_fitted_refiners(None, Runner(), [], calib, correct=True)
    assert len(folds) == refine.CROSS_FIT_FOLDS
    gates = [np.arange(11)[gate] for gate, _ in folds]
    assert sorted(np.concatenate(gates).tolist()) == list(range(11))  # the parts cover every sample once
    outputs = refine.gated_outputs(Runner(), Plan(()), calib.inputs, folds)
    # Every sample was scored, in order, and none by a refit that had seen it.
    assert outputs[0].tolist() == [1.0] * 11
    # Without cross-fitting (a refit on all samples) every sample would score as memorised.
    everything = Memorising(calib.inputs)
    assert Runner().run(everything(Plan(())), calib.inputs)[0].tolist() == [0.0] * 11
    assert refine.cross_fitted_refiners(None, Runner(), [], calib, correct=False) == []


def test_budgeted_run_gates_cross_fitted_and_saves_a_plan_refitted_on_all(small_splits):
    calib, evaluation = small_splits
    _, report = tnopt.compress(
        str(MODELS / "cnn4.onnx"),
        budget="2%",
        data=str(calib),
        eval_data=str(evaluation),
        provider="cpu",
        cache_dir=None,
        latency_guard=False,
    )
    assert report.search["gate"].startswith("cross-fitted")
    assert report.rewritten and report.budget_met
    # The saved layers carry the refit on all samples (the verified plans were unrefined until the
    # gate's folds refitted them); a refit with too few rows per unknown is skipped, so: some layer.
    assert any(layer.factor_notes.get("corrected") for layer in report.rewritten), [
        (layer.name, layer.method, layer.factor_notes) for layer in report.rewritten
    ]
    _, unrefined = tnopt.compress(
        str(MODELS / "cnn4.onnx"),
        budget="2%",
        data=str(calib),
        eval_data=str(evaluation),
        provider="cpu",
        cache_dir=None,
        latency_guard=False,
        correct=False,
    )
    assert unrefined.search["gate"] == "no fitted refits"
