"""The correction's targets (original layer outputs) are held batch by batch while they fit, and a
capture pass that stopped early or started anywhere gets the right batch."""

import numpy as np
from conftest import MODELS

from tnopt.analyze import analyze
from tnopt.correct import Corrector
from tnopt.io import load_model
from tnopt.runner import PlanRunner
from tnopt.runtime import Runtime


def test_target_batches_match_a_whole_run_in_any_order_held_or_not():
    model = load_model(str(MODELS / "cnn4.onnx"))
    layers = [layer for layer in analyze(model) if layer.candidate]
    with np.load(MODELS / "calib.npz") as data:
        inputs = {"input": data["input"][:40]}
    runtime = Runtime("cpu", batch_size=16)
    runner = PlanRunner(model, runtime)
    for held in (1 << 30, 0):
        corrector = Corrector(runner, layers, inputs, max_held_bytes=held)
        names = corrector._target_names
        whole = runtime.capture(model, names, inputs)
        for order in ([0, 16, 32], [16, 32], [0, 16], [0, 16, 32]):
            at = corrector.target_batches()
            for start in order:
                rows = slice(start, min(start + 16, 40))
                got = at(rows)
                for name in names:
                    np.testing.assert_allclose(got[name], whole[name][rows], rtol=1e-5, atol=1e-6)
        assert bool(corrector._held) == bool(held)


def test_targets_that_do_not_fit_whole_are_not_held_at_all():
    """Holding a prefix of the targets spares a sliver of each pass (the rest is recomputed anyway)
    at the cap's bytes: a Corrector holds them all or none."""
    model = load_model(str(MODELS / "cnn4.onnx"))
    layers = [layer for layer in analyze(model) if layer.candidate]
    with np.load(MODELS / "calib.npz") as data:
        inputs = {"input": data["input"][:40]}
    runtime = Runtime("cpu", batch_size=16)
    runner = PlanRunner(model, runtime)
    names = Corrector(runner, layers, inputs)._target_names
    whole = runtime.capture(model, names, inputs)
    per_sample = sum(whole[name][:1].nbytes for name in names)
    for cap, held_batches in ((per_sample * 40, 3), (per_sample * 36, 0)):  # 36: two of three batches fit
        corrector = Corrector(runner, layers, inputs, max_held_bytes=cap)
        at = corrector.target_batches()
        for start in (0, 16, 32):
            rows = slice(start, min(start + 16, 40))
            got = at(rows)
            for name in names:
                np.testing.assert_allclose(got[name], whole[name][rows], rtol=1e-5, atol=1e-6)
        assert len(corrector._held) == held_batches
