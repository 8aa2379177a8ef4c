"""The tensor-network family: CP, the three SVD cuts, grouped Tucker-2, and `inspect --cuts`.

Planted rank: a kernel of exact rank r for the method, factorized at r, reproduces onnxruntime
outputs to 1e-5, with strides, asymmetric pads, dilation and a dynamic batch.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import MODELS
from helpers import (
    assert_equivalent,
    init,
    make_model,
    op_count,
    planted_tucker,
    relative_difference,
    run,
    tensor,
)
from onnx import helper
from tnopt.passes import METHODS, Factors, Refusal, _cp_als, _linalg
from tnopt.passes.cut import cut_matrix

import tnopt
from tnopt.analyze import analyze
from tnopt.plan import Choice
from tnopt.runner import apply_plan

RNG = np.random.default_rng(7)

GEOMETRIES = [
    {},
    {"strides": [2, 3], "pads": [1, 0, 2, 1], "dilations": [2, 1]},
    {"strides": [3, 2], "pads": [0, 2, 1, 0], "dilations": [1, 2]},
    {"strides": [2, 3], "auto_pad": "SAME_UPPER"},
    {"strides": [3, 2], "auto_pad": "SAME_LOWER"},  # onnxruntime rejects dilation with SAME_*
    {"strides": [2, 2], "auto_pad": "VALID"},
]


def planted_cp(shape, rank, seed=0):
    """A kernel of exact CP rank `rank`; unit-scale Gaussian factors are well conditioned."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((d, rank)) for d in shape]
    return _cp_als.cp_reconstruct(factors).astype(np.float32)


def planted_cut(shape, cut, rank, seed=0):
    """A kernel whose `cut` matrix has exact rank `rank`."""
    rng = np.random.default_rng(seed)
    o, i, *k = shape
    if cut == "o":
        return (
            (rng.standard_normal((o, rank)) @ rng.standard_normal((rank, i * np.prod(k, dtype=int))))
            .reshape(shape)
            .astype(np.float32)
        )
    if cut == "i":
        m = rng.standard_normal((i, rank)) @ rng.standard_normal((rank, o * np.prod(k, dtype=int)))
        return np.swapaxes(m.reshape(i, o, *k), 0, 1).astype(np.float32).copy()
    kh, kw = k
    m = rng.standard_normal((o * kh, rank)) @ rng.standard_normal((rank, i * kw))
    return m.reshape(o, kh, i, kw).transpose(0, 2, 1, 3).astype(np.float32).copy()


def conv_model(weight, attrs, spatial, bias=True, batch="N"):
    o, i = weight.shape[0], weight.shape[1] * attrs.get("group", 1)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", weight)] + ([init("b", RNG.standard_normal(o))] if bias else [])
    return make_model(
        [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)],
        [tensor("x", [batch, i, *spatial])],
        [tensor("y", 2 + len(spatial))],
        inits,
    )


def conv_layer(weight):
    """The analyzed Layer of a one-Conv model with this (O, I, kh, kw) weight (what decompose takes)."""
    return analyze(conv_model(np.asarray(weight, np.float32), {}, (8, 8)))[0]


def compress_at(model, method, rank):
    out, report = tnopt.compress(
        model, ranks={"conv": rank}, methods=[method], provider="cpu", allow_growth=True
    )
    entry = report.layers[0]
    assert entry.decision == "rewritten", entry.reason
    return out, entry


def check_batches(model, out, spatial, channels, batches=(1, 3)):
    for batch in batches:
        x = RNG.standard_normal((batch, channels, *spatial)).astype(np.float32)
        assert_equivalent(model, out, {"x": x})


# --- CP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", GEOMETRIES)
def test_cp_planted_rank(attrs):
    weight = planted_cp((10, 8, 3, 3), 5, seed=1)
    model = conv_model(weight, attrs, (13, 14))
    out, entry = compress_at(model, "cp", 5)
    assert op_count(out, "Conv") == 4 and entry.weight_error < 1e-6
    check_batches(model, out, (13, 14), 8)


def test_cp_places_each_axis_geometry_on_its_own_depthwise_conv():
    weight = planted_cp((6, 4, 3, 5), 3, seed=2)
    attrs = {"strides": [2, 3], "pads": [1, 2, 0, 1], "dilations": [2, 1]}
    model = conv_model(weight, attrs, (11, 16), bias=False)
    out, _ = compress_at(model, "cp", 3)
    nodes = {
        n.name.split("/")[-1]: {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in out.graph.node
    }
    assert nodes["depth_h"] == {
        "kernel_shape": [3, 1],
        "strides": [2, 1],
        "dilations": [2, 1],
        "pads": [1, 0, 0, 0],
        "group": 3,
    }
    assert nodes["depth_w"] == {
        "kernel_shape": [1, 5],
        "strides": [1, 3],
        "dilations": [1, 1],
        "pads": [0, 2, 0, 1],
        "group": 3,
    }
    assert "strides" not in nodes["in_1x1"] and "strides" not in nodes["out_1x1"]
    check_batches(model, out, (11, 16), 4)


def test_cp_below_planted_rank_is_not_exact():
    weight = planted_cp((10, 8, 3, 3), 5, seed=1)
    model = conv_model(weight, GEOMETRIES[1], (13, 14))
    out, entry = compress_at(model, "cp", 3)
    assert entry.weight_error > 1e-3
    with pytest.raises(AssertionError):
        check_batches(model, out, (13, 14), 8, batches=(2,))


def test_cp_refuses_grouped_and_non_2d():
    layers = analyze(conv_model(planted_cp((8, 8, 3), 2), {}, (9,)))
    assert "2-D" in METHODS["cp"].check(layers[0])
    assert METHODS["cut-o"].check(layers[0]) is None and "2-D" in METHODS["cut-spatial"].check(layers[0])


def test_cp_diagnose_flags_cancelling_components():
    rng = np.random.default_rng(3)
    a = [rng.standard_normal((d, 1)) for d in (6, 5, 3, 3)]
    b = [rng.standard_normal((d, 1)) for d in (6, 5, 3, 3)]
    eps = 1e-3
    # (a + εb)^⊗4/ε − a^⊗4/ε: an exact rank-2 CP whose two terms are ~1000x the tensor they sum to.
    factors = [np.hstack([x + eps * y, x]) for x, y in zip(a, b)]
    factors[0] = factors[0] * np.array([1 / eps, -1 / eps])
    tensor_ = _cp_als.cp_reconstruct(factors)
    reason = _cp_als.cp_diagnose(factors, float(np.linalg.norm(tensor_)))
    assert reason is not None and reason.startswith("degenerate")
    good = [rng.standard_normal((d, 3)) for d in (6, 5, 3, 3)]
    assert _cp_als.cp_diagnose(good, float(np.linalg.norm(_cp_als.cp_reconstruct(good)))) is None


def test_cp_degenerate_fit_is_refused(monkeypatch):
    """Border-rank tensor (rank 4, approximable at rank 2 only by diverging components): ALS swamps
    with components cancelling each other; the fit comes back as a typed `Refusal`."""
    rng = np.random.default_rng(4)
    a = [rng.standard_normal(d) for d in (6, 5, 3, 3)]
    b = [rng.standard_normal(d) for d in (6, 5, 3, 3)]
    weight = sum(np.einsum("a,b,c,d->abcd", *[b[m] if m == k else a[m] for m in range(4)]) for k in range(4))
    weight = weight.astype(np.float32)
    clean = METHODS["cp"].decompose(conv_layer(weight), 2)
    assert isinstance(clean, Factors) and clean.notes["norm_ratio"] > 1.5  # cancelling, below the limit
    monkeypatch.setattr(_cp_als, "CP_MAX_NORM_RATIO", 1.5)
    refusal = METHODS["cp"].decompose(conv_layer(weight), 2)
    assert isinstance(refusal, Refusal) and refusal.reason.startswith("degenerate")
    assert refusal.notes["degenerate"] and refusal.rel_error == clean.rel_error


def test_cp_is_deterministic():
    weight = RNG.standard_normal((12, 10, 3, 3)).astype(np.float32)
    layer = conv_layer(weight)
    first, second = METHODS["cp"].decompose(layer, 7), METHODS["cp"].decompose(layer, 7)
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in first.arrays)
    assert first.rel_error < 1


# --- cuts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", GEOMETRIES)
@pytest.mark.parametrize("cut", ["o", "i", "spatial"])
def test_cut_planted_rank_2d(cut, attrs):
    weight = planted_cut((10, 6, 3, 5), cut, 4, seed=5)
    model = conv_model(weight, attrs, (12, 17))
    out, entry = compress_at(model, f"cut-{cut}", 4)
    assert op_count(out, "Conv") == 2 and entry.weight_error < 1e-6
    check_batches(model, out, (12, 17), 6)


@pytest.mark.parametrize("cut", ["o", "i"])
def test_cut_planted_rank_conv1d_and_conv3d(cut):
    w1 = planted_cut((9, 5, 4), cut, 3, seed=6)
    m1 = conv_model(w1, {"strides": [2], "pads": [2, 1], "dilations": [2]}, (23,))
    o1, _ = compress_at(m1, f"cut-{cut}", 3)
    check_batches(m1, o1, (23,), 5)
    w3 = planted_cut((7, 4, 3, 2, 3), cut, 2, seed=7)
    m3 = conv_model(w3, {"strides": [2, 1, 3], "pads": [1, 0, 2, 0, 1, 1], "dilations": [1, 2, 1]}, (7, 6, 9))
    o3, _ = compress_at(m3, f"cut-{cut}", 2)
    check_batches(m3, o3, (7, 6, 9), 4)


def test_cut_spatial_places_axis_geometry():
    weight = planted_cut((6, 4, 3, 5), "spatial", 2, seed=8)
    model = conv_model(weight, {"strides": [2, 3], "pads": [1, 2, 0, 1], "dilations": [2, 1]}, (11, 16))
    out, _ = compress_at(model, "cut-spatial", 2)
    nodes = {
        n.name.split("/")[-1]: {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in out.graph.node
    }
    assert nodes["row"]["kernel_shape"] == [1, 5] and nodes["row"]["strides"] == [1, 3]
    assert nodes["row"]["pads"] == [0, 2, 0, 1]
    assert nodes["column"]["kernel_shape"] == [3, 1] and nodes["column"]["strides"] == [2, 1]
    assert nodes["column"]["dilations"] == [2, 1] and nodes["column"]["pads"] == [1, 0, 0, 0]


@pytest.mark.parametrize("cut", ["o", "i", "spatial"])
def test_cut_below_planted_rank_is_not_exact(cut):
    weight = planted_cut((10, 6, 3, 5), cut, 4, seed=5)
    model = conv_model(weight, GEOMETRIES[1], (12, 17))
    out, entry = compress_at(model, f"cut-{cut}", 3)
    assert entry.weight_error > 1e-3
    with pytest.raises(AssertionError):
        check_batches(model, out, (12, 17), 6, batches=(2,))


def test_cut_costs_match_the_emitted_initializers():
    weight = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
    model = conv_model(weight, {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (12, 12), bias=False, batch=1)
    layer = analyze(model)[0]
    for name, rank in [("cut-o", 5), ("cut-i", 5), ("cut-spatial", 5), ("cp", 6)]:
        out, _ = compress_at(model, name, rank)
        stored = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
        assert METHODS[name].cost(layer, rank).params == stored, name


def test_cut_matrix_rank_matches_planting():
    for cut in ("o", "i", "spatial"):
        weight = planted_cut((8, 6, 3, 3), cut, 3, seed=9)
        assert np.linalg.matrix_rank(cut_matrix(weight, cut), tol=1e-4) == 3


# --- inspect --cuts ------------------------------------------------------------------------------------


def run_cli(*args):
    from helpers import cli

    return cli(*args)


def test_inspect_cuts_table_and_json():
    table = run_cli("inspect", "--cuts", str(MODELS / "cnn4.onnx"))
    assert table.returncode == 0, table.stderr
    assert "O|Ikk" in table.stdout and "Okh|Ikw" in table.stdout and "/7/Conv" in table.stdout
    result = run_cli("inspect", "--cuts", "--json", str(MODELS / "cnn4.onnx"))
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    convs = [layer for layer in analyze_file(MODELS / "cnn4.onnx") if layer.op == "Conv"]
    assert len(records) == 3 * len(convs)
    for record in records:
        fractions = [record["kept"][f]["norm_fraction"] for f in ("2", "4", "8")]
        present = [x for x in fractions if x is not None]
        assert all(0 < x <= 1 + 1e-9 for x in present)
        assert present == sorted(present, reverse=True)  # more compression keeps less norm
        m, n = record["matrix"]
        for f in ("2", "4", "8"):
            r = record["kept"][f]["rank"]
            assert r is None or r * (m + n) <= m * n / int(f)
    first = records[0]  # 32x1x3x3: the O|Ikk cut is 32x9; at 8x not even rank 1 fits
    assert first["layer"] == "/0/Conv" and first["kept"]["8"]["rank"] is None


def analyze_file(path):
    import onnx

    return analyze(onnx.load(str(path)))


def test_kept_norm_fraction_and_param_ratio_rank():
    values = np.array([3.0, 4.0])
    assert _linalg.kept_norm_fraction(values, 1) == pytest.approx(0.6)
    assert _linalg.kept_norm_fraction(values, 2) == pytest.approx(1.0)
    assert _linalg.rank_for_param_ratio(64, 576, 2) == 28  # 28·640 = 17920 ≤ 18432 < 29·640
    assert _linalg.rank_for_param_ratio(32, 9, 8) == 0


# --- grouped Tucker-2 ----------------------------------------------------------------------------------


def planted_grouped(o, i_g, kernel, groups, ranks, seed=0):
    blocks = [planted_tucker(o // groups, i_g, kernel, ranks, seed=seed + j) for j in range(groups)]
    return np.concatenate(blocks, axis=0)


@pytest.mark.parametrize("attrs", GEOMETRIES[:4])
def test_tucker2_grouped_planted_rank(attrs):
    weight = planted_grouped(12, 4, (3, 3), 3, (2, 3), seed=11)  # 12 out, 12 in, 3 groups of 4 → 4
    model = conv_model(weight, dict(attrs, group=3), (13, 14))
    assert analyze(model)[0].candidate
    out, entry = compress_at(model, "tucker2-grouped", (2, 3))
    assert op_count(out, "Conv") == 3 and entry.weight_error < 1e-6 and entry.rank == "2x3"
    groups = [helper.get_attribute_value(a) for n in out.graph.node for a in n.attribute if a.name == "group"]
    assert groups == [3, 3, 3]
    check_batches(model, out, (13, 14), 12)


def test_tucker2_grouped_conv1d_and_below_planted_rank():
    weight = planted_grouped(8, 6, (5,), 2, (2, 2), seed=12)
    model = conv_model(weight, {"group": 2, "strides": [2], "pads": [2, 1]}, (21,))
    out, _ = compress_at(model, "tucker2-grouped", (2, 2))
    check_batches(model, out, (21,), 12)
    out, entry = compress_at(model, "tucker2-grouped", (1, 2))
    assert entry.weight_error > 1e-3
    with pytest.raises(AssertionError):
        check_batches(model, out, (21,), 12, batches=(2,))


def test_grouped_and_depthwise_routing():
    grouped = analyze(conv_model(planted_grouped(8, 4, (3, 3), 2, (2, 2)), {"group": 2}, (9, 9)))[0]
    depthwise = analyze(conv_model(RNG.standard_normal((8, 1, 3, 3)), {"group": 8}, (9, 9)))[0]
    plain = analyze(conv_model(planted_cp((8, 8, 3, 3), 2), {}, (9, 9)))[0]
    assert grouped.candidate and "depthwise" in depthwise.skip_reason
    for name in ("tucker2", "cp", "cut-o", "cut-i", "cut-spatial"):
        assert "group" in METHODS[name].check(grouped)
    assert METHODS["tucker2-grouped"].check(grouped) is None
    assert METHODS["tucker2-grouped"].check(plain) is not None
    assert METHODS["tucker2-grouped"].check(depthwise) is not None
    layer = grouped
    rank = METHODS["tucker2-grouped"].rank_from_ratio(layer, 0.5)
    assert rank == (2, 2)  # the group count is the layer's, not part of the rank
    assert METHODS["tucker2-grouped"].rank_from_energy(layer, 0.999999) == (2, 2)
    factors = METHODS["tucker2-grouped"].decompose(layer, rank)
    assert METHODS["tucker2-grouped"].cost(layer, rank).params == sum(a.size for a in factors.arrays.values())


# --- data-aware factors and the sequential correction ---------------------------------------------------


def correlated_moment(n, seed=0):
    """A channel moment with a fast-decaying spectrum: real activations excite few directions."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0, -4, n)) @ q.T


@pytest.mark.parametrize("name", ["cut-o", "cut-i", "cut-spatial", "cp"])
def test_data_aware_planted_rank_stays_exact(name):
    weight = (
        planted_cp((8, 6, 3, 3), 3, seed=13)
        if name == "cp"
        else planted_cut((8, 6, 3, 3), name.split("-")[1], 3, seed=13)
    )
    stats = SimpleNamespace(input_moment=correlated_moment(6), patch_moment=None)
    factors = METHODS[name].decompose(conv_layer(weight), 3, stats)
    assert factors.notes["data_aware"] and factors.rel_error < 1e-5


@pytest.mark.parametrize("cut", ["o", "i", "spatial"])
def test_data_aware_cut_lowers_the_output_error(cut):
    """On inputs whose channels are strongly correlated, the whitened cut loses less output than the
    plain one at the same rank (measured in onnxruntime, not in the weight norm)."""
    weight = RNG.standard_normal((8, 6, 3, 3)).astype(np.float32)
    moment = correlated_moment(6, seed=14)
    model = conv_model(weight, {"pads": [1, 1, 1, 1]}, (10, 10), bias=False)
    layer = analyze(model)[0]
    x = np.einsum(
        "ij,njhw->nihw", np.linalg.cholesky(moment + 1e-9 * np.eye(6)), RNG.standard_normal((4, 6, 10, 10))
    ).astype(np.float32)
    errors = {}
    for mode, stats in (("plain", None), ("white", SimpleNamespace(input_moment=moment, patch_moment=None))):
        factors = METHODS[f"cut-{cut}"].decompose(layer, 3, stats)
        out, _ = apply_plan(model, [Choice(layer, f"cut-{cut}", factors)])
        expected, got = run(model, {"x": x})[0], run(out, {"x": x})[0]
        errors[mode] = relative_difference(expected, got)
    assert errors["white"] < 0.9 * errors["plain"], errors


def test_sequential_correction_runs_for_cp_and_cut_o():
    weight = RNG.standard_normal((8, 6, 3, 3)).astype(np.float32)
    model = conv_model(weight, {"pads": [1, 1, 1, 1], "strides": [2, 1]}, (10, 10))
    data = {"x": RNG.standard_normal((16, 6, 10, 10)).astype(np.float32)}
    for name in ("cp", "cut-o"):
        _, plain = tnopt.compress(
            model,
            ranks={"conv": 3},
            methods=[name],
            provider="cpu",
            data=data,
            data_aware=False,
            correct=False,
        )
        _, fixed = tnopt.compress(
            model,
            ranks={"conv": 3},
            methods=[name],
            provider="cpu",
            data=data,
            data_aware=False,
            correct=True,
        )
        assert fixed.metrics["rel-l2"] < plain.metrics["rel-l2"], name


def test_mttkrp_matches_the_khatri_rao_definition():
    for shape in [(6, 5, 3, 3), (7, 4, 2, 3, 5)]:
        x = RNG.standard_normal(shape)
        factors = [RNG.standard_normal((d, 4)) for d in shape]
        for mode in range(len(shape)):
            others = [factors[m] for m in range(len(shape)) if m != mode]
            expected = _linalg.unfold(x, mode) @ _cp_als.khatri_rao(others)
            np.testing.assert_allclose(_cp_als._mttkrp(x, factors, mode), expected, rtol=1e-10, atol=1e-10)
