"""Every method's differentiable torch forward equals onnxruntime's run of the subgraph `build` emits,
on the same factors (a truncated rank, so the factors are not just the dense weight), with strides,
asymmetric pads, dilation, auto_pad, groups, Gemm transA/alpha/beta and left/right MatMuls; and the
deep tensor-network storage method: planted structure reproduced exactly, stored parameters, folding."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import init, make_model, op_count, planted_tucker, relative_difference, run, tensor
from onnx import helper
from tnopt.passes import METHODS, _deep_tn

from tnopt.analyze import analyze
from tnopt.plan import Choice
from tnopt.runner import apply_plan

RNG = np.random.default_rng(11)


def conv_model(weight_shape, attrs, spatial, op="Conv", group=1):
    w = RNG.standard_normal(weight_shape).astype(np.float32)
    out_channels = weight_shape[1] * group if op == "ConvTranspose" else weight_shape[0]
    in_channels = weight_shape[0] if op == "ConvTranspose" else weight_shape[1] * group
    node = helper.make_node(op, ["x", "w", "b"], ["y"], name="layer", group=group, **attrs)
    model = make_model(
        [node],
        [tensor("x", ["N", in_channels, *spatial])],
        [tensor("y", 2 + len(spatial))],
        [init("w", w), init("b", RNG.standard_normal(out_channels))],
    )
    return model, RNG.standard_normal((2, in_channels, *spatial)).astype(np.float32)


def gemm_model(trans_a=0, trans_b=0, alpha=1.0, beta=1.0):
    k, n, m = 12, 10, 5
    w = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    node = helper.make_node(
        "Gemm", ["x", "w", "c"], ["y"], name="layer", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    model = make_model(
        [node],
        [tensor("x", [k, m] if trans_a else [m, k])],
        [tensor("y", 2)],
        [init("w", w), init("c", RNG.standard_normal(n))],
    )
    return model, RNG.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)


def matmul_model(side):
    w = RNG.standard_normal((16, 12)).astype(np.float32)
    inputs = ["w", "x"] if side == "left" else ["x", "w"]
    x_shape = [3, 12, 7] if side == "left" else [3, 7, 16]
    model = make_model(
        [helper.make_node("MatMul", inputs, ["y"], name="layer")],
        [tensor("x", x_shape)],
        [tensor("y", 3)],
        [init("w", w)],
    )
    return model, RNG.standard_normal(x_shape).astype(np.float32)


GEOMETRY = {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}
CASES = [
    ("tucker2", lambda: conv_model((8, 6, 3, 3), GEOMETRY, (11, 12)), 0.5),
    ("tucker2", lambda: conv_model((8, 6, 3), {"strides": [2], "auto_pad": "SAME_UPPER"}, (13,)), 0.5),
    ("tucker2-grouped", lambda: conv_model((8, 3, 3, 3), GEOMETRY, (10, 9), group=2), 0.5),
    (
        "tucker2-transpose",
        lambda: conv_model(
            (6, 5, 3, 3),
            {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]},
            (5, 6),
            "ConvTranspose",
        ),
        0.5,
    ),
    ("cp", lambda: conv_model((8, 6, 3, 3), GEOMETRY, (11, 12)), 0.3),
    ("cp", lambda: conv_model((8, 6, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (11, 12)), 0.3),
    ("cut-o", lambda: conv_model((8, 6, 3, 3), GEOMETRY, (11, 12)), 0.5),
    ("cut-i", lambda: conv_model((8, 6, 3, 3), GEOMETRY, (11, 12)), 0.5),
    ("cut-spatial", lambda: conv_model((8, 6, 3, 3), GEOMETRY, (11, 12)), 0.5),
    ("svd", lambda: gemm_model(trans_a=1, trans_b=1, alpha=0.7, beta=1.3), 0.5),
    ("svd", lambda: matmul_model("right"), 0.5),
    ("svd", lambda: matmul_model("left"), 0.5),
    ("mpo", lambda: gemm_model(trans_b=1, alpha=0.5, beta=2.0), 0.5),
    ("mpo", lambda: conv_model((8, 6, 1, 1), {}, (5, 5)), 0.5),
    ("mpo-storage", lambda: matmul_model("left"), 0.5),
    ("deep-tn-storage", lambda: gemm_model(trans_a=1, beta=0.5), 0.5),
    ("deep-tn-storage", lambda: conv_model((8, 6, 3, 3), GEOMETRY, (11, 12), group=1), 0.2),
    ("deep-tn-storage", lambda: matmul_model("left"), 0.5),
]


@pytest.mark.parametrize("method,make,ratio", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_torch_forward_matches_onnxruntime(method, make, ratio):
    model, x = make()
    layer = analyze(model)[0]
    impl = METHODS[method]
    assert impl.check(layer) is None
    factors = impl.decompose(layer, impl.rank_from_ratio(layer, ratio))
    assert factors.rel_error > 1e-4  # truncated: the factors are a real approximation
    compressed, _ = apply_plan(model, [Choice(layer, method, factors)])
    expected = run(compressed, {"x": x})[0]
    arrays = {k: torch.tensor(v) for k, v in factors.arrays.items()}
    bias = None if layer.bias is None else torch.tensor(layer.bias)
    got = impl.forward(layer, arrays, torch.tensor(x), bias).detach().numpy()
    assert got.shape == expected.shape
    assert relative_difference(expected, got) < 1e-5


def test_torch_forward_uses_a_refitted_bias():
    model, x = conv_model((8, 6, 3, 3), GEOMETRY, (11, 12))
    layer = analyze(model)[0]
    factors = METHODS["tucker2"].decompose(layer, (4, 3))
    factors.arrays["bias"] = RNG.standard_normal(8).astype(np.float32)
    compressed, _ = apply_plan(model, [Choice(layer, "tucker2", factors)])
    arrays = {k: torch.tensor(v) for k, v in factors.arrays.items()}
    got = METHODS["tucker2"].forward(layer, arrays, torch.tensor(x), torch.tensor(layer.bias))
    assert relative_difference(run(compressed, {"x": x})[0], got.detach().numpy()) < 1e-5


def test_forward_gradients_reach_every_factor():
    model, x = conv_model((8, 6, 3, 3), GEOMETRY, (11, 12))
    layer = analyze(model)[0]
    for method in ("tucker2", "cp", "cut-spatial", "deep-tn-storage"):
        factors = METHODS[method].decompose(layer, METHODS[method].rank_from_ratio(layer, 0.5))
        arrays = {k: torch.tensor(v, requires_grad=True) for k, v in factors.arrays.items()}
        METHODS[method].forward(layer, arrays, torch.tensor(x), None).square().sum().backward()
        assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in arrays.values()), method


# --- deep tensor-network storage ---------------------------------------------------------------------


def planted_deep_tn(weight_shape, chi, depth, seed=0, layout=None):
    """A weight that is exactly a bond-χ MPS of binary sites (random cores), under `depth` random
    orthogonal gate layers when depth > 0; in the matrix layout unless `layout` is given."""
    rng = np.random.default_rng(seed)
    layout = layout or _deep_tn.site_layout(weight_shape)
    n = layout.n
    chain = _deep_tn.bonds(n, chi)
    cores = [rng.standard_normal((chain[k], 2, chain[k + 1])) for k in range(n)]
    gates = [
        np.stack([np.linalg.qr(rng.standard_normal((4, 4)))[0] for _ in sites])
        for sites in _deep_tn.gate_sites(n, depth)
    ]
    return _deep_tn.contract(cores, gates, layout)


def test_deep_tn_planted_structure_reproduces_the_weight():
    # A MatMul with no known input geometry: the matrix layout (rows and columns interleaved).
    # 64x32 = 2^11 entries, no padding: an exact bond-3 MPS is recovered exactly by TT-SVD at χ=3.
    weight = planted_deep_tn((64, 32), 3, 0).astype(np.float32)
    factors = METHODS["deep-tn-storage"].decompose(SimpleNamespace(weight=weight), 3)
    assert factors.rel_error < 1e-5
    lower = METHODS["deep-tn-storage"].decompose(SimpleNamespace(weight=weight), 2)
    assert lower.rel_error > 1e-2  # below the planted bond it is not exact
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")],
        [tensor("x", ["N", 64])],
        [tensor("y", 2)],
        [init("w", weight)],
    )
    layer = analyze(model)[0]
    compressed, _ = apply_plan(model, [Choice(layer, "deep-tn-storage", factors)])
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    assert relative_difference(run(model, {"x": x})[0], run(compressed, {"x": x})[0]) < 1e-5
    # Stored: the cores and gates only (plus int64 shape constants), not the dense weight.
    stored = sum(np.prod(t.dims) for t in compressed.graph.initializer if t.data_type == 1)
    assert stored == sum(v.size for v in factors.arrays.values()) < weight.size
    assert stored == METHODS["deep-tn-storage"].cost(layer, 3).params
    assert op_count(compressed, "MatMul") >= 11


def test_deep_tn_gates_train_to_a_planted_deep_network():
    """A planted MPS under one orthogonal gate layer is not a bond-2 TT; gradient training of the
    cores and gates from the TT-SVD start fits it far better than the start."""
    torch.manual_seed(0)
    shape = (16, 16)
    target = torch.tensor(planted_deep_tn(shape, 2, 1, seed=3))
    impl = type(METHODS["deep-tn-storage"])(depth=1)
    factors = impl.decompose(SimpleNamespace(weight=target.numpy().astype(np.float32)), 2)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in factors.arrays.items()}
    optimizer = torch.optim.Adam(params.values(), lr=0.02)

    def error():
        cores, gates = impl.split_arrays(params)
        approx = _deep_tn.contract(cores, gates, _deep_tn.site_layout(shape))
        return ((approx - target).norm() / target.norm()).float()

    start = float(error().detach())
    for _ in range(600):
        optimizer.zero_grad()
        loss = error()
        loss.backward()
        optimizer.step()
    assert start > 0.05 and float(error().detach()) < 0.2 * start


def test_deep_tn_stores_exponentially_fewer_numbers():
    layer_shape = (1024, 512)
    params = _deep_tn.param_count(_deep_tn.site_layout(layer_shape), 8, 4)
    assert params * 100 < np.prod(layer_shape)
    model, _ = conv_model((8, 6, 3, 3), GEOMETRY, (11, 12))
    assert METHODS["deep-tn-storage"].check(analyze(model)[0]) is None
    assert not METHODS["deep-tn-storage"].in_auto


def test_tucker2_planted_forward_is_exact():
    weight = planted_tucker(8, 6, (3, 3), (3, 2), seed=4)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="layer", **GEOMETRY)],
        [tensor("x", ["N", 6, 11, 12])],
        [tensor("y", 4)],
        [init("w", weight)],
    )
    layer = analyze(model)[0]
    factors = METHODS["tucker2"].decompose(layer, (3, 2))
    x = RNG.standard_normal((2, 6, 11, 12)).astype(np.float32)
    arrays = {k: torch.tensor(v) for k, v in factors.arrays.items()}
    got = METHODS["tucker2"].forward(layer, arrays, torch.tensor(x)).numpy()
    assert relative_difference(run(model, {"x": x})[0], got) < 1e-5
