"""Memory grows with one batch, not with the data set: the statistics pass over a model with large
activations stays under a traced-allocation bound far below what holding every sample's
activations would take, and its moments equal those of the whole data at once."""

from __future__ import annotations

import tracemalloc

import numpy as np
from helpers import init, make_model, tensor
from onnx import helper

from tnopt.analyze import analyze
from tnopt.profile import collect_stats
from tnopt.runtime import Runtime

SAMPLES, SIDE, CHANNELS = 256, 96, 32


def wide_convnet():
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        ],
        [tensor("x", ["N", 3, SIDE, SIDE])],
        [tensor("y", ["N", CHANNELS, SIDE, SIDE])],
        [
            init("w1", rng.standard_normal((CHANNELS, 3, 3, 3)) * 0.3),
            init("w2", rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) * 0.1),
        ],
    )


def test_statistics_pass_peak_allocation_is_one_batch():
    model = wide_convnet()
    layers = analyze(model)
    x = np.random.default_rng(1).standard_normal((SAMPLES, 3, SIDE, SIDE)).astype(np.float32)
    # Every sample's activations of the two conv inputs at once (what must never be held):
    everything = SAMPLES * (3 + CHANNELS) * SIDE * SIDE * 4
    runtime = Runtime("cpu", batch_size=8)
    tracemalloc.start()
    try:
        stats = collect_stats(model, layers, {"x": x}, runtime, want_patches=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = 72 * 2**20  # one batch (8 samples: 10 MiB of activations) + float64 chunks + patch rows
    assert everything > 4 * bound  # 330 MiB
    assert peak < bound, f"peak traced allocation {peak / 2**20:.0f} MiB ≥ {bound / 2**20:.0f} MiB"
    # Streaming changes nothing: the channel moment of conv1's input over all samples at once.
    rows = np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(stats["conv1"].input_moment, rows.T @ rows / len(rows), rtol=1e-9)
    assert stats["conv2"].patch_moment.shape == (CHANNELS * 9, CHANNELS * 9)
    assert stats["conv1"].rows == SAMPLES * SIDE * SIDE


def test_a_data_fingerprint_never_copies_the_data_set(monkeypatch):
    """The cache keys hash the calibration data: in chunks, to the digest of the whole bytes."""
    import hashlib

    from tnopt import data as D
    from tnopt.data import Dataset, Feeds

    monkeypatch.setattr(D, "HASH_CHUNK_BYTES", 2**20)

    x = np.random.default_rng(0).standard_normal((96, 3, 160, 160)).astype(np.float32)
    strided = np.ascontiguousarray(np.moveaxis(x, 1, 0)).transpose(1, 0, 2, 3)  # same values, not C-order
    for array in (x, strided):
        whole = hashlib.sha256(b"x:0" + np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
        data = Dataset(Feeds({"x": array}), None, "test")
        tracemalloc.start()
        digest = data.fingerprint()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert digest == whole
        assert peak <= 2 * 2**20 < array.nbytes / 8


def test_fidelity_metrics_never_copy_the_outputs_to_float64():
    """cosine and rel-l2 over wide outputs (a CTC recognizer's steps x classes per sample) accumulate
    in float64 a block at a time: the same values as on float64 copies, and a traced peak far below
    one such copy (2 x 27 MiB here; the old whole-array copies took several times that)."""
    from tnopt import metrics

    rng = np.random.default_rng(0)
    reference = [
        rng.random((32, 40, 2700), dtype=np.float32),
        rng.standard_normal((32, 5)).astype(np.float32),
    ]
    outputs = [r + np.float32(1e-3) * rng.standard_normal(r.shape).astype(np.float32) for r in reference]
    wide = [
        np.concatenate([np.asarray(o, np.float64).reshape(32, -1) for o in x], 1)
        for x in (reference, outputs)
    ]
    expected_cosine = np.mean(
        np.sum(wide[0] * wide[1], 1) / (np.linalg.norm(wide[0], axis=1) * np.linalg.norm(wide[1], axis=1))
    )
    expected_rel = np.sqrt(np.sum((wide[0] - wide[1]) ** 2) / np.sum(wide[0] ** 2))
    del wide
    tracemalloc.start()
    cosine = metrics.cosine(reference, outputs)
    rel = metrics.rel_l2(reference, outputs)
    error = metrics.paired_standard_error("cosine", reference, outputs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert abs(cosine - expected_cosine) < 1e-12 and abs(rel / expected_rel - 1) < 1e-12 and error > 0
    float64_copy = reference[0].size * 8
    assert peak < float64_copy / 4, (peak, float64_copy)


def test_statistics_end_holds_the_moments_once():
    """The pass's end turns each layer's sums into its moments in place, one layer at a time: it never
    holds every layer's float64 sums and means at once (ResNet-50's patch moments are 0.9 GB of sums)."""
    rng = np.random.default_rng(0)
    channels, depth, side, samples = 96, 6, 6, 16
    nodes, inits, previous = [], [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        inits.append(init(f"w{i}", rng.standard_normal((channels, channels, 3, 3)) * 0.05))
        previous = f"r{i}"
    model = make_model(
        nodes,
        [tensor("x", ["N", channels, side, side])],
        [tensor(previous, ["N", channels, side, side])],
        inits,
    )
    x = rng.standard_normal((samples, channels, side, side)).astype(np.float32)
    tracemalloc.start()
    try:
        stats = collect_stats(
            model, analyze(model), {"x": x}, Runtime("cpu", batch_size=8), want_patches=True
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = sum(s.input_moment.nbytes + s.patch_moment.nbytes for s in stats.values())
    # 18 MiB: float64 channel moments, float32 patch moments (profile.PATCH_MOMENT_DTYPE)
    assert kept == depth * (8 * channels**2 + 4 * (9 * channels) ** 2)
    # Beside the moments: the float32 sums of the layers not yet turned into moments (as large as
    # their float32 patch moments) and one layer's float64 total (5.7 MiB). Every layer's float64
    # totals at once would add 34 MiB to those (measured: 33 MiB in all; 47 MiB for 35 MiB of moments
    # when patch moments were float64).
    assert peak < 2 * kept, f"peak traced {peak / 2**20:.1f} MiB for {kept / 2**20:.1f} MiB of moments"
    # The shrinkage is unchanged: 576 patch rows < 864 features, so the diagonal gets the mean.
    rows = stats["conv0"].rows
    np.testing.assert_allclose(
        stats["conv0"].input_moment,
        np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, channels).T
        @ np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, channels)
        / rows,
        rtol=1e-9,
    )


def test_a_view_of_rows_runs_as_its_copy_and_copies_one_batch_at_a_time():
    """The correction's refit order over the calibration data is a view (tnopt.data.IndexedRows):
    runs and slices give what a copy of those rows gives, and running it copies a batch, not the set."""
    from tnopt.data import Feeds, IndexedRows

    model = wide_convnet()
    x = np.random.default_rng(2).standard_normal((64, 3, SIDE, SIDE)).astype(np.float32)
    order = np.random.default_rng(0).permutation(64)
    view, copy = Feeds({"x": x}).view(order), Feeds({"x": x}).take(order)
    assert isinstance(view["x"], IndexedRows) and view.samples() == 64 and view["x"].shape == x.shape
    runtime = Runtime("cpu", batch_size=8)
    np.testing.assert_array_equal(runtime.run(model, view)[0], runtime.run(model, copy)[0])
    np.testing.assert_array_equal(np.asarray(view.take(slice(5, 20))["x"]), copy["x"][5:20])
    np.testing.assert_array_equal(view.take(np.arange(3, 9))["x"], copy["x"][3:9])
    tracemalloc.start()
    try:
        for _ in runtime.iter_batches(model, view.take(slice(8, 64))):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Two batches of rows (0.9 MiB each) at most; a copy of the slice would be 5.9 MiB.
    assert peak < x.nbytes / 3, f"{peak / 2**20:.1f} MiB traced for {x.nbytes / 2**20:.1f} MiB of rows"
