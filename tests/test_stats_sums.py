"""The statistics' moment sums, accumulated in place (tnopt/moment_sums.py `GramSums`): the total moment is
the sum of the fold moments, layers reading one tensor share one set of sums, and a pass whose rows
stop splitting by sample keeps every row in its total."""

import numpy as np
from helpers import init, make_model, relative_difference, tensor
from onnx import helper

from tnopt import profile
from tnopt.analyze import analyze
from tnopt.moment_sums import GramSums
from tnopt.profile import collect_stats
from tnopt.runtime import Runtime

C, SIDE, SAMPLES = 6, 12, 24


def block():
    """x → conv_a (3x3) → Relu → conv_b (3x3), and a 1x1 shortcut conv_s reading x like conv_a."""
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["x", "ws"], ["s"], name="conv_s"),
            helper.make_node("Add", ["b", "s"], ["y"]),
        ],
        [tensor("x", ["N", C, SIDE, SIDE])],
        [tensor("y", ["N", C, SIDE, SIDE])],
        [
            init("wa", rng.standard_normal((C, C, 3, 3)) * 0.3),
            init("wb", rng.standard_normal((C, C, 3, 3)) * 0.3),
            init("ws", rng.standard_normal((C, C, 1, 1)) * 0.3),
        ],
    )
    return model, [layer for layer in analyze(model) if layer.candidate]


def test_economy_total_moment_is_the_sum_of_the_fold_moments(monkeypatch):
    monkeypatch.setattr(profile, "EXACT_STATS_MAX_FLOPS", 1.0)  # sampled rows, float32 products
    model, layers = block()
    x = np.random.default_rng(1).standard_normal((SAMPLES, C, SIDE, SIDE)).astype(np.float32) + 0.5
    stats = collect_stats(model, layers, {"x": x}, Runtime("cpu", batch_size=5), want_patches=True, folds=4)
    for layer in layers:
        item = stats[layer.name]
        assert item.rows < SAMPLES * SIDE * SIDE  # economy: a sample of the positions
        assert len(item.fold_moments) == 4 and sum(item.fold_rows) == item.rows
        folded = sum(m.astype(np.float64) for m in item.fold_moments) / item.rows
        assert relative_difference(item.input_moment, folded) < 1e-6
        np.testing.assert_array_equal(item.input_moment, item.input_moment.T)
        for moment in item.fold_moments:
            np.testing.assert_array_equal(moment, moment.T)
            assert np.all(np.linalg.eigvalsh(moment.astype(np.float64)) > -1e-3 * np.trace(moment))
        if item.patch_moment is not None:
            assert sum(item.fold_patch_rows) > 0
            folded = sum(m.astype(np.float64) for m in item.fold_patch_moments) / sum(item.fold_patch_rows)
            assert relative_difference(item.patch_moment, folded) < 1e-6
    # The shortcut reads x as conv_a does: the same rows, one set of sums.
    np.testing.assert_array_equal(stats["conv_a"].input_moment, stats["conv_s"].input_moment)
    assert stats["conv_a"].fold_rows == stats["conv_s"].fold_rows
    assert relative_difference(stats["conv_a"].input_moment, stats["conv_b"].input_moment) > 1e-2


def test_exact_sums_equal_the_whole_data_moment_with_and_without_folds():
    model, layers = block()
    x = np.random.default_rng(2).standard_normal((SAMPLES, C, SIDE, SIDE)).astype(np.float32)
    rows = np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, C)
    expected = rows.T @ rows / len(rows)
    for folds in (None, 4):
        stats = collect_stats(model, layers, {"x": x}, Runtime("cpu", batch_size=7), folds=folds)
        for name in ("conv_a", "conv_s"):
            np.testing.assert_allclose(stats[name].input_moment, expected, rtol=1e-10)
            assert stats[name].rows == len(rows)
        if folds:
            by_fold = np.arange(SAMPLES) % 4
            for fold in range(4):
                part = np.moveaxis(x[by_fold == fold].astype(np.float64), 1, -1).reshape(-1, C)
                assert relative_difference(stats["conv_a"].fold_moments[fold], part.T @ part) < 1e-6


def test_a_batch_that_does_not_split_by_sample_drops_the_folds_and_keeps_its_rows():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((10, 5)).astype(np.float32) for _ in range(3)]
    gram = GramSums(4, np.float32)
    sample_folds = np.array([0, 1, 2, 3, 0])
    for rows in batches[:2]:
        gram.add(rows, np.repeat(np.arange(5), 2), sample_folds)
    twin = gram.copy()
    assert gram.fold_sums is not None
    gram.add(batches[2], None, sample_folds)
    assert gram.fold_sums is None and gram.count == 30
    every = np.concatenate(batches).astype(np.float64)
    assert relative_difference(gram.total(), every.T @ every) < 1e-6
    # The copy taken before is its own: it still has the first two batches, by fold.
    first = np.concatenate(batches[:2]).astype(np.float64)
    assert twin.count == 20 and relative_difference(twin.total(), first.T @ first) < 1e-6
    sums, counts = twin.folds_result()
    assert counts == [8, 4, 4, 4]  # samples 0 and 4 are in fold 0
    assert relative_difference(sum(s.astype(np.float64) for s in sums), first.T @ first) < 1e-6
