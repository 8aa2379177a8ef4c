"""A run without a cache directory never hashes the calibration data for a cache key it cannot use
(ResNet-50's 308 MB of crops, ~1 s); with one, the key is made as before."""

from __future__ import annotations

from conftest import MODELS

import tnopt
from tnopt.data import Dataset


def test_the_sensitivity_cache_key_is_made_only_for_a_cache_file(small_splits, monkeypatch, tmp_path):
    calib, evaluation = small_splits
    fingerprints = []
    plain = Dataset.fingerprint
    monkeypatch.setattr(Dataset, "fingerprint", lambda self: fingerprints.append(1) or plain(self))

    def compress(cache_dir):
        return tnopt.compress(
            str(MODELS / "lenet5.onnx"),
            budget=0.01,
            data=str(calib),
            eval_data=str(evaluation),
            cache_dir=cache_dir,
            provider="cpu",
            data_aware=False,
        )[1]

    uncached = compress(None)
    assert fingerprints == [] and uncached.search["cache_file"] is None
    cached = compress(str(tmp_path / "cache"))
    assert fingerprints and cached.search["cache_file"]
    assert cached.after.flops == uncached.after.flops
