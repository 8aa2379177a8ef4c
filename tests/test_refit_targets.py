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
