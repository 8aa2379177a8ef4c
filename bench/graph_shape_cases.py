"""The cases of bench/graph_shapes.py: small models written the way exporters write them.

Each builder, registered with `@case(what)`, returns (ModelProto, {input name: calibration array}):
torch.onnx.export of the CPU torch (the TorchScript exporter and the dynamo one) or onnx.helper where
a shape is easier to state directly. Weights have planted low rank (a quarter of full, plus 1% noise).
`CASES` lists them in order; the runner in bench/graph_shapes.py holds every run on them to the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SAMPLES = 64
CONV_METHODS = ("tucker2", "cp", "cut-o", "cut-i", "cut-spatial", "mpo")
F = TensorProto.FLOAT


@dataclass
class Case:
    name: str
    what: str
    build: object  # () -> (ModelProto, {input name: array})
    conv: bool = False  # run the per-method full-rank matrix too
    methods: tuple = CONV_METHODS


CASES: list[Case] = []


def case(what: str, conv: bool = False, methods: tuple = CONV_METHODS):
    def register(build):
        CASES.append(Case(build.__name__, what, build, conv, methods))
        return build

    return register


# --- builders --------------------------------------------------------------------------------------


def rng(seed=0):
    return np.random.default_rng(seed)


def arr(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def model_of(nodes, inputs, outputs, inits, opset=17, ir=8, **graph_kw):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, **graph_kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    return model


def weight(*shape, seed=0):
    """A weight of low rank along its first axis (a quarter of the full rank) plus 1% noise, so that
    the budgeted runs have something to compress."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    g = rng(seed)
    if len(shape) < 2:
        return (g.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    rank = max(1, min(shape[0], fan_in) // 4)
    low = g.standard_normal((shape[0], rank)) @ g.standard_normal((rank, fan_in)) / np.sqrt(rank * fan_in)
    noisy = low + 0.01 * g.standard_normal(low.shape) / np.sqrt(fan_in)
    return noisy.reshape(shape).astype(np.float32)


def data(shape, seed=1, dtype=np.float32):
    return rng(seed).standard_normal((SAMPLES, *shape)).astype(dtype)


def conv_net(conv_attrs: dict, w_shape, x_shape, *, bias=True, op="Conv", opset=17, ir=8, spatial=None):
    """x → Op → Relu → y, one layer with the given attributes."""
    inits = [arr("w", weight(*w_shape))]
    inputs = ["x", "w"]
    if bias:
        out_ch = w_shape[0] if op == "Conv" else w_shape[1] * conv_attrs.get("group", 1)
        inits.append(arr("b", rng(2).standard_normal(out_ch) * 0.1))
        inputs.append("b")
    nodes = [
        helper.make_node(op, inputs, ["h"], name="layer", **conv_attrs),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    dims = ["N", x_shape[0], *x_shape[1:]]
    if spatial is not None:
        dims = ["N", x_shape[0], *spatial]
    model = model_of(nodes, [vi("x", dims)], [vi("y", [None] * len(dims))], inits, opset=opset, ir=ir)
    return model, {"x": data(x_shape)}


@case(
    "Conv grouped (group=4, 8 in/group), not depthwise",
    conv=True,
    methods=CONV_METHODS + ("tucker2-grouped",),
)
def conv_grouped():
    return conv_net({"group": 4, "pads": [1, 1, 1, 1]}, (32, 8, 3, 3), (32, 10, 10))


@case("Conv dilated 2, pads 2", conv=True)
def conv_dilated():
    return conv_net({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, (24, 16, 3, 3), (16, 12, 12))


@case("Conv asymmetric pads [0,1,2,1], kernel 3x5", conv=True)
def conv_asym_pads():
    return conv_net({"pads": [0, 1, 2, 1]}, (24, 16, 3, 5), (16, 11, 13))


@case("Conv auto_pad SAME_UPPER, stride 2, kernel 4x4", conv=True)
def conv_same_upper():
    return conv_net({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (24, 16, 4, 4), (16, 11, 13))


@case("Conv auto_pad SAME_LOWER, stride 2, kernel 4x3", conv=True)
def conv_same_lower():
    return conv_net({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (24, 16, 4, 3), (16, 11, 13))


@case("Conv auto_pad VALID, stride (2,3), kernel 3x3", conv=True)
def conv_valid():
    return conv_net({"auto_pad": "VALID", "strides": [2, 3]}, (24, 16, 3, 3), (16, 13, 14))


@case("Conv no bias, kernel_shape attribute omitted", conv=True)
def conv_no_bias():
    return conv_net({"pads": [1, 1, 1, 1]}, (24, 16, 3, 3), (16, 9, 9), bias=False)


@case("Conv bias computed at run time (a graph input)", conv=True)
def conv_runtime_bias():
    model, feeds = conv_net({"pads": [1, 1, 1, 1]}, (24, 16, 3, 3), (16, 9, 9), bias=False)
    model.graph.node[0].input.append("b")
    model.graph.input.append(vi("b", [24]))
    feeds["b"] = np.linspace(-0.2, 0.2, 24).astype(np.float32)
    return model, feeds


@case("Conv1d audio [N, C, T] (torch export, T symbolic), dilation 2", conv=True)
def conv1d_audio():
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv1d(16, 32, 5, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv1d(32, 32, 3, dilation=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv1d(32, 8, 1),
    )
    return torch_export(net, {"audio": (16, 40)}, dynamic={"audio": {0: "N", 2: "T"}})


@case("speech model, time-major output [T, N, classes] (Conv1d → Transpose → MatMul → LogSoftmax)")
def time_major_output():
    nodes = [
        helper.make_node("Conv", ["audio", "cw", "cb"], ["c"], name="conv", pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Transpose", ["r"], ["t"], name="to_time_major", perm=[2, 0, 1]),
        helper.make_node("MatMul", ["t", "mw"], ["logits"], name="classifier"),
        helper.make_node("LogSoftmax", ["logits"], ["y"], name="log_softmax", axis=2),
    ]
    inits = [arr("cw", weight(32, 16, 3)), arr("cb", np.zeros(32)), arr("mw", weight(32, 12))]
    model = model_of(nodes, [vi("audio", ["N", 16, "T"])], [vi("y", ["T", "N", 12])], inits)
    return model, {"audio": data((16, 20))}


@case("Conv3d (torch export), stride 2, no bias", conv=True)
def conv3d():
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv3d(8, 16, 3, padding=1, stride=2, bias=False), torch.nn.ReLU(), torch.nn.Conv3d(16, 8, 3)
    )
    return torch_export(net, {"video": (8, 6, 10, 10)}, dynamic={"video": {0: "N"}})


@case("ConvTranspose stride 2, pads 1, output_padding 1", conv=True, methods=("tucker2-transpose",))
def conv_transpose():
    return conv_net(
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        (16, 12, 3, 3),
        (16, 7, 7),
        op="ConvTranspose",
    )


@case("ConvTranspose auto_pad SAME_UPPER stride 2, dilations 2", conv=True, methods=("tucker2-transpose",))
def conv_transpose_same():
    return conv_net(
        {"strides": [2, 2], "auto_pad": "SAME_UPPER", "dilations": [2, 2]},
        (16, 12, 3, 3),
        (16, 7, 7),
        op="ConvTranspose",
    )


@case("ConvTranspose with output_shape attribute", conv=True, methods=("tucker2-transpose",))
def conv_transpose_output_shape():
    return conv_net(
        {"strides": [2, 2], "output_shape": [15, 16]},
        (16, 12, 3, 3),
        (16, 7, 7),
        op="ConvTranspose",
        bias=False,
    )


@case("whole model float16 (Conv, Gemm, MatMul weights and activations)")
def fp16_whole():
    h = np.float16
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "mw"], ["y"], name="head"),
    ]
    inits = [
        arr("cw", weight(16, 8, 3, 3), h),
        arr("cb", np.zeros(16), h),
        arr("gw", weight(32, 16 * 6 * 6), h),
        arr("gb", np.zeros(32), h),
        arr("mw", weight(32, 10), h),
    ]
    model = model_of(
        nodes,
        [vi("x", ["N", 8, 6, 6], TensorProto.FLOAT16)],
        [vi("y", ["N", 10], TensorProto.FLOAT16)],
        inits,
    )
    return model, {"x": data((8, 6, 6), dtype=h)}


@case("float32 model, float16 weights behind Cast (Conv and MatMul)")
def fp16_weights_cast():
    h = np.float16
    nodes = [
        helper.make_node("Cast", ["cw16"], ["cw"], name="cast_cw", to=F),
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Cast", ["mw16"], ["mw"], name="cast_mw", to=F),
        helper.make_node("MatMul", ["f", "mw"], ["y"], name="head"),
    ]
    inits = [arr("cw16", weight(32, 16, 3, 3), h), arr("mw16", weight(32, 24), h)]
    model = model_of(nodes, [vi("x", ["N", 16, 8, 8])], [vi("y", ["N", 24])], inits)
    return model, {"x": data((16, 8, 8))}


def _qdq(name, values, axis=None):
    """int8 weight + scale (+ zero point) dequantised per tensor or per channel."""
    if axis is None:
        scale = np.array(np.abs(values).max() / 127, np.float32)
    else:
        scale = (np.abs(values).reshape(values.shape[axis], -1).max(axis=1) / 127).astype(np.float32)
    shape = [-1 if i == axis else 1 for i in range(values.ndim)] if axis is not None else []
    q = np.clip(np.round(values / (scale.reshape(shape) if shape else scale)), -127, 127).astype(np.int8)
    zero = np.zeros_like(scale, dtype=np.int8)
    inits = [arr(f"{name}_q", q, np.int8), arr(f"{name}_s", scale), arr(f"{name}_z", zero, np.int8)]
    attrs = {"axis": axis} if axis is not None else {}
    node = helper.make_node(
        "DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], name=f"dq_{name}", **attrs
    )
    return node, inits


@case("QDQ model: activations Q/DQ, Conv weight per-channel DequantizeLinear, MatMul weight DQ → Transpose")
def qdq():
    cw_node, cw_inits = _qdq("cw", weight(16, 8, 3, 3), axis=0)
    mw_node, mw_inits = _qdq("mwt", weight(10, 16))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        cw_node,
        helper.make_node("Conv", ["xd", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        mw_node,
        helper.make_node("Transpose", ["mwt"], ["mw"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["f", "mw"], ["m"], name="head"),
        helper.make_node("Gemm", ["m", "gw"], ["y"], name="fp_fc"),
    ]
    inits = cw_inits + mw_inits + [arr("xs", 0.05), arr("xz", 0, np.uint8), arr("gw", weight(10, 10))]
    model = model_of(nodes, [vi("x", ["N", 8, 6, 6])], [vi("y", ["N", 10])], inits, opset=13)
    return model, {"x": np.abs(data((8, 6, 6)))}


@case("one initializer shared by two Convs (siamese) and by two MatMuls")
def shared_weights():
    nodes = [
        helper.make_node("Conv", ["a", "cw"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "cw"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Sub", ["ca", "cb"], ["d"], name="sub"),
        helper.make_node("GlobalAveragePool", ["d"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "mw"], ["m1"], name="mm1"),
        helper.make_node("Tanh", ["m1"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "mw"], ["m2"], name="mm2"),
        helper.make_node("Gemm", ["m2", "gw"], ["y"], name="fc"),
    ]
    inits = [arr("cw", weight(16, 8, 3, 3)), arr("mw", weight(16, 16)), arr("gw", weight(16, 10))]
    model = model_of(nodes, [vi("a", ["N", 8, 6, 6]), vi("b", ["N", 8, 6, 6])], [vi("y", ["N", 10])], inits)
    return model, {"a": data((8, 6, 6)), "b": data((8, 6, 6), seed=2)}


@case("tied embedding: Gather(E) and MatMul(h, Transpose(E)) share E")
def tied_embedding():
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["h"], name="proj"),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["t", "emb_t"], ["y"], name="lm_head"),
    ]
    inits = [arr("emb", weight(50, 24)), arr("w", weight(24, 24))]
    model = model_of(nodes, [vi("ids", ["N", "S"], TensorProto.INT64)], [vi("y", ["N", "S", 50])], inits)
    return model, {"ids": rng(3).integers(0, 50, (SAMPLES, 7)).astype(np.int64)}


@case("IR 8, one weight also listed in graph.input (overridable default)")
def weight_is_graph_input():
    model, feeds = _mlp_conv(ir=8)
    model.graph.input.append(vi("w2", [32, 10]))
    return model, feeds


@case("IR 3 style: every initializer listed in graph.input (torch keep_initializers_as_inputs)")
def all_initializers_as_inputs_ir3():
    model, feeds = _mlp_conv(ir=3, opset=11)
    model.graph.input.extend(vi(t.name, list(t.dims)) for t in model.graph.initializer)
    return model, feeds


@case("IR 8, every initializer listed in graph.input (torch keep_initializers_as_inputs=True)")
def all_initializers_as_inputs_ir8():
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 36, 10),
    )
    return torch_export(net, {"x": (8, 6, 6)}, dynamic={"x": {0: "N"}}, keep_initializers_as_inputs=True)


@case("MatMul constant first: W (M, K) @ x (N, K, T)")
def matmul_left_3d():
    nodes = [
        helper.make_node("MatMul", ["w", "x"], ["h"], name="left_mm"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    model = model_of(nodes, [vi("x", ["N", 24, "T"])], [vi("y", ["N", 32, "T"])], [arr("w", weight(32, 24))])
    return model, {"x": data((24, 9))}


@case(
    "MatMul batched constants: x (N, 4, S, 16) @ W (4, 16, 8), then @ W (1, 4, 8, 12); "
    "a 1-D constant x @ v (12,)"
)
def matmul_batched_const():
    nodes = [
        helper.make_node("MatMul", ["x", "w3"], ["h"], name="batched_mm"),
        helper.make_node("MatMul", ["h", "w4"], ["h4"], name="mm4d"),
        helper.make_node("MatMul", ["h4", "v"], ["y"], name="vector_mm"),
        helper.make_node("ReduceMean", ["h4"], ["r"], name="mean", axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["r", "w2"], ["y2"], name="plain_mm"),
    ]
    inits = [
        arr("w3", weight(4, 16, 8)),
        arr("w4", weight(1, 4, 8, 12)),
        arr("v", weight(12)),
        arr("w2", weight(12, 6)),
    ]
    model = model_of(
        nodes, [vi("x", ["N", 4, "S", 16])], [vi("y", ["N", 4, "S"]), vi("y2", ["N", 6])], inits, opset=13
    )
    return model, {"x": data((4, 5, 16))}


@case(
    "MatMul constants with leading dims of 1: x (N, S, 16) @ W (1, 16, 12), then @ W (1, 1, 12, 8) on a 4-D "
    "view; a (1, 16, 12) weight on a 2-D input (raises the output's rank)"
)
def matmul_unit_leading_dims():
    nodes = [
        helper.make_node("MatMul", ["x", "w3"], ["h"], name="mm3"),
        helper.make_node("Unsqueeze", ["h", "axis1"], ["h4"], name="unsqueeze"),
        helper.make_node("MatMul", ["h4", "w4"], ["y"], name="mm4"),
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "w_up"], ["y2"], name="rank_up"),
    ]
    inits = [
        arr("w3", weight(16, 12).reshape(1, 16, 12)),
        arr("w4", weight(12, 8, seed=1).reshape(1, 1, 12, 8)),
        arr("w_up", weight(16, 12, seed=2).reshape(1, 16, 12)),
        arr("axis1", np.array([1]), np.int64),
    ]
    model = model_of(
        nodes, [vi("x", ["N", "S", 16])], [vi("y", ["N", 1, "S", 8]), vi("y2", [1, "N", 12])], inits, opset=13
    )
    return model, {"x": data((5, 16))}


@case(
    "Einsum with a constant: 'bij,jk->bik', '...j,kj->...k' (weight stored (N, K), activation first), "
    "and a per-position weight 'bij,ijk->bik'"
)
def einsum_constant():
    nodes = [
        helper.make_node("Einsum", ["x", "w"], ["h"], name="proj", equation="bij,jk->bik"),
        helper.make_node("Einsum", ["h", "v"], ["g"], name="proj_t", equation="...j,kj->...k"),
        helper.make_node("Einsum", ["g", "per_step"], ["y"], name="per_step", equation="bij,ijk->bik"),
    ]
    inits = [
        arr("w", weight(16, 12)),
        arr("v", weight(10, 12, seed=1)),
        arr("per_step", weight(5, 10, 4, seed=2)),
    ]
    model = model_of(nodes, [vi("x", ["N", 5, 16])], [vi("y", ["N", 5, 4])], inits, opset=13)
    return model, {"x": data((5, 16))}


@case("Gemm transA=1 (x given as (K, N)), alpha 0.5, beta 2, C (1, N)")
def gemm_trans_a():
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transA=1, alpha=0.5, beta=2.0)]
    inits = [arr("w", weight(24, 16)), arr("c", rng(4).standard_normal((1, 16)))]
    model = model_of(nodes, [vi("x", [24, "N"])], [vi("y", ["N", 16])], inits)
    return model, {"x": data((24,)).T.copy()}


@case("Gemm alpha 0.5 beta 2 transB=1, C (1, N); Gemm C scalar; Gemm C (M, N) with fixed batch")
def gemm_alpha_beta():
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["h1"], name="fc_c1n", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "c2"], ["h2"], name="fc_scalar_c", beta=0.25),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "c3"], ["y"], name="fc_full_c", alpha=2.0),
    ]
    inits = [
        arr("w1", weight(32, 24)),
        arr("c1", rng(5).standard_normal((1, 32))),
        arr("w2", weight(32, 20)),
        arr("c2", 0.3),
        arr("w3", weight(20, 12)),
        arr("c3", rng(6).standard_normal((4, 12))),
    ]
    model = model_of(nodes, [vi("x", [4, 24])], [vi("y", [4, 12])], inits)
    return model, {"x": data((24,))}  # a fixed batch of 4: 64 samples, run 4 at a time


@case("Conv/MatMul inside If branches and a Loop body, weights from the outer scope (also used outside)")
def control_flow_bodies():
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "cw"], ["t"], name="then_conv", pads=[1, 1, 1, 1])],
        "then",
        [],
        [vi("t", [None] * 4)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "cw2"], ["e"], name="else_conv", pads=[1, 1, 1, 1])],
        "else",
        [],
        [vi("e", [None] * 4)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["v_in", "mw"], ["mm"], name="body_mm"),
            helper.make_node("Tanh", ["mm"], ["v_out"], name="body_tanh"),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", [None, 16])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [None, 16])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="top_conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "If", ["flag"], ["branch"], name="if", then_branch=then_graph, else_branch=else_graph
        ),
        helper.make_node("Add", ["c", "branch"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "mw"], ["m"], name="top_mm"),
        helper.make_node("Loop", ["trips", "", "m"], ["looped"], name="loop", body=body),
        helper.make_node("Gemm", ["looped", "gw"], ["y"], name="fc"),
    ]
    inits = [
        arr("cw", weight(16, 16, 3, 3)),
        arr("cw2", weight(16, 16, 3, 3, seed=1)),
        arr("mw", weight(16, 16)),
        arr("gw", weight(16, 10)),
        arr("flag", True, np.bool_),
        arr("trips", 2, np.int64),
    ]
    model = model_of(nodes, [vi("x", ["N", 16, 6, 6])], [vi("y", ["N", 10])], inits)
    model.graph.node[6].attribute[0].g.node[1].doc_string = "a doc string inside the Loop body"
    return model, {"x": data((16, 6, 6))}


@case("Scan body with its own MatMul weight (an RNN cell as Scan) beside a top-level Gemm")
def scan_body():
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "wx"], ["a"], name="cell_in"),
            helper.make_node("MatMul", ["h_in", "wh"], ["b"], name="cell_rec"),
            helper.make_node("Add", ["a", "b"], ["s"], name="cell_add"),
            helper.make_node("Tanh", ["s"], ["h_out"], name="cell_tanh"),
            helper.make_node("Identity", ["h_out"], ["y_t"], name="cell_out"),
        ],
        "cell",
        [vi("h_in", [None, 16]), vi("x_t", [None, 12])],
        [vi("h_out", [None, 16]), vi("y_t", [None, 16])],
        [arr("wh", weight(16, 16, seed=3))],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "pre"], ["xp"], name="pre_mm"),
        helper.make_node(
            "Scan",
            ["h0", "xp"],
            ["h_last", "ys"],
            name="scan",
            body=body,
            num_scan_inputs=1,
            scan_input_axes=[1],
            scan_output_axes=[1],
        ),
        helper.make_node("Gemm", ["h_last", "gw"], ["y"], name="fc"),
    ]
    inits = [arr("pre", weight(8, 12)), arr("wx", weight(12, 16)), arr("gw", weight(16, 10))]
    model = model_of(
        nodes, [vi("x", ["N", 5, 8]), vi("h0", ["N", 16])], [vi("y", ["N", 10])], inits, opset=16
    )
    return model, {"x": data((5, 8)), "h0": np.zeros((SAMPLES, 16), np.float32)}


@case(
    "main graph calls a local function (MatMul+Relu inside) and has its own Conv and MatMul; "
    "an initializer feeds both"
)
def local_function():
    function = helper.make_function(
        "custom.block",
        "Dense",
        ["inp", "w"],
        ["out"],
        [helper.make_node("MatMul", ["inp", "w"], ["mm"]), helper.make_node("Relu", ["mm"], ["out"])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Dense", ["f", "fw"], ["d"], name="dense_call", domain="custom.block"),
        helper.make_node("MatMul", ["d", "mw"], ["y"], name="head"),
        helper.make_node("MatMul", ["f", "fw"], ["y2"], name="beside"),
    ]
    inits = [arr("cw", weight(16, 8, 3, 3)), arr("fw", weight(16, 16)), arr("mw", weight(16, 10))]
    graph = helper.make_graph(
        nodes, "g", [vi("x", ["N", 8, 6, 6])], [vi("y", ["N", 10]), vi("y2", ["N", 16])], inits
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.block", 1)],
        ir_version=8,
        functions=[function],
    )
    return model, {"x": data((8, 6, 6))}


@case("weights in Constant nodes (not initializers); a parameter shared through Identity (torch's dedup)")
def constant_node_weights():
    nodes = [
        helper.make_node("Constant", [], ["cw"], name="const_cw", value=arr("cw_value", weight(16, 8, 3, 3))),
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w"], ["m1"], name="mm1"),
        helper.make_node("Identity", ["w"], ["w_copy"], name="dedup"),
        helper.make_node("MatMul", ["m1", "w_copy"], ["m2"], name="mm2"),
        helper.make_node("Constant", [], ["hw"], name="const_hw", value=arr("hw_value", weight(16, 10))),
        helper.make_node("MatMul", ["m2", "hw"], ["y"], name="head"),
    ]
    model = model_of(nodes, [vi("x", ["N", 8, 6, 6])], [vi("y", ["N", 10])], [arr("w", weight(16, 16))])
    return model, {"x": data((8, 6, 6))}


@case("a Conv whose output is read only inside If branches (outer-scope reference)")
def output_used_in_subgraph():
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["t"], name="then_relu")], "then", [], [vi("t", [None] * 4)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["c"], ["e"], name="else_neg")], "else", [], [vi("e", [None] * 4)]
    )
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("If", ["flag"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph),
    ]
    inits = [arr("cw", weight(32, 16, 3, 3)), arr("flag", True, np.bool_)]
    model = model_of(nodes, [vi("x", ["N", 16, 6, 6])], [vi("y", [None] * 4)], inits)
    return model, {"x": data((16, 6, 6))}


@case("a vector model without a batch axis: x (K,) @ W (K, N)")
def no_batch_axis():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Tanh", ["h"], ["y"], name="tanh"),
    ]
    model = model_of(nodes, [vi("x", [32])], [vi("y", [24])], [arr("w", weight(32, 24))])
    return model, {"x": data((32,))[0]}


@case("batch-1 export that squeezes the batch away: x [1, 32] → Squeeze → (32,) @ W → Unsqueeze")
def batch1_squeezed():
    nodes = [
        helper.make_node("Squeeze", ["x", "axis0"], ["v"], name="squeeze"),
        helper.make_node("MatMul", ["v", "w"], ["h"], name="mm"),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("Unsqueeze", ["t", "axis0"], ["y"], name="unsqueeze"),
    ]
    inits = [arr("w", weight(32, 24)), arr("axis0", [0], np.int64)]
    model = model_of(nodes, [vi("x", [1, 32])], [vi("y", [1, 24])], inits)
    return model, {"x": data((32,))}


@case("classifier with an int64 label output (ArgMax) beside the probabilities")
def int_label_output():
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    inits = [arr("w1", weight(32, 48)), arr("w2", weight(48, 10))]
    model = model_of(
        nodes,
        [vi("x", ["N", 32])],
        [vi("label", ["N"], TensorProto.INT64), vi("probabilities", ["N", 10])],
        inits,
    )
    return model, {"x": data((32,))}


@case("scikit-learn style (skl2onnx): ai.onnx.ml ZipMap output, a sequence of maps, beside the label")
def zipmap_output():
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
        helper.make_node(
            "ZipMap",
            ["probs"],
            ["probabilities"],
            name="zipmap",
            domain="ai.onnx.ml",
            classlabels_int64s=list(range(4)),
        ),
    ]
    inits = [arr("w1", weight(16, 32)), arr("w2", weight(32, 4))]
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(F, []))
    )
    graph = helper.make_graph(
        nodes,
        "skl",
        [vi("x", ["N", 16])],
        [vi("label", ["N"], TensorProto.INT64), helper.make_value_info("probabilities", seq_map)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8
    )
    return model, {"x": data((16,))}


@case("detector with NonMaxSuppression: an output whose first axis counts boxes, not samples")
def nms_output():
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], name="flatten_positions"),
        helper.make_node("Transpose", ["flat"], ["anchors"], name="to_anchors", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["anchors", "box_w"], ["boxes"], name="box_head"),
        helper.make_node("MatMul", ["anchors", "score_w"], ["s"], name="score_head"),
        helper.make_node("Sigmoid", ["s"], ["s_sig"], name="sigmoid"),
        helper.make_node("Transpose", ["s_sig"], ["scores"], name="to_classes", perm=[0, 2, 1]),
        helper.make_node(
            "NonMaxSuppression",
            ["boxes", "scores", "max_out", "iou", "score_threshold"],
            ["selected"],
            name="nms",
        ),
    ]
    inits = [
        arr("cw", weight(16, 8, 3, 3)),
        arr("shape", [0, 16, -1], np.int64),
        arr("box_w", weight(16, 4) * 10),
        arr("score_w", weight(16, 3)),
        arr("max_out", [5], np.int64),
        arr("iou", [0.5]),
        arr("score_threshold", [0.5]),
    ]
    model = model_of(
        nodes,
        [vi("x", ["N", 8, 6, 6])],
        [vi("selected", ["num_selected", 3], TensorProto.INT64), vi("scores", ["N", 3, 36])],
        inits,
        opset=13,
    )
    return model, {"x": data((8, 6, 6))}


@case("two Convs share one bias initializer (deduplicated zeros)")
def shared_bias():
    nodes = [
        helper.make_node("Conv", ["x", "cw1", "zeros"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "cw2", "zeros"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    inits = [
        arr("cw1", weight(16, 16, 3, 3)),
        arr("cw2", weight(16, 16, 3, 3, seed=1)),
        arr("zeros", np.zeros(16)),
    ]
    model = model_of(nodes, [vi("x", ["N", 16, 6, 6])], [vi("y", ["N", 16, 6, 6])], inits)
    return model, {"x": data((16, 6, 6))}


@case("an unused initializer listed as an (overridable) graph input, and an unused graph input")
def unused_inputs():
    model, feeds = _mlp_conv(ir=8)
    model.graph.initializer.append(arr("temperature", 1.0))
    model.graph.input.extend([vi("temperature", []), vi("unused_mask", ["N", 4])])
    feeds["unused_mask"] = np.ones((SAMPLES, 4), np.float32)
    return model, feeds


@case(
    "mixed precision (onnxconverter-common keep_io_types): float32 I/O, Cast to float16 around fp16 Conv/Gemm"
)
def mixed_precision_io():
    h = np.float16
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="to_half", to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["x16", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="fc", transB=1),
        helper.make_node("Cast", ["g"], ["y"], name="to_float", to=F),
    ]
    inits = [
        arr("cw", weight(16, 8, 3, 3), h),
        arr("cb", np.zeros(16), h),
        arr("gw", weight(10, 16 * 36), h),
        arr("gb", np.zeros(10), h),
    ]
    model = model_of(nodes, [vi("x", ["N", 8, 6, 6])], [vi("y", ["N", 10])], inits)
    return model, {"x": data((8, 6, 6))}


@case(
    "onnxruntime transformer-optimizer output: com.microsoft FusedMatMul/Gelu/SkipLayerNormalization "
    "beside MatMuls"
)
def ort_contrib_ops():
    ms = "com.microsoft"
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("BiasGelu", ["h", "b1"], ["g"], name="bias_gelu", domain=ms),
        helper.make_node("MatMul", ["g", "w2"], ["o"], name="fc2"),
        helper.make_node(
            "SkipLayerNormalization",
            ["o", "x", "gamma", "beta"],
            ["n"],
            name="skip_ln",
            domain=ms,
            epsilon=1e-5,
        ),
        helper.make_node(
            "FusedMatMul", ["n", "n"], ["scores"], name="self_scores", domain=ms, transB=1, alpha=0.125
        ),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "n"], ["y"], name="attend"),
    ]
    inits = [
        arr("w1", weight(32, 64)),
        arr("b1", np.zeros(64)),
        arr("w2", weight(64, 32)),
        arr("gamma", np.ones(32)),
        arr("beta", np.zeros(32)),
    ]
    graph = helper.make_graph(nodes, "bert", [vi("x", ["N", "S", 32])], [vi("y", ["N", "S", 32])], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid(ms, 1)], ir_version=8
    )
    return model, {"x": data((7, 32))}


def _mlp_conv(opset=17, ir=8):
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["g"], name="fc1"),
        helper.make_node("Relu", ["g"], ["gr"], name="relu2"),
        helper.make_node("MatMul", ["gr", "w2"], ["y"], name="fc2"),
    ]
    inits = [
        arr("cw", weight(16, 8, 3, 3)),
        arr("cb", np.zeros(16)),
        arr("w1", weight(16 * 25, 32)),
        arr("b1", np.zeros(32)),
        arr("w2", weight(32, 10)),
    ]
    model = model_of(nodes, [vi("x", ["N", 8, 5, 5])], [vi("y", ["N", 10])], inits, opset=opset, ir=ir)
    return model, {"x": data((8, 5, 5))}


for _opset, _ir in ((11, 7), (13, 7), (17, 8), (21, 10), (23, 11)):

    def _versions(opset=_opset, ir=_ir):
        return _mlp_conv(opset=opset, ir=ir)

    _versions.__name__ = f"opset{_opset}_ir{_ir}"
    case(f"Conv + Gemm + MatMul at opset {_opset}, IR {_ir}", conv=True)(_versions)


@case("IR 10 with metadata_props on the model and the graph")
def graph_metadata_ir10():
    model, feeds = _mlp_conv(ir=10)
    helper.set_model_props(model, {"converted_from": "tf2onnx"})
    entry = model.graph.metadata_props.add()
    entry.key, entry.value = "graph_key", "graph_value"
    return model, feeds


@case("IR 9 with metadata_props, model/graph/node doc strings, value_info with symbolic dims")
def metadata_and_value_info():
    model, feeds = _mlp_conv(ir=9)
    model.doc_string = "a model doc string"
    model.graph.doc_string = "a graph doc string"
    model.graph.node[0].doc_string = "the conv's doc string"
    model.graph.node[1].doc_string = "the relu's doc string"  # a node tnopt keeps
    entry = model.graph.node[1].metadata_props.add()
    entry.key, entry.value = "namespace", "encoder.block0: torch.nn.ReLU"  # as torch's dynamo exporter writes
    model.graph.name = "exported_graph"
    model.graph.input[0].doc_string, model.graph.output[0].doc_string = "NCHW image", "class logits"
    model.producer_name, model.producer_version, model.model_version = "exporter", "1.2.3", 7
    helper.set_model_props(model, {"author": "someone", "labels": "a,b,c"})
    model.graph.value_info.extend([vi("r", ["N", 16, 5, 5]), vi("f", ["N", 400]), vi("gr", ["N", 32])])
    return model, feeds


@case("graph outputs include a rewritten layer's own output (and the next layer's input)")
def intermediate_outputs():
    model, feeds = _mlp_conv()
    model.graph.output.extend([vi("c", ["N", 16, 5, 5]), vi("g", ["N", 32]), vi("f", ["N", 400])])
    return model, feeds


@case("unnamed nodes and torch-style '/'-names; the last layer's output is the only graph output")
def unnamed_nodes():
    model, feeds = _mlp_conv()
    for node in model.graph.node:
        node.name = "" if node.op_type != "Gemm" else "/fc1/Gemm"
    return model, feeds


@case("torch TransformerEncoderLayer (d=32, 4 heads) export, opset 14, dynamic batch and sequence")
def torch_transformer():
    import torch

    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    net = torch.nn.Sequential(layer, torch.nn.Linear(32, 8))
    return torch_export(net, {"tokens": (6, 32)}, dynamic={"tokens": {0: "N", 1: "S"}}, opset=14)


@case("torch CNN with BatchNorm folded by the exporter, Linear, opset 17")
def torch_cnn():
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    return torch_export(net, {"image": (3, 12, 12)}, dynamic={"image": {0: "N"}})


@case("vocoder-style torch export: weight-normed Conv1d, ConvTranspose1d stride 4, grouped ConvTranspose1d")
def torch_vocoder():
    import torch
    from torch.nn.utils.parametrizations import weight_norm

    net = torch.nn.Sequential(
        weight_norm(torch.nn.Conv1d(16, 32, 7, padding=3)),
        torch.nn.LeakyReLU(0.1),
        torch.nn.ConvTranspose1d(32, 16, 8, stride=4, padding=2),
        torch.nn.LeakyReLU(0.1),
        torch.nn.ConvTranspose1d(16, 16, 4, stride=2, padding=1, groups=4),
        torch.nn.Conv1d(16, 1, 7, padding=3),
        torch.nn.Tanh(),
    )
    return torch_export(net, {"mel": (16, 20)}, dynamic={"mel": {0: "N", 2: "frames"}})


@case("torch float16 model (Linear/Conv1d .half()), exported on CPU")
def torch_fp16():
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv1d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 12, 10),
    ).half()
    return torch_export(net, {"x": (8, 12)}, dynamic={"x": {0: "N"}}, dtype=torch.float16)


@case(
    "torch dynamo exporter (torch.onnx.export(dynamo=True), the default since torch 2.9): CNN, IR 10 opset 20"
)
def dynamo_cnn():
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 36, 10),
    )
    return dynamo_export(net, {"x": (8, 6, 6)})


@case("torch dynamo exporter: TransformerEncoderLayer + Linear head, batch and sequence dynamic")
def dynamo_transformer():
    import torch

    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    net = torch.nn.Sequential(layer, torch.nn.Linear(32, 8))
    return dynamo_export(net, {"tokens": (6, 32)}, sequence_axis=1)


def dynamo_export(net, shapes: dict, sequence_axis=None):
    import contextlib
    import io
    import logging
    import warnings

    import torch

    logging.getLogger("torch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    net.eval()
    example = tuple(torch.randn(2, *shape) for shape in shapes.values())
    dims = []
    for _ in shapes:
        axes = {0: torch.export.Dim("batch")}
        if sequence_axis is not None:
            axes[sequence_axis] = torch.export.Dim("sequence", min=2)
        dims.append(axes)
    dims = tuple(dims)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            example,
            dynamo=True,
            dynamic_shapes=dims,
            input_names=list(shapes),
            output_names=["y"],
            verbose=False,
        )
    model = program.model_proto
    return model, {name: data(shape) for name, shape in shapes.items()}


def torch_export(net, shapes: dict, dynamic: dict, opset=17, dtype=None, keep_initializers_as_inputs=None):
    import io
    import warnings

    import torch

    torch.manual_seed(0)
    net.eval()
    dtype = dtype or torch.float32
    example = tuple(torch.randn(2, *shape).to(dtype) for shape in shapes.values())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {}
        if keep_initializers_as_inputs is not None:
            kwargs["keep_initializers_as_inputs"] = keep_initializers_as_inputs
        torch.onnx.export(
            net,
            example,
            buffer,
            dynamo=False,
            input_names=list(shapes),
            output_names=["y"],
            dynamic_axes={**dynamic, "y": {0: "N"}},
            opset_version=opset,
            **kwargs,
        )
    model = onnx.load_from_string(buffer.getvalue())
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    return model, {name: data(shape, dtype=np_dtype) for name, shape in shapes.items()}
