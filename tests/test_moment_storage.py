"""How the calibration moments are stored for the search (their bytes are what it holds longest): a
pointwise (1x1, unit stride, no padding) conv's patch moment is its channel moment (one array for both,
one set of fold sums, equal to the moment collected separately); patch moments in float32; the
whitening's damping added without an identity matrix beside the moment."""

from __future__ import annotations

import numpy as np
from helpers import init, make_model, relative_difference, tensor
from onnx import helper

from tnopt import profile
from tnopt.analyze import analyze
from tnopt.fold_stats import held_out
from tnopt.profile import collect_stats, load_stats, save_stats
from tnopt.runtime import Runtime

C, SIDE, SAMPLES = 6, 10, 20


def convnet():
    """x → conv3 (3x3) → Relu → point (1x1) and stride2 (1x1, stride 2), summed by shape-matched paths."""
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w3"], ["a"], name="conv3", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "wp"], ["p"], name="point"),
            helper.make_node("Conv", ["r", "ws"], ["s"], name="stride2", strides=[2, 2]),
        ],
        [tensor("x", ["N", C, SIDE, SIDE])],
        [tensor("p", ["N", C, SIDE, SIDE]), tensor("s", ["N", C, SIDE // 2, SIDE // 2])],
        [
            init("w3", rng.standard_normal((C, C, 3, 3)) * 0.3),
            init("wp", rng.standard_normal((C, C, 1, 1)) * 0.3),
            init("ws", rng.standard_normal((C, C, 1, 1)) * 0.3),
        ],
    )
    return model, [layer for layer in analyze(model) if layer.candidate]


def _stats(folds=4):
    model, layers = convnet()
    x = np.random.default_rng(1).standard_normal((SAMPLES, C, SIDE, SIDE)).astype(np.float32) + 0.3
    runtime = Runtime("cpu", batch_size=6)
    return collect_stats(model, layers, {"x": x}, runtime, want_patches=True, folds=folds)


def test_pointwise_patch_moment_is_the_channel_moment_and_equals_the_separate_one(monkeypatch):
    stats = _stats()
    point = stats["point"]
    assert point.patch_moment is point.input_moment  # one array, not two
    assert point.fold_patch_moments is point.fold_moments and point.fold_patch_rows == point.fold_rows
    # Layers whose patches are not their channel rows keep their own patch moments.
    for name in ("conv3", "stride2"):
        item = stats[name]
        assert item.patch_moment is not None and item.patch_moment is not item.input_moment
    assert stats["conv3"].patch_moment.shape == (C * 9, C * 9)
    # Collected separately (the im2col rows), the same moment and fold sums.
    monkeypatch.setattr(profile, "pointwise", lambda layer: False)
    separate = _stats()["point"]
    assert separate.patch_moment is not separate.input_moment
    assert relative_difference(separate.patch_moment, point.patch_moment) < 1e-6
    for mine, theirs in zip(point.fold_patch_moments, separate.fold_patch_moments):
        assert relative_difference(theirs, mine) < 1e-6
    assert separate.fold_patch_rows == point.fold_rows
    for fold in range(4):
        shared, apart = held_out(point, fold), held_out(separate, fold)
        assert shared.patch_moment is shared.input_moment
        assert relative_difference(apart.patch_moment, shared.patch_moment) < 1e-6
        assert relative_difference(apart.input_moment, shared.input_moment) < 1e-12


def test_saved_statistics_keep_the_sharing(tmp_path):
    stats = _stats()
    path = tmp_path / "stats.npz"
    save_stats(path, stats)
    with np.load(path) as archive:  # the pointwise patch moment is saved once, as the channel moment
        assert len(archive.files) == 1 + sum(
            1 + len(s.fold_moments or []) + (s.patch_moment is not s.input_moment) * (1 + len(s.fold_moments))
            for s in stats.values()
        )
    loaded = load_stats(path)
    assert set(loaded) == set(stats)
    for name, item in stats.items():
        again = loaded[name]
        np.testing.assert_array_equal(again.input_moment, item.input_moment)
        np.testing.assert_array_equal(again.patch_moment, item.patch_moment)
        assert (again.patch_moment is again.input_moment) == (item.patch_moment is item.input_moment)
        assert again.fold_patch_rows == item.fold_patch_rows
        for a, b in zip(again.fold_patch_moments, item.fold_patch_moments):
            np.testing.assert_array_equal(a, b)


def test_patch_moments_are_kept_in_float32_and_equal_the_float64_im2col_moment():
    from passes.cut import input_side_moment

    model, layers = convnet()
    x = np.random.default_rng(1).standard_normal((SAMPLES, C, SIDE, SIDE)).astype(np.float32) + 0.3
    stats = collect_stats(model, layers[:1], {"x": x}, Runtime("cpu", batch_size=6), want_patches=True)
    patch = stats["conv3"].patch_moment
    assert patch.dtype == np.float32  # half the bytes of float64 for the search's largest arrays
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, C * 9)
    assert relative_difference(rows.T @ rows / len(rows), patch) < 1e-6
    # The spatial cut's row-segment moment is averaged in float64.
    segment = input_side_moment((C, C, 3, 3), "spatial", stats["conv3"])
    assert segment.dtype == np.float64 and segment.shape == (C * 3, C * 3)


def test_whitening_adds_the_damping_without_an_identity_and_the_same_sums(monkeypatch):
    from passes import _linalg

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((40, 30))
    moment = rows.T @ rows / 40
    expected = np.linalg.cholesky(moment + 1e-3 * np.mean(np.diag(moment)) * np.eye(30))
    made = []
    monkeypatch.setattr(_linalg.np, "eye", lambda *a, **k: made.append(a) or np.eye(*a, **k))
    np.testing.assert_array_equal(_linalg._damped_cholesky(moment, 1e-3), expected)
    assert made == []
