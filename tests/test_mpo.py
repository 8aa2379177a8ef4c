"""MPO / TT-matrix: planted TT ranks are exact in onnxruntime (both modes), storage mode shrinks the file."""

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, op_count, tensor
from onnx import TensorProto, helper, numpy_helper
from tnopt.passes import _linalg, _tensor_train, mpo

import tnopt
from tnopt import passes
from tnopt.analyze import analyze

RNG = np.random.default_rng(2)
MODES = ["mpo", "mpo-storage"]


def planted_tt(k, n, bond, cores=mpo.DEFAULT_CORES, seed=0):
    """A (k, n) matrix of exact TT-rank ≤ `bond` on the modes the pass will pick, contracted here
    with einsum (independently of the code under test)."""
    rng = np.random.default_rng(seed)
    ins, outs = _tensor_train.balanced_factorization(k, cores), _tensor_train.balanced_factorization(n, cores)
    bonds = _tensor_train.tt_bonds(ins, outs, bond)
    gs = [rng.standard_normal((bonds[j], ins[j], outs[j], bonds[j + 1])) for j in range(cores)]
    bond_l, in_l, out_l = "abcdefgh", "pqrstvwx", "ijklmnoy"
    terms = [f"{bond_l[j]}{in_l[j]}{out_l[j]}{bond_l[j + 1]}" for j in range(cores)]
    full = np.einsum(",".join(terms) + f"->{in_l[:cores]}{out_l[:cores]}", *gs)
    w = full.reshape(k, n)
    return (w / np.abs(w).max()).astype(np.float32)


def compress_at(model, ranks, method):
    out, report = tnopt.compress(model, ranks=ranks, methods=[method], provider="cpu", allow_growth=True)
    assert [e.decision for e in report.layers if e.name in ranks] == ["rewritten"] * len(ranks), report.layers
    assert op_count(out, "Einsum") == 0
    return out, report


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


GEMM_CASES = [
    {"transA": 0, "transB": 0, "alpha": 1.0, "beta": 1.0},
    {"transA": 1, "transB": 0, "alpha": 1.0, "beta": 1.0},
    {"transA": 0, "transB": 1, "alpha": 0.5, "beta": 2.0},
    {"transA": 1, "transB": 1, "alpha": 2.0, "beta": 0.25},
]


@pytest.mark.parametrize("method", MODES)
@pytest.mark.parametrize("attrs", GEMM_CASES)
@pytest.mark.parametrize("c_shape", [(40,), (1, 40), None])
def test_gemm_planted_tt_rank(method, attrs, c_shape):
    m, k, n, bond = 5, 24, 40, 3
    w = planted_tt(k, n, bond, seed=1)
    b = w.T if attrs["transB"] else w
    inputs = ["a", "b"] + (["c"] if c_shape else [])
    inits = [init("b", b)] + ([init("c", RNG.standard_normal(c_shape))] if c_shape else [])
    model = make_model(
        [helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)],
        [tensor("a", [k, "M"] if attrs["transA"] else ["M", k])],
        [tensor("y", 2)],
        inits,
    )
    out, report = compress_at(model, {"gemm": bond}, method)
    assert report.layers[0].weight_error < 1e-6
    assert op_count(out, "Gemm") == (1 if method == "mpo-storage" else 0)
    assert_equivalent(model, out, {"a": rand(k, m) if attrs["transA"] else rand(m, k)})


@pytest.mark.parametrize("method", MODES)
def test_matmul_3d_activations_dynamic_batch_and_sequence(method):
    k, n, bond = 48, 36, 4
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", "seq", k])],
        [tensor("y", 3)],
        [init("w", planted_tt(k, n, bond, seed=2))],
    )
    out, _ = compress_at(model, {"mm": bond}, method)
    assert op_count(out, "MatMul") == mpo.DEFAULT_CORES  # compute: one per core; storage: rebuild + dense
    for shape in [(1, 7, k), (3, 5, k)]:
        assert_equivalent(model, out, {"x": rand(*shape)})
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]


@pytest.mark.parametrize("method", MODES)
def test_matmul_weight_on_the_left(method):
    m, k, bond = 30, 20, 3
    w = planted_tt(m, k, bond, seed=3)  # y = W·x with W (M, K)
    model = make_model(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")],
        [tensor("x", ["batch", k, "cols"])],
        [tensor("y", 3)],
        [init("w", w)],
    )
    out, _ = compress_at(model, {"mm": bond}, method)
    for shape in [(1, k, 7), (2, k, 3)]:
        assert_equivalent(model, out, {"x": rand(*shape)})


@pytest.mark.parametrize("method", MODES)
def test_matmul_input_of_unknown_rank(method):
    k, n, bond = 48, 36, 4
    nodes = [
        helper.make_node("Reshape", ["x", "s"], ["x2"]),
        helper.make_node("MatMul", ["x2", "w"], ["y"], name="mm"),
    ]
    model = make_model(
        nodes,
        [tensor("x", ["N", k]), tensor("s", ["L"], TensorProto.INT64)],
        [tensor("y", 2)],
        [init("w", planted_tt(k, n, bond, seed=8))],
    )
    assert tnopt_layer(model).input_shape is None
    data = {"x": rand(4, k), "s": np.array([2, 2, k])}
    out, _ = tnopt.compress(model, ranks={"mm": bond}, methods=[method], provider="cpu", data=data)
    for shape in ([2, 2, k], [4, k], [1, 2, 2, k]):
        assert_equivalent(model, out, {"x": rand(4, k), "s": np.array(shape)})


@pytest.mark.parametrize("method", MODES)
@pytest.mark.parametrize("x_shape", [["N", 24, "H", "W"], ["N", 24, 5, 6]])
def test_pointwise_conv_planted_tt_rank(method, x_shape):
    o, c, bond = 40, 24, 3
    kernel = planted_tt(c, o, bond, seed=4).T.reshape(o, c, 1, 1).copy()  # the TT is of the (I, O) matrix
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[1, 1])],
        [tensor("x", x_shape)],
        [tensor("y", 4)],
        [init("w", kernel), init("b", rand(o))],
    )
    out, report = compress_at(model, {"conv": bond}, method)
    assert report.layers[0].weight_error < 1e-6
    assert op_count(out, "Conv") == (1 if method == "mpo-storage" else 0)
    assert_equivalent(model, out, {"x": rand(2, c, 5, 6)})
    if x_shape[2] == "H":
        assert_equivalent(model, out, {"x": rand(1, c, 3, 9)})


@pytest.mark.parametrize(
    "attrs, reason",
    [
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, "1x1"),
        ({"kernel_shape": [1, 1], "strides": [2, 2]}, "stride 1"),
    ],
)
def test_conv_that_is_not_a_plain_pointwise_gets_a_reason(attrs, reason):
    kh = attrs["kernel_shape"][0]
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
        [tensor("x", [1, 8, 6, 6])],
        [tensor("y", 4)],
        [init("w", rand(8, 8, kh, kh))],
    )
    for method in MODES:
        assert reason in passes.METHODS[method].check(tnopt_layer(model))


@pytest.mark.parametrize("method", MODES)
def test_bond_below_the_planted_rank_is_not_exact(method):
    k, n, bond = 48, 36, 4
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["N", k])],
        [tensor("y", 2)],
        [init("w", planted_tt(k, n, bond, seed=5))],
    )
    out, report = compress_at(model, {"mm": bond - 1}, method)
    assert report.layers[0].weight_error > 1e-3
    with pytest.raises(AssertionError):
        assert_equivalent(model, out, {"x": rand(6, k)})


def test_storage_mode_shrinks_the_file_by_the_tt_ratio():
    k = n = 512
    bond = 4
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["N", k])],
        [tensor("y", 2)],
        [init("w", planted_tt(k, n, bond, seed=6))],
    )
    out, report = compress_at(model, {"mm": bond}, "mpo-storage")
    tt_params = passes.METHODS["mpo-storage"].cost(tnopt_layer(model), bond).params
    assert report.layers[0].params_after == tt_params == sum(c.size for c in _cores(out))
    assert model.ByteSize() / out.ByteSize() > 0.5 * (k * n / tt_params) > 5
    assert op_count(out, "Einsum") == 0
    # the dense MatMul remains, so FLOPs are not claimed to drop
    assert report.layers[0].flops_after == report.layers[0].flops_before
    assert_equivalent(model, out, {"x": rand(3, k)})


def test_compute_mode_emits_one_matmul_per_core(monkeypatch):
    k, n, bond = 64, 48, 2
    for cores in (2, 4):
        monkeypatch.setitem(passes.METHODS, "mpo", mpo.MPO(cores=cores))
        w = planted_tt(k, n, bond, cores=cores, seed=7)
        model = make_model(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            [tensor("x", ["N", k])],
            [tensor("y", 2)],
            [init("w", w)],
        )
        out, _ = compress_at(model, {"mm": bond}, "mpo")
        assert op_count(out, "MatMul") == cores
        assert_equivalent(model, out, {"x": rand(4, k)})


def test_balanced_factorization():
    assert _tensor_train.balanced_factorization(384, 3) == (8, 6, 8)
    assert _tensor_train.balanced_factorization(4096, 3) == (16, 16, 16)
    assert _tensor_train.balanced_factorization(1536, 3) == (16, 8, 12)
    assert _tensor_train.balanced_factorization(768, 2) == (32, 24)
    assert _tensor_train.balanced_factorization(17, 3) == (17, 1, 1)  # a prime cannot be balanced
    for n, d in [(1000, 3), (30522, 3), (2**12, 4), (1, 3)]:
        assert np.prod(_tensor_train.balanced_factorization(n, d)) == n


def test_tt_svd_is_exact_at_full_rank_and_deterministic():
    w = RNG.standard_normal((24, 40))
    ins, outs = (2, 3, 4), (5, 2, 4)
    full = max(_tensor_train.tt_bond_caps(ins, outs))
    cores = _tensor_train.tt_svd_matrix(w, ins, outs, full)
    assert _linalg.relative_error(w, _tensor_train.tt_to_matrix(cores)) < 1e-12
    again = _tensor_train.tt_svd_matrix(w, ins, outs, 3)
    once = _tensor_train.tt_svd_matrix(w, ins, outs, 3)
    assert all(np.array_equal(a, b) for a, b in zip(again, once))
    bonds = _tensor_train.tt_bonds(ins, outs, 3)
    assert [c.shape for c in once] == [(1, 2, 5, 3), (3, 3, 2, 3), (3, 4, 4, 1)]
    assert _tensor_train.tt_param_count(ins, outs, bonds) == sum(c.size for c in once)


def test_rank_rules_and_costs():
    layer = tnopt_layer(
        make_model(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            [tensor("x", [8, 512])],
            [tensor("y", 2)],
            [init("w", rand(512, 512))],
        )
    )
    method = passes.METHODS["mpo"]
    assert method.full_rank(layer) == 64
    ranks = method.candidate_ranks(layer)
    assert ranks and all(isinstance(r, int) for r in ranks)
    assert all(method.cost(layer, r).params < layer.params for r in ranks)
    assert method.cost(layer, 4).flops < layer.flops
    assert 1 <= method.rank_from_energy(layer, 0.5) <= 64
    factors = passes.METHODS["mpo-storage"].decompose(layer, 8)
    assert factors.notes["mode"] == "storage" and factors.rank == 8


def tnopt_layer(model):
    return analyze(model)[0]


def _cores(model):
    return [
        numpy_helper.to_array(t) for t in model.graph.initializer if t.name.split("/")[-1].startswith("G")
    ]
