"""Model structure: every kind of model a user may bring gets a valid output or a one-line reason, and
each layer tnopt leaves alone says why in the report."""

import json

import numpy as np
import onnx
import pytest
from contract import decisions, gemm_model, mlp, run_case, save, single
from helpers import IR_VERSION, init, tensor
from onnx import TensorProto, helper, numpy_helper


def low_rank(k, n, r=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n))).astype(np.float32)


def compress_ok(tmp_path, model, *args, expect=0):
    path = save(model, tmp_path)
    report = tmp_path / "r.json"
    run_case(tmp_path, path, "--rank-ratio", "0.25", "--report", report, *args, expect=expect)
    return decisions(report), json.loads(report.read_text())


# --- opsets and IR versions ------------------------------------------------------------------------


@pytest.mark.parametrize("opset", range(7, 22))
def test_opsets_7_to_21(tmp_path, opset):
    model = mlp(opset=opset, ir_version=3 if opset < 8 else 7 if opset < 13 else IR_VERSION)
    if opset < 11:
        path = save(model, tmp_path)
        run_case(tmp_path, path, expect=2, fragment=f"opset {opset} is below the supported minimum 11")
        return
    layers, _ = compress_ok(tmp_path, model)
    assert all(entry["decision"] == "rewritten" for entry in layers.values())


@pytest.mark.parametrize("ir_version", range(3, 11))
def test_ir_versions_3_to_10(tmp_path, ir_version):
    # IR 3 lists every initializer as a graph input: the output must list its new ones too.
    model = mlp(opset=11, ir_version=ir_version)
    layers, _ = compress_ok(tmp_path, model)
    assert all(entry["decision"] == "rewritten" for entry in layers.values())
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert out.ir_version == ir_version
    if ir_version < 4:
        inputs = {i.name for i in out.graph.input}
        assert {t.name for t in out.graph.initializer} <= inputs


# --- weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_half_and_double_weights_keep_their_dtype(tmp_path, dtype):
    layers, _ = compress_ok(tmp_path, mlp(dtype=dtype))
    assert all(entry["decision"] == "rewritten" for entry in layers.values())
    out = onnx.load(str(tmp_path / "out.onnx"))
    want = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert {t.data_type for t in out.graph.initializer} == {want}


def test_bfloat16_weights_are_left_dense_with_a_reason(tmp_path):
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.BFLOAT16, [32, 16], rng.standard_normal(512).tolist())
    model = single(
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        [tensor("x", ["N", 32], TensorProto.BFLOAT16)],
        [tensor("y", ["N", 16], TensorProto.BFLOAT16)],
        [weight],
    )
    from tnopt.analyze import analyze

    assert "bfloat16 weight: factors cannot" in analyze(model)[0].skip_reason
    # onnxruntime's CPU provider has no bfloat16 MatMul: refused before any work, in one line.
    path = save(model, tmp_path)
    run_case(tmp_path, path, "--rank-ratio", "0.25", expect=2, fragment="onnxruntime cannot load the model")


@pytest.mark.parametrize(
    "value, reason", [(np.nan, "NaN/Inf"), (np.inf, "NaN/Inf"), (-np.inf, "NaN/Inf"), (0.0, "all zeros")]
)
def test_non_finite_or_zero_weights_are_skipped_with_a_reason(tmp_path, value, reason):
    rng = np.random.default_rng(0)
    w1 = low_rank(32, 48)
    w1[3, 5] = value
    if value == 0.0:
        w1[:] = 0.0
    model = mlp(weights=(w1, rng.standard_normal((48, 10)) @ np.eye(10)), check=True)
    layers, _ = compress_ok(tmp_path, model, "--allow-growth")
    assert layers["fc1"]["decision"] == "skipped" and reason in layers["fc1"]["reason"]
    assert layers["fc2"]["decision"] == "rewritten"


def test_zero_size_weight(tmp_path):
    model = single(
        helper.make_node("Gemm", ["x", "w"], ["y"], name="fc"),
        [tensor("x", ["N", 0])],
        [tensor("y", ["N", 4])],
        [init("w", np.zeros((0, 4)))],
    )
    run_case(tmp_path, save(model, tmp_path), expect=2, fragment="zero-size dimension")


def test_gemm_whose_constant_is_input_a(tmp_path):
    model = single(
        helper.make_node("Gemm", ["w", "x"], ["y"], name="fc"),
        [tensor("x", [8, "N"])],
        [tensor("y", [4, "N"])],
        [init("w", low_rank(4, 8))],
    )
    run_case(tmp_path, save(model, tmp_path), expect=2, fragment="the constant is Gemm's first input (A)")


def test_shared_weight(tmp_path):
    w = low_rank(32, 32)
    model = single(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="b"),
        ],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 32])],
        [init("w", w)],
    )
    run_case(tmp_path, save(model, tmp_path), expect=2, fragment="shared with another node")


def test_weight_that_is_also_a_graph_input_with_a_default_stays_an_input(tmp_path):
    model = mlp()
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    model.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, list(w2.dims)))
    layers, _ = compress_ok(tmp_path, model)
    assert layers["fc1"]["decision"] == "rewritten"
    assert layers["fc2"]["decision"] == "skipped" and "also a graph input" in layers["fc2"]["reason"]
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [i.name for i in out.graph.input] == ["x", "w2"]
    assert "w2" in {t.name for t in out.graph.initializer}


def test_int8_weight_dequantised_by_cast_mul_does_not_grow_the_file(tmp_path):
    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, (64, 64)).astype(np.int8)
    model = single(
        [
            helper.make_node("Cast", ["wq"], ["wf"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Mul", ["wf", "scale"], ["w"], name="dequant"),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [tensor("x", ["N", 64])],
        [tensor("y", ["N", 64])],
        [numpy_helper.from_array(q, "wq"), init("scale", np.full((1, 64), 0.02))],
    )
    path = save(model, tmp_path)
    # rank 0.25 of 64x64 = 16: 2048 float32 factor values (8 KiB) against 4 KiB of int8 + scales
    report = tmp_path / "r.json"
    run_case(tmp_path, path, "--rank-ratio", "0.25", "--report", report, expect=0)
    layer = decisions(report)["mm"]
    assert (
        layer["decision"] == "kept" and "would grow the file" in layer["reason"] and "int8" in layer["reason"]
    )
    assert layer["bytes_before"] == 64 * 64 + 64 * 4


def test_quantized_ops_are_left_alone(tmp_path):
    rng = np.random.default_rng(4)
    model = single(
        [
            helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"], name="dq"),
            helper.make_node("MatMul", ["x", "w"], ["h"], name="qmm"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="fp"),
        ],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 8])],
        [
            numpy_helper.from_array(rng.integers(-100, 100, (32, 32)).astype(np.int8), "wq"),
            init("s", np.array(0.01)),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
            init("w2", low_rank(32, 8, 2)),
        ],
    )
    layers, _ = compress_ok(tmp_path, model, "--method", "svd")
    assert layers["qmm"]["decision"] == "skipped" and "DequantizeLinear" in layers["qmm"]["reason"]
    assert layers["fp"]["decision"] == "rewritten"


# --- graph structure -------------------------------------------------------------------------------


def test_if_subgraph_is_kept_and_the_top_level_rewritten(tmp_path):
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["t"])], "then", [], [tensor("t", ["N", 10])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["e"])], "else", [], [tensor("e", ["N", 10])]
    )
    model = mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    model.graph.node.append(
        helper.make_node("If", ["flag"], ["z"], then_branch=then_graph, else_branch=else_graph, name="if")
    )
    model.graph.output.append(tensor("z", ["N", 10]))
    onnx.checker.check_model(model)
    layers, _ = compress_ok(tmp_path, model)
    assert {name for name, entry in layers.items() if entry["decision"] == "rewritten"} == {"fc1", "fc2"}
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert any(node.op_type == "If" for node in out.graph.node)


def test_non_topological_node_order(tmp_path):
    model = mlp(check=False)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    run_case(tmp_path, save(model, tmp_path), expect=2, fragment="fails onnx.checker")


def test_custom_domain_op_onnxruntime_cannot_run(tmp_path):
    model = mlp()
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example", name="custom"))
    model.graph.output[0].CopyFrom(tensor("z", ["N", 10]))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    run_case(tmp_path, save(model, tmp_path), expect=2, fragment="onnxruntime cannot load the model")


def test_graph_output_that_is_an_initializer(tmp_path):
    from helpers import cli

    model = mlp()
    model.graph.output.append(tensor("w2", [48, 10]))
    path = save(model, tmp_path)
    run_case(tmp_path, path, expect=2, fragment="graph output 'w2' is a constant")
    result = cli("compare", path, path)
    assert result.returncode == 2 and "graph output 'w2' is a constant" in result.stderr


def test_very_deep_graph(tmp_path):
    depth, width = 60, 32
    nodes, initializers, previous = [], [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"], name=f"act{i}"))
        initializers.append(init(f"w{i}", low_rank(width, width, 4, seed=i) / 4 + np.eye(width)))
        previous = f"a{i}"
    model = single(nodes, [tensor("x", ["N", width])], [tensor(previous, ["N", width])], initializers)
    layers, _ = compress_ok(tmp_path, model)
    assert len(layers) == depth and all(entry["decision"] == "rewritten" for entry in layers.values())


# --- gains -----------------------------------------------------------------------------------------


def test_a_rewrite_without_gain_is_never_applied(tmp_path):
    # A 1x1 Conv at full rank stores as many values as it had (Tucker-2 of 8x8x1x1 at (8, 8)): no gain.
    rng = np.random.default_rng(5)
    model = single(
        helper.make_node("Conv", ["x", "w"], ["y"], name="pointwise"),
        [tensor("x", ["N", 8, 6, 6])],
        [tensor("y", ["N", 8, 6, 6])],
        [init("w", rng.standard_normal((8, 8, 1, 1)))],
    )
    path = save(model, tmp_path)
    report = tmp_path / "r.json"
    run_case(tmp_path, path, "--rank-ratio", "1", "--method", "tucker2", "--report", report, expect=0)
    layer = decisions(report)["pointwise"]
    assert layer["decision"] == "kept" and "no gain" in layer["reason"]
    assert layer["params_after"] == layer["params_before"]
    run_case(
        tmp_path,
        path,
        "--rank-ratio",
        "1",
        "--method",
        "tucker2",
        "--allow-growth",
        "--report",
        report,
        expect=0,
    )
    assert decisions(report)["pointwise"]["decision"] == "rewritten"


def test_mpo_flops_growth_is_refused_under_flops_and_flagged_under_params(tmp_path):
    model = gemm_model(low_rank(64, 64, 8))
    path = save(model, tmp_path)
    report = tmp_path / "r.json"
    run_case(tmp_path, path, "--method", "mpo", "--rank-ratio", "0.5", "--report", report, expect=0)
    layer = decisions(report)["fc"]
    assert layer["decision"] == "kept"
    assert "the dense FLOPs" in layer["reason"] and "--objective params" in layer["reason"]
    run_case(
        tmp_path,
        path,
        "--method",
        "mpo",
        "--rank-ratio",
        "0.5",
        "--objective",
        "params",
        "--report",
        report,
        expect=0,
    )
    layer = decisions(report)["fc"]
    assert layer["decision"] == "rewritten" and layer["flops_after"] > layer["flops_before"]
    assert "raises FLOPs" in layer["reason"]
    assert any("raises FLOPs" in w for w in json.loads(report.read_text())["warnings"])


def test_a_decomposition_that_does_not_converge_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    from tnopt.passes import METHODS

    def diverges(layer, rank, stats=None):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(METHODS["svd"], "decompose", diverges)
    layers, _ = compress_ok(tmp_path, mlp(), "--method", "svd")
    assert all(entry["decision"] == "kept" for entry in layers.values())
    assert all("did not converge" in entry["reason"] for entry in layers.values())


def test_infinite_weight_never_reaches_lapack(monkeypatch):
    # +Inf made np.linalg.svd never return on some builds: it must be refused before any SVD.
    from tnopt.passes import _linalg

    import tnopt

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran on a non-finite weight")

    w1 = low_rank(32, 48)
    w1[0, 0] = np.inf
    monkeypatch.setattr(_linalg.np.linalg, "svd", no_svd)
    _, report = tnopt.compress(
        mlp(weights=(w1, low_rank(48, 10))), methods="mpo", rank_ratio=0.5, provider="cpu"
    )
    assert report.layers[0].decision == "skipped" and "NaN/Inf" in report.layers[0].reason


def test_loop_subgraph_is_kept_and_the_top_level_rewritten(tmp_path):
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Neg", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            tensor("i", [], TensorProto.INT64),
            tensor("cond_in", [], TensorProto.BOOL),
            tensor("v_in", ["N", 10]),
        ],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", ["N", 10])],
    )
    model = mlp()
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "go"),
        ]
    )
    model.graph.node.append(helper.make_node("Loop", ["trips", "go", "y"], ["z"], body=body, name="loop"))
    model.graph.output.append(tensor("z", ["N", 10]))
    onnx.checker.check_model(model)
    layers, _ = compress_ok(tmp_path, model)
    assert {name for name, entry in layers.items() if entry["decision"] == "rewritten"} == {"fc1", "fc2"}
    assert any(node.op_type == "Loop" for node in onnx.load(str(tmp_path / "out.onnx")).graph.node)
