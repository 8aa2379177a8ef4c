"""Data-aware factors: whitening truncates the output error itself; the correction refits."""

import numpy as np
from helpers import init, make_model, tensor
from onnx import helper
from tnopt.passes import _linalg

import tnopt


def anisotropic_inputs(rows=4000, features=64, seed=0):
    """Inputs whose energy spans 4 orders of magnitude across random directions."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((features, features)))
    return (rng.standard_normal((rows, features)) * np.logspace(4, -4, features)) @ basis.T


def output_error(x, w, approx):
    return np.linalg.norm(x @ (w - approx)) / np.linalg.norm(x @ w)


def test_whitened_svd_cuts_output_error_and_equals_its_discarded_spectrum():
    x = anisotropic_inputs()
    w = np.random.default_rng(1).standard_normal((64, 48))
    rank = 8
    a, b, _ = _linalg.truncated_svd(w, rank)
    plain = output_error(x, w, a @ b)
    moment = x.T @ x / len(x)
    a, b, _, predicted = _linalg.whitened_svd(w, moment, rank, damping=0.0)
    whitened = output_error(x, w, a @ b)
    assert whitened < plain / 5, (whitened, plain)
    # The identity the method rests on: output error = discarded singular values of SᵀW.
    assert abs(whitened - predicted) <= 1e-8 * max(predicted, 1e-12) + 1e-10
    spectrum = np.linalg.svd(np.linalg.cholesky(moment).T @ w, compute_uv=False)
    assert np.isclose(predicted, np.sqrt(np.sum(spectrum[rank:] ** 2) / np.sum(spectrum**2)))


def test_whitened_tucker2_beats_weight_only_on_correlated_channels():
    rng = np.random.default_rng(2)
    x = anisotropic_inputs(rows=3000, features=16, seed=3)  # rows = pixels, features = channels
    w = rng.standard_normal((24, 16, 3, 3))
    moment = x.T @ x / len(x)

    def channel_output_error(u_out, core, u_in):
        approx = _linalg.mode_product(_linalg.mode_product(core, u_out, 0), u_in, 1)
        # Per kernel tap, the channel mixing error weighted by the input moment.
        diff = (w - approx).transpose(2, 3, 0, 1).reshape(-1, 24, 16)
        full = w.transpose(2, 3, 0, 1).reshape(-1, 24, 16)
        err = sum(np.trace(d @ moment @ d.T) for d in diff)
        return np.sqrt(err / sum(np.trace(f @ moment @ f.T) for f in full))

    plain = channel_output_error(*_linalg.partial_tucker(w, (12, 4))[:3])
    whitened = channel_output_error(*_linalg.whitened_partial_tucker(w, (12, 4), moment, damping=0.0)[:3])
    assert whitened < plain / 3, (whitened, plain)


def _two_layer_model(seed=4):
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((64, 64)) / 8, rng.standard_normal((64, 10)) / 8
    return make_model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2"),
        ],
        [tensor("x", ["N", 64])],
        [tensor("y", ["N", 10])],
        [init("w1", w1), init("b1", rng.standard_normal(64)), init("w2", w2)],
    )


def test_pipeline_data_aware_and_correction_reduce_output_error():
    model = _two_layer_model()
    data = {"x": anisotropic_inputs(rows=1024, features=64, seed=5).astype(np.float32)}
    errors = {}
    for label, flags in {
        "weight": dict(data_aware=False, correct=False),
        "white": dict(correct=False),
        "white+corr": dict(),
    }.items():
        _, report = tnopt.compress(model, rank_ratio=0.125, methods="svd", data=data, provider="cpu", **flags)
        errors[label] = report.metrics["rel-l2"]
        assert report.factors["data_aware"] == (label != "weight")
    assert errors["white"] < errors["weight"] / 1.5, errors
    assert errors["white+corr"] <= errors["white"] * 1.001, errors


def test_correction_refits_bias_of_gemm():
    model = _two_layer_model(seed=6)
    data = {"x": anisotropic_inputs(rows=512, features=64, seed=7).astype(np.float32)}
    compressed, report = tnopt.compress(model, rank_ratio=0.25, methods="svd", data=data, provider="cpu")
    assert all(entry.factor_notes.get("corrected") for entry in report.rewritten)
    biases = [i.name for i in compressed.graph.initializer if i.name.endswith("/bias")]
    assert sorted(biases) == ["fc1/svd/bias", "fc2/svd/bias"]


def test_statistics_are_cached_like_the_sensitivities(tmp_path):
    model = _two_layer_model(seed=8)
    data = {"x": anisotropic_inputs(rows=256, features=64, seed=9).astype(np.float32)}
    runs = [
        tnopt.compress(
            model, rank_ratio=0.25, methods="svd", data=data, provider="cpu", cache_dir=str(tmp_path)
        )
        for _ in range(2)
    ]
    assert runs[0][1].timings["stats_cached_layers"] == 0
    assert runs[1][1].timings["stats_cached_layers"] == 2
    assert runs[0][1].metrics["rel-l2"] == runs[1][1].metrics["rel-l2"]
    assert len(list(tmp_path.glob("*-stats3.npz"))) == 1


def test_moment_from_fewer_rows_than_features_is_shrunk():
    from tnopt.moment_sums import shrunk

    rng = np.random.default_rng(10)
    x = rng.standard_normal((20, 50))
    moment = x.T @ x / 20
    assert np.linalg.matrix_rank(moment) == 20
    fixed = shrunk(moment, 20)
    assert np.linalg.matrix_rank(fixed) == 50
    # Unseen directions now weigh as much as an average seen one: the smallest eigenvalue is
    # (d/n − 1)·mean(diag), comparable to the mean eigenvalue of the seen span.
    assert np.linalg.eigvalsh(fixed).min() >= (50 / 20 - 1) * np.mean(np.diag(moment)) * 0.999
    x_many = rng.standard_normal((500, 50))
    np.testing.assert_array_equal(shrunk(x_many.T @ x_many / 500, 500), x_many.T @ x_many / 500)
