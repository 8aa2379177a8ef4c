"""Deep-TN storage's geometry-aware site layout: the axes a weight is read as (a conv's (O, I, kh, kw);
a Gemm's (C, H, W, N) behind a Flatten), the site order, and exactness at a planted structure in it."""

from types import SimpleNamespace

import numpy as np
import onnx
from helpers import init, make_model, relative_difference, run, tensor
from onnx import helper
from tnopt.passes import METHODS, _deep_tn
from tnopt.passes.deep_tn import layout_for

from tnopt.analyze import analyze
from tnopt.plan import Choice
from tnopt.runner import apply_plan

RNG = np.random.default_rng(5)


def planted(layout, chi, seed=0):
    """A weight that is exactly a bond-χ MPS of the layout's sites (random cores)."""
    rng = np.random.default_rng(seed)
    chain = _deep_tn.bonds(layout.n, chi)
    cores = [rng.standard_normal((chain[k], 2, chain[k + 1])) for k in range(layout.n)]
    return _deep_tn.contract(cores, [], layout).astype(np.float32)


def test_site_order_of_a_flattened_image_interleaves_rows_and_columns():
    # fc2's first layer: 784 = Flatten(1, 28, 28) inputs → 300 outputs. Axes (C, H, W, N) = (1, 28, 28,
    # 300); C = 1 holds no site; rows (b), columns (c) and outputs (d) alternate coarsest first.
    layer = SimpleNamespace(op="Gemm", weight_shape=(784, 300), input_axes=(1, 28, 28), weight=None)
    layout = layout_for(layer)
    assert layout.axes == (1, 28, 28, 300) and layout.bits == (0, 5, 5, 9)
    assert layout.site_names() == [f"{a}{k}" for k in range(1, 6) for a in "bcd"] + [
        f"d{k}" for k in range(6, 10)
    ]
    # Image bits first, outputs after: the same axes in two groups.
    split = layout_for(layer, (("space",), ("in",), ("out",)))
    assert split.site_names() == [f"{a}{k}" for k in range(1, 6) for a in "bc"] + [
        f"d{k}" for k in range(1, 10)
    ]
    # A flat index's bits mix rows and columns (28·r + c): the matrix layout this replaces.
    flat = _deep_tn.site_layout((784, 300))
    assert flat.axes == (784, 300) and flat.bits == (10, 9)
    assert flat.site_names()[:4] == ["a1", "b1", "a2", "b2"]


def test_site_order_of_a_conv_kernel():
    # (O, I, kh, kw) = (128, 64, 3, 3): each scale's bits of O (a), I (b), kh (c), kw (d) together.
    layer = SimpleNamespace(op="Conv", weight_shape=(128, 64, 3, 3), weight=None)
    layout = layout_for(layer)
    assert layout.axes == (128, 64, 3, 3) and layout.padded == (128, 64, 4, 4)
    expected = ["a1", "b1", "c1", "d1", "a2", "b2", "c2", "d2"] + [
        f"{a}{k}" for k in range(3, 7) for a in "ab"
    ]
    assert layout.site_names() == expected + ["a7"]
    grouped = layout_for(layer, (("space",), ("in",), ("out",)))
    assert grouped.site_names() == ["c1", "d1", "c2", "d2"] + [f"b{k}" for k in range(1, 7)] + [
        f"a{k}" for k in range(1, 8)
    ]
    # Groups of several axes with different bit counts interleave most significant bits first.
    mixed = _deep_tn.site_layout((8, 2, 4), (8, 2, 4), [(0, 1, 2)])
    assert mixed.site_names() == ["a1", "b1", "c1", "a2", "c2", "a3"]


def test_site_layout_rejects_axes_that_do_not_hold_the_weight():
    for axes, groups in (((28, 27, 300), None), ((28, 28, 300), [(0, 1)])):
        try:
            _deep_tn.site_layout((784, 300), axes, groups)
        except ValueError:
            continue
        raise AssertionError(f"{axes} {groups} accepted")


def flatten_gemm_model(weight_kn, chw):
    """x (N, C, H, W) → Flatten → Gemm(transB=1) with the (K, N) weight stored as (N, K)."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w", "c"], ["y"], name="layer", transB=1),
    ]
    model = make_model(
        nodes,
        [tensor("x", ["N", *chw])],
        [tensor("y", 2)],
        [init("w", weight_kn.T), init("c", RNG.standard_normal(weight_kn.shape[1]))],
    )
    return onnx.shape_inference.infer_shapes(model)


def test_analyze_reads_the_geometry_a_flatten_or_reshape_folded():
    model = flatten_gemm_model(RNG.standard_normal((4 * 6 * 5, 7)).astype(np.float32), (4, 6, 5))
    assert analyze(model)[0].input_axes == (4, 6, 5)
    reshape = make_model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
            helper.make_node("MatMul", ["flat", "w"], ["y"], name="layer"),
        ],
        [tensor("x", [3, 2, 4, 4])],
        [tensor("y", 2)],
        [init("w", RNG.standard_normal((32, 5))), numpy_helper_int64("shape", [3, 32])],
    )
    assert analyze(onnx.shape_inference.infer_shapes(reshape))[0].input_axes == (2, 4, 4)
    plain = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")],
        [tensor("x", ["N", 32])],
        [tensor("y", 2)],
        [init("w", RNG.standard_normal((32, 5)))],
    )
    assert analyze(plain)[0].input_axes is None


def numpy_helper_int64(name, values):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(values, np.int64), name)


def test_planted_structure_in_the_image_layout_is_reproduced():
    """A Gemm behind Flatten(4, 8, 8) (no padding) whose weight is an exact bond-3 MPS in the image
    layout: TT-SVD at χ = 3 reproduces it, onnxruntime's rebuilt layer equals the dense one, and the
    same weight read in the matrix layout (flat-index bits) is far from bond 3."""
    geometry = SimpleNamespace(op="Gemm", weight_shape=(256, 16), input_axes=(4, 8, 8), weight=None)
    weight = planted(layout_for(geometry), 3)
    model = flatten_gemm_model(weight, (4, 8, 8))
    layer = analyze(model)[0]
    method = METHODS["deep-tn-storage"]
    assert method.layout(layer).axes == (4, 8, 8, 16)
    factors = method.decompose(layer, 3)
    assert factors.rel_error < 1e-5
    assert method.decompose(layer, 2).rel_error > 1e-2
    assert METHODS["deep-tn-storage"].decompose(SimpleNamespace(weight=weight), 3).rel_error > 1e-2
    compressed, _ = apply_plan(model, [Choice(layer, "deep-tn-storage", factors)])
    x = RNG.standard_normal((3, 4, 8, 8)).astype(np.float32)
    assert relative_difference(run(model, {"x": x})[0], run(compressed, {"x": x})[0]) < 1e-5
    stored = sum(np.prod(t.dims) for t in compressed.graph.initializer if t.data_type == 1)
    # The layer's bias C (16) travels as the factor array "bias", in place of the original.
    assert factors.arrays["bias"].shape == (16,)
    assert stored == sum(v.size for v in factors.arrays.values())
    assert stored - 16 == method.cost(layer, 3).params < weight.size


def test_planted_structure_in_the_conv_layout_is_reproduced():
    layout = layout_for(SimpleNamespace(op="Conv", weight_shape=(8, 4, 2, 2), weight=None))
    weight = planted(layout, 2, seed=1)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="layer", pads=[1, 0, 0, 1])
    model = make_model([node], [tensor("x", ["N", 4, 6, 7])], [tensor("y", 4)], [init("w", weight)])
    layer = analyze(model)[0]
    factors = METHODS["deep-tn-storage"].decompose(layer, 2)
    assert factors.rel_error < 1e-5
    assert METHODS["deep-tn-storage"].decompose(SimpleNamespace(weight=weight), 2).rel_error > 1e-2
    compressed, _ = apply_plan(model, [Choice(layer, "deep-tn-storage", factors)])
    x = RNG.standard_normal((2, 4, 6, 7)).astype(np.float32)
    assert relative_difference(run(model, {"x": x})[0], run(compressed, {"x": x})[0]) < 1e-5


def test_padded_axes_rebuild_exactly_in_onnxruntime():
    """Odd axes (3x3 kernel, 6 and 5 inputs) are padded on their own; the Slice takes every padded
    entry away, so the torch forward and onnxruntime agree on the truncated factors."""
    import torch

    weight = RNG.standard_normal((6 * 5 * 3, 7)).astype(np.float32)
    model = flatten_gemm_model(weight, (6, 5, 3))
    layer = analyze(model)[0]
    method = METHODS["deep-tn-storage"]
    assert method.layout(layer).padded == (8, 8, 4, 8)
    factors = method.decompose(layer, 3)
    assert factors.rel_error > 1e-3
    compressed, _ = apply_plan(model, [Choice(layer, "deep-tn-storage", factors)])
    x = RNG.standard_normal((3, 6, 5, 3)).astype(np.float32)
    arrays = {k: torch.tensor(v) for k, v in factors.arrays.items()}
    got = method.forward(layer, arrays, torch.tensor(x.reshape(3, -1)), torch.tensor(layer.bias))
    assert relative_difference(run(compressed, {"x": x})[0], got.detach().numpy()) < 1e-5


def test_tt_storage_is_the_gateless_network_at_a_larger_bond():
    """tt-storage = deep-tn-storage at depth 0: no gate tensors, so the same stored numbers buy a
    larger bond (fc2's layer at ≤ 1/100 of its parameters: χ 9 instead of 7)."""
    layer = SimpleNamespace(
        op="Gemm", weight_shape=(784, 300), input_axes=(1, 28, 28), params=235_200, flops=470_400
    )
    layer.weight = RNG.standard_normal((784, 300)).astype(np.float32)
    tt, deep = METHODS["tt-storage"], METHODS["deep-tn-storage"]
    assert tt.name == "tt-storage" and deep.name == "deep-tn-storage"
    assert (tt.rank_for_params(layer, 2352), deep.rank_for_params(layer, 2352)) == (9, 7)
    factors = tt.decompose(layer, 9)
    assert not [k for k in factors.arrays if k.startswith("U")]
    assert sum(v.size for v in factors.arrays.values()) == tt.cost(layer, 9).params <= 2352


def test_spectral_bond_spread_stays_within_the_uniform_budget_and_finds_a_planted_profile():
    """Bonds spread by the unfoldings' spectra: within the stored numbers of the uniform bond, no
    bond above twice a neighbour's, and a weight whose exact bonds are uneven is reproduced."""
    layout = _deep_tn.site_layout((64, 32))
    rng = np.random.default_rng(2)
    chain = [1, 2, 2, 4, 4, 2, 2, 2, 2, 2, 2, 1]  # exact bonds of the planted network
    cores = [rng.standard_normal((chain[k], 2, chain[k + 1])) for k in range(layout.n)]
    weight = _deep_tn.contract(cores, [], layout)
    budget = _deep_tn.mps_params(_deep_tn.bonds(layout.n, 3))
    cores, _, err = _deep_tn.decompose(weight, layout, 3, 0, spread="spectral")
    spread = [1] + [c.shape[2] for c in cores]
    assert _deep_tn.mps_params(spread) <= budget
    assert all(spread[k] <= 2 * min(spread[k - 1], spread[k + 1]) for k in range(1, layout.n))
    assert err < 1e-6  # the uniform χ = 3 cannot hold the bond-4 cuts
    assert _deep_tn.decompose(weight, layout, 3, 0)[2] > 1e-3


def test_mixed_radix_sites_hold_axes_without_padding():
    assert _deep_tn.radix_digits(28) == (7, 2, 2) and _deep_tn.radix_digits(300) == (5, 5, 3, 2, 2)
    assert _deep_tn.radix_digits(3) == (3,) and _deep_tn.radix_digits(1) == ()
    assert _deep_tn.radix_digits(11) == (3, 2, 2)  # a prime above 7: padded to 12
    layer = SimpleNamespace(op="Gemm", weight_shape=(784, 300), input_axes=(1, 28, 28), weight=None)
    layout = layout_for(layer, radix="mixed")
    assert layout.padded == (1, 28, 28, 300) and sorted(layout.dims) == sorted(
        (7, 2, 2) * 2 + (5, 5, 3, 2, 2)
    )
    # Coarsest digits first, interleaved across rows (b), columns (c) and outputs (d).
    assert layout.site_names()[:3] == ["b1", "c1", "d1"] and layout.dims[:3] == (7, 7, 5)


def test_sized_radix_pads_small_axes_to_bits_and_splits_large_ones_by_prime_factors():
    # By axis size, not by model: fc2's (1, 28, 28, 300) Gemm gets the mixed layout, a VGG conv's
    # (128, 64, 3, 3) and Gemm's (128, 3, 3, 256) exactly the binary one (3 padded to 4).
    fc2 = SimpleNamespace(op="Gemm", weight_shape=(784, 300), input_axes=(1, 28, 28), weight=None)
    assert layout_for(fc2, radix="sized") == layout_for(fc2, radix="mixed")
    assert layout_for(fc2, radix="sized") != layout_for(fc2, radix="binary")
    conv = SimpleNamespace(op="Conv", weight_shape=(128, 64, 3, 3), weight=None)
    flat = SimpleNamespace(op="Gemm", weight_shape=(1152, 256), input_axes=(128, 3, 3), weight=None)
    for layer in (conv, flat):
        assert layout_for(layer, radix="sized") == layout_for(layer, radix="binary")
        assert layout_for(layer, radix="mixed").padded != layout_for(layer, radix="binary").padded
    # A layer with both: kernel axes binary, 6 and 5 in mixed radix.
    both = layout_for(SimpleNamespace(op="Conv", weight_shape=(6, 5, 3, 3), weight=None), radix="sized")
    assert both.padded == (6, 5, 4, 4) and both.digits == ((3, 2), (5,), (2, 2), (2, 2))
    assert METHODS["tt-storage-mixed"].layout(conv) == layout_for(conv, radix="binary")


def test_planted_structure_in_a_mixed_radix_layout_is_reproduced():
    """A conv (6, 5, 3, 3) behind no padding at all in mixed radix (sites 3 2 5 3 3): a weight that
    is exactly a bond-2 MPS of those sites is recovered by TT-SVD at χ = 2 and rebuilt exactly in
    onnxruntime; the binary layout (each axis padded to 8, 8, 4, 4) does not see it at χ = 2."""
    method = type(METHODS["tt-storage"])(depth=0, radix="mixed", name="tt-storage-mixed")
    geometry = SimpleNamespace(op="Conv", weight_shape=(6, 5, 3, 3), weight=None)
    layout = method.layout(geometry)
    assert layout.padded == (6, 5, 3, 3) and layout.n == 5
    rng = np.random.default_rng(2)
    chain = _deep_tn.bonds(layout.n, 2, layout.dims)
    cores = [rng.standard_normal((chain[k], d, chain[k + 1])) for k, d in enumerate(layout.dims)]
    weight = _deep_tn.contract(cores, [], layout).astype(np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", pads=[1, 1, 1, 1])],
        [tensor("x", ["N", 5, 7, 7])],
        [tensor("y", 4)],
        [init("w", weight), init("b", RNG.standard_normal(6).astype(np.float32))],
    )
    layer = analyze(model)[0]
    factors = method.decompose(layer, 2)
    assert factors.rel_error < 1e-5
    assert METHODS["tt-storage"].decompose(layer, 2).rel_error > 1e-2
    compressed, _ = apply_plan(model, [Choice(layer, method.name, factors)], {method.name: method})
    x = RNG.standard_normal((2, 5, 7, 7)).astype(np.float32)
    assert relative_difference(run(model, {"x": x})[0], run(compressed, {"x": x})[0]) < 1e-5
    stored = sum(np.prod(t.dims) for t in compressed.graph.initializer if t.data_type == 1)
    assert stored - 6 == method.cost(layer, 2).params == _deep_tn.mps_params(chain, layout.dims)
    # Gates act on binary sites only.
    try:
        type(METHODS["tt-storage"])(depth=1, radix="mixed")
    except ValueError:
        return
    raise AssertionError("a gated mixed-radix network was accepted")


def test_filled_bonds_spend_the_parameter_target_that_a_uniform_bond_leaves():
    """fc2's layer at ≤ 1/100 (2,352 numbers) on mixed-radix sites: the uniform χ 9 stores 2,076,
    χ 10 would store 2,479. With `fill` the bonds start at χ 9 and rise one step at a time, lowest
    level first, until no further step fits: more stored numbers, still within the target, no bond
    two steps above another, and the fit has exactly those bonds."""
    from tnopt.passes.deep_tn import DeepTNStorage

    layer = SimpleNamespace(
        op="Gemm", weight_shape=(784, 300), input_axes=(1, 28, 28), params=235_200, flops=470_400
    )
    layer.weight = RNG.standard_normal((784, 300)).astype(np.float32)
    uniform = DeepTNStorage(depth=0, radix="sized")
    filled = METHODS["tt-storage-mixed"]
    assert uniform.rank_for_params(layer, 2352) == 9 and uniform.cost(layer, 9).params == 2076
    chain = filled.rank_for_params(layer, 2352)
    layout = filled.layout(layer)
    base = _deep_tn.bonds(layout.n, 9, layout.dims)
    assert isinstance(chain, tuple) and len(chain) == layout.n + 1
    assert 2076 < filled.cost(layer, chain).params <= 2352
    assert all(b <= c <= b + 1 for b, c in zip(base, chain)) and chain != tuple(base)
    # No further step fits: every bond below its cap would cost more than what is left.
    left = 2352 - filled.cost(layer, chain).params
    caps = [1] + _deep_tn.bond_caps(layout.n, layout.dims) + [1]
    dims = layout.dims
    steps = [
        dims[k - 1] * chain[k - 1] + dims[k] * chain[k + 1] for k in range(1, layout.n) if chain[k] < caps[k]
    ]
    assert min(steps) > left
    factors = filled.decompose(layer, chain)
    assert factors.rank == chain
    assert (1, *(factors.arrays[f"G{k + 1}"].shape[2] for k in range(layout.n))) == chain
    assert sum(v.size for k, v in factors.arrays.items() if k != "bias") == filled.cost(layer, chain).params
    assert filled.rank_label(chain).startswith("10 (")


def test_a_bond_chain_outside_the_unfoldings_ranks_is_refused():
    layout = _deep_tn.site_layout((8, 4))
    assert _deep_tn.chain_for(layout, 3) == [1, 2, 3, 3, 2, 1]
    assert _deep_tn.chain_for(layout, (1, 2, 4, 2, 2, 1)) == [1, 2, 4, 2, 2, 1]
    for bad in ((1, 3, 4, 2, 2, 1), (1, 2, 2, 1), (2, 2, 4, 2, 2, 1)):
        try:
            _deep_tn.chain_for(layout, bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
