"""Planted rank: a weight of exact rank r factorized at r reproduces onnxruntime outputs (1e-5)."""

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, op_count, planted_matrix, planted_tucker, tensor
from onnx import helper, numpy_helper

import tnopt

RNG = np.random.default_rng(1)


def compress_at(model, ranks, **kwargs):
    out, report = tnopt.compress(model, ranks=ranks, provider="cpu", allow_growth=True, **kwargs)
    assert [entry.decision for entry in report.layers if entry.name in ranks] == ["rewritten"] * len(ranks)
    return out, report


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"strides": [3, 2], "pads": [0, 2, 1, 0], "dilations": [2, 1]},
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_tucker2_conv_planted_rank(attrs, bias):
    weight = planted_tucker(16, 12, (3, 3), (5, 4), seed=3)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", weight)] + ([init("b", RNG.standard_normal(16))] if bias else [])
    model = make_model(
        [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)],
        [tensor("x", ["N", 12, 13, 11])],
        [tensor("y", 4)],
        inits,
    )
    out, report = compress_at(model, {"conv": (5, 4)})
    assert op_count(out, "Conv") == 3
    x = RNG.standard_normal((3, 12, 13, 11)).astype(np.float32)
    assert_equivalent(model, out, {"x": x})
    assert report.layers[0].weight_error < 1e-6


def test_tucker2_stride_sits_on_core_conv():
    weight = planted_tucker(8, 8, (3, 3), (2, 2))
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=[2, 2])],
        [tensor("x", [1, 8, 9, 9])],
        [tensor("y", 4)],
        [init("w", weight)],
    )
    out, _ = compress_at(model, {"conv": (2, 2)})
    strides = {n.name: [list(a.ints) for a in n.attribute if a.name == "strides"] for n in out.graph.node}
    assert strides["conv/tucker2/core"] == [[2, 2]]
    assert not any(strides["conv/tucker2/in_1x1"]) and not any(strides["conv/tucker2/out_1x1"])


GEMM_CASES = [
    dict(transA=0, transB=0, alpha=1.0, beta=1.0),
    dict(transA=1, transB=0, alpha=1.0, beta=1.0),
    dict(transA=0, transB=1, alpha=0.5, beta=1.0),
    dict(transA=1, transB=1, alpha=2.0, beta=0.25),
    dict(transA=0, transB=1, alpha=1.5, beta=3.0),
]


@pytest.mark.parametrize("attrs", GEMM_CASES)
@pytest.mark.parametrize("with_c", [True, False])
def test_svd_gemm_planted_rank(attrs, with_c):
    m, k, n, r = 6, 20, 14, 3
    w = planted_matrix(k, n, r, seed=4)
    b = w.T if attrs["transB"] else w
    a_shape = [k, "M"] if attrs["transA"] else ["M", k]
    inputs = ["a", "b"] + (["c"] if with_c else [])
    inits = [init("b", b)] + ([init("c", RNG.standard_normal(n))] if with_c else [])
    model = make_model(
        [helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)],
        [tensor("a", a_shape)],
        [tensor("y", 2)],
        inits,
    )
    out, _ = compress_at(model, {"gemm": r})
    assert op_count(out, "Gemm") == 2
    a = RNG.standard_normal((k, m) if attrs["transA"] else (m, k)).astype(np.float32)
    assert_equivalent(model, out, {"a": a})


def test_svd_matmul_3d_activations_dynamic_dims():
    w = planted_matrix(24, 40, 5, seed=5)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", "seq", 24])],
        [tensor("y", 3)],
        [init("w", w)],
    )
    out, _ = compress_at(model, {"mm": 5})
    assert op_count(out, "MatMul") == 2
    for shape in [(1, 7, 24), (4, 3, 24)]:
        assert_equivalent(model, out, {"x": RNG.standard_normal(shape).astype(np.float32)})
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]


def test_svd_matmul_weight_on_the_left():
    w = planted_matrix(10, 16, 3, seed=6)
    model = make_model(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")],
        [tensor("x", ["batch", 16, 5])],
        [tensor("y", 3)],
        [init("w", w)],
    )
    out, _ = compress_at(model, {"mm": 3})
    assert_equivalent(model, out, {"x": RNG.standard_normal((2, 16, 5)).astype(np.float32)})


def test_weight_from_constant_node_and_through_transpose():
    w = planted_matrix(18, 12, 4, seed=7)
    const = helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(w.T.copy(), "value"))
    transpose = helper.make_node("Transpose", ["w_const"], ["w_t"], perm=[1, 0])
    matmul = helper.make_node("MatMul", ["x", "w_t"], ["y"], name="mm")
    model = make_model([const, transpose, matmul], [tensor("x", ["N", 18])], [tensor("y", 2)])
    out, report = compress_at(model, {"mm": 4})
    assert report.layers[0].decision == "rewritten"
    assert op_count(out, "Transpose") == 0 and op_count(out, "Constant") == 0  # dead weight path removed
    assert_equivalent(model, out, {"x": RNG.standard_normal((5, 18)).astype(np.float32)})


def test_conv_weight_through_identity_of_constant():
    weight = planted_tucker(10, 6, (3, 3), (3, 2), seed=8)
    const = helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(weight, "value"))
    ident = helper.make_node("Identity", ["w0"], ["w"])
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model([const, ident, conv], [tensor("x", ["N", 6, 8, 8])], [tensor("y", 4)])
    out, _ = compress_at(model, {"conv": (3, 2)})
    assert_equivalent(model, out, {"x": RNG.standard_normal((2, 6, 8, 8)).astype(np.float32)})


def test_conv1d_and_conv3d_share_the_tucker2_code():
    w1 = planted_tucker(12, 8, (5,), (3, 2), seed=9)
    m1 = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c1", strides=[2], pads=[2, 1])],
        [tensor("x", ["N", 8, 30])],
        [tensor("y", 3)],
        [init("w", w1)],
    )
    o1, _ = compress_at(m1, {"c1": (3, 2)})
    assert_equivalent(m1, o1, {"x": RNG.standard_normal((2, 8, 30)).astype(np.float32)})
    w3 = planted_tucker(8, 6, (3, 3, 3), (2, 3), seed=10)
    m3 = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c3", pads=[1, 0, 1, 0, 1, 1])],
        [tensor("x", ["N", 6, 7, 6, 5])],
        [tensor("y", 5)],
        [init("w", w3)],
    )
    o3, _ = compress_at(m3, {"c3": (2, 3)})
    assert_equivalent(m3, o3, {"x": RNG.standard_normal((2, 6, 7, 6, 5)).astype(np.float32)})


def test_truncation_below_planted_rank_is_not_exact():
    """The exactness tests could not pass by accident: one rank less must show an error."""
    w = planted_matrix(20, 14, 4, seed=11)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["N", 20])],
        [tensor("y", 2)],
        [init("w", w)],
    )
    out, _ = compress_at(model, {"mm": 3})
    with pytest.raises(AssertionError):
        assert_equivalent(model, out, {"x": RNG.standard_normal((5, 20)).astype(np.float32)})


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]},
        {"strides": [2, 1], "dilations": [1, 2], "pads": [0, 1, 1, 0]},
    ],
)
def test_tucker2_convtranspose_planted_rank(attrs):
    # ConvTranspose weights are (I, O, k): plant the ranks on (I, O) = (12, 10).
    weight = planted_tucker(12, 10, (3, 3), (4, 3), seed=12)
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", **attrs)],
        [tensor("x", ["N", 12, 7, 6])],
        [tensor("y", 4)],
        [init("w", weight), init("b", RNG.standard_normal(10))],
    )
    out, _ = compress_at(model, {"deconv": (4, 3)}, methods="tucker2-transpose")
    assert op_count(out, "ConvTranspose") == 1 and op_count(out, "Conv") == 2
    for batch in (1, 3):
        assert_equivalent(model, out, {"x": RNG.standard_normal((batch, 12, 7, 6)).astype(np.float32)})


def test_ir_version_opsets_metadata_and_io_are_kept():
    w = planted_matrix(16, 12, 4, seed=13)
    model = make_model(
        [helper.make_node("MatMul", ["tokens", "w"], ["features"], name="mm")],
        [tensor("tokens", ["batch", "seq", 16])],
        [tensor("features", ["batch", "seq", 12])],
        [init("w", w)],
        opset=13,
    )
    model.ir_version = 7
    model.doc_string = "a model with history"
    model.producer_name = "someone"
    entry = model.metadata_props.add()
    entry.key, entry.value = "license", "MIT"
    out, _ = compress_at(model, {"mm": 4})
    assert out.ir_version == 7 and [(o.domain, o.version) for o in out.opset_import] == [("", 13)]
    assert out.doc_string == "a model with history" and out.producer_name == "someone"
    assert [(p.key, p.value) for p in out.metadata_props] == [("license", "MIT")]
    assert [i.name for i in out.graph.input] == ["tokens"] and [o.name for o in out.graph.output] == [
        "features"
    ]
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (out.graph.input[0], out.graph.output[0])
    ]
    assert dims == [["batch", "seq", 16], ["batch", "seq", 12]]
    tags = {n.name: {p.key: p.value for p in n.metadata_props} for n in out.graph.node}
    assert tags["mm/svd/factor_a"] == {"tnopt.method": "svd", "tnopt.source_node": "mm", "tnopt.rank": "4"}
