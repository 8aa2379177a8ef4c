"""What a budgeted search spends where passes are expensive: --sensitivity auto picks the predicted
sweep from the projected work of the measured one, and τ points run on a subsample with only the
best plans that pass there verified on every calibration sample."""

import numpy as np
from conftest import MODELS, budgeted_cnn4
from tnopt.passes import METHODS

from tnopt import predict, verify
from tnopt.analyze import analyze


def test_auto_sensitivity_follows_the_projected_measured_sweep():
    from tnopt.io import load_model

    layers = [layer for layer in analyze(load_model(str(MODELS / "cnn4.onnx"))) if layer.candidate]
    candidates = {
        layer.name: [
            m
            for m in ("svd", "tucker2", "cp")
            if layer.op in METHODS[m].op_types and METHODS[m].check(layer) is None
        ]
        for layer in layers
    }
    mode, why = predict.choose_sensitivity(layers, candidates, METHODS, 512)
    assert mode == "measured" and why.startswith("auto:")
    projected = float(why.split("projected at ")[1].split(" ")[0])
    # More samples do not count beyond the sweep's cap; more layers do: past the threshold, predicted.
    assert predict.choose_sensitivity(layers, candidates, METHODS, 10**9)[0] == "measured"
    copies = int(np.ceil(predict.AUTO_MEASURED_MAX_FLOPS / projected)) + 1
    mode, why = predict.choose_sensitivity(layers * copies, candidates, METHODS, 512)
    assert mode == "predicted", why
    # A memory-bound model (depthwise convs at high resolution) costs more than its FLOPs say: its
    # activation bytes per sample count too, enough of them and the same layers are predicted.
    per_sample = sum(layer.flops for layer in layers)
    assert predict.choose_sensitivity(layers, candidates, METHODS, 512, per_sample // 100)[0] == "measured"
    heavy = int(copies * per_sample / predict.FLOPS_PER_ACTIVATION_BYTE)
    mode, why = predict.choose_sensitivity(layers, candidates, METHODS, 512, heavy)
    assert mode == "predicted", why


def test_expensive_passes_verify_tau_points_on_a_subsample_and_few_plans_on_all(monkeypatch, small_splits):
    calib, evaluation = small_splits
    monkeypatch.setattr(verify, "VERIFY_SUBSAMPLE_ABOVE_FLOPS", 0)  # every pass "expensive"
    monkeypatch.setattr(verify, "VERIFY_SUBSAMPLE", 96)
    _, report = budgeted_cnn4(calib, evaluation, latency_guard=False, sensitivity="measured")
    curve = report.search["curve"]
    on_sub = [p for p in curve if p.get("samples") == 96]
    on_all = [p for p in curve if p.get("samples") == report.budget["calibration_samples"]]
    assert len(on_sub) >= 5 and 1 <= len(on_all) <= verify.FULL_CHECKS
    assert report.budget_met and report.rewritten
    # The kept plan passed on every sample, not only on the subsample.
    assert any(p["passed"] and p["layers"] == len(report.rewritten) for p in on_all)
    assert report.budget["drop_evaluation"] <= 0.02


def test_a_pass_beyond_the_first_failing_tau_is_not_kept(monkeypatch):
    """True drops grow with τ; a plan that passes after a less aggressive one failed passed by the
    noise of a few samples. The grid stops at its first failure and bisects below it."""
    from types import SimpleNamespace

    from tnopt import budget as B

    # One option per layer, each layer's proxy 4x the previous: τ adds layers one by one.
    options = [B.Option(f"L{i}", ("svd", 1), saving=10.0 * (i + 1), proxy=4.0**i * 1e-4) for i in range(8)]
    # Measured drop by the number of rewritten layers: the 4-layer plan fails, the 5-layer one "passes".
    drops = {0: 0.0, 1: 0.002, 2: 0.004, 3: 0.006, 4: 0.02, 5: 0.003, 6: 0.04, 7: 0.05, 8: 0.06}
    seen = []

    def evaluate(self, allocation):
        seen.append(len(allocation))
        drop = drops[len(allocation)]
        return {
            "allocation": allocation,
            "drop": drop,
            "margin": 0.0,
            "saving": B.total_saving(allocation),
            "passed": drop <= 0.01,
        }

    monkeypatch.setattr(verify._Verifier, "evaluate", evaluate)
    bar = SimpleNamespace(update=lambda n: None, close=lambda: None)
    ctx = SimpleNamespace(layers=[], bar=lambda total, desc: bar, out_of_time=lambda: False)
    best, _, curve = verify._search_tau(ctx, options, refine=None)
    assert len(best["allocation"]) == 3
    # Nothing beyond the first failing τ was verified (that work only fed the winner's curse).
    first_fail = next(p["tau"] for p in curve if not p["passed"])
    assert all(p["tau"] <= first_fail for p in curve)
    assert 5 not in seen
