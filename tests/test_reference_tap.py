"""The search's reference outputs come from the statistics pass (tnopt/reference_tap.py): the same
values a plain run gives, the same moments, the same plan, one whole-model pass fewer."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import MODELS

import tnopt
import tnopt.pipeline as P
from tnopt.analyze import analyze
from tnopt.profile import collect_stats
from tnopt.reference_tap import tapped_reference
from tnopt.runtime import Runtime


def _lenet_pass(samples=40, batch=16):
    model = onnx.load(MODELS / "lenet5.onnx")
    layers = analyze(model)
    with np.load(MODELS / "calib.npz") as data:
        inputs = {"input": data["input"][:samples]}
    return model, layers, inputs, Runtime("cpu", batch_size=batch)


def test_the_tapped_pass_gives_the_plain_outputs_and_the_same_moments():
    model, layers, inputs, runtime = _lenet_pass()
    tapped: list = []
    with_tap = collect_stats(model, layers, inputs, runtime, want_patches=True, folds=4, outputs_into=tapped)
    without = collect_stats(model, layers, inputs, runtime, want_patches=True, folds=4)
    assert len(tapped) == 3  # 40 samples in batches of 16
    for name, stats in without.items():
        np.testing.assert_array_equal(with_tap[name].input_moment, stats.input_moment)
        np.testing.assert_array_equal(with_tap[name].patch_moment, stats.patch_moment)
    reference = tapped_reference(tapped, model, inputs, 40, runtime)
    plain = runtime.run(model, inputs)
    assert reference is not None and len(reference) == len(plain)
    for got, expected in zip(reference, plain):
        np.testing.assert_array_equal(got, expected)


def test_a_tap_that_is_not_a_plain_run_is_not_used():
    model, layers, inputs, runtime = _lenet_pass()
    tapped: list = []
    collect_stats(model, layers, inputs, runtime, outputs_into=tapped)
    assert tapped_reference(tapped[:-1], model, inputs, 40, runtime) is None  # not every sample
    assert tapped_reference([], model, inputs, 40, runtime) is None  # no pass ran (cached moments)
    tapped[0][0] = tapped[0][0].copy()
    tapped[0][0][0, 0] = np.nextafter(tapped[0][0][0, 0], np.float32(np.inf))  # one ulp off
    assert tapped_reference(tapped, model, inputs, 40, runtime) is None


def test_the_budgeted_search_uses_the_tap_and_chooses_the_same_plan(small_splits, monkeypatch):
    calib, evaluation = small_splits
    used = []
    real = P.tapped_reference
    monkeypatch.setattr(P, "tapped_reference", lambda *a: used.append(real(*a)) or used[-1])

    def compress():
        return tnopt.compress(
            str(MODELS / "lenet5.onnx"),
            budget=0.01,
            data=str(calib),
            eval_data=str(evaluation),
            cache_dir=None,
            provider="cpu",
        )[1]

    tapped = compress()
    assert used and used[-1] is not None  # the statistics pass's outputs were the reference
    monkeypatch.setattr(P, "tapped_reference", lambda *a: None)
    own_pass = compress()
    assert tapped.after.flops == own_pass.after.flops
    assert tapped.budget["drop_calibration"] == own_pass.budget["drop_calibration"]
    assert tapped.budget["baseline_calibration"] == own_pass.budget["baseline_calibration"]
    assert [(d.decision, d.method, d.rank) for d in tapped.layers] == [
        (d.decision, d.method, d.rank) for d in own_pass.layers
    ]
