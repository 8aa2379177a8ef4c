"""Deep tensor-network storage (ADTN): W = TT of binary sites under 4x4 gate layers, folded at load; heal it.

    W read as axes (A_1 … A_m), each zero-padded to 2^{b_i}, split into n = Σ b_i binary sites
    (`radix="mixed"`: each A_i split into its prime factors ≤ 7 instead, sites of those dimensions;
     `radix="sized"`, tt-storage-mixed: mixed on axes > 4, binary on smaller ones such as 3x3 kernels):
      Conv (O, I, kh, kw):            sites  kh1 kw1 kh2 kw2 | I1 … I_b | O1 … O_b
      Gemm/MatMul x·W, x = Flatten(C, H, W):  sites  H1 W1 H2 W2 … | C1 … | N1 …   (axes (C, H, W, N))
      any other weight (rows, cols):  sites  r1 c1 r2 c2 …  (the matrix layout)
    W = unpad( (L_D ⋯ L_1) · MPS(G_1 … G_n) ),  G_k (χ_{k-1}, 2, χ_k),  L_ℓ = ⊗ two-site gates U (4×4)

    Op(x, W)  ⇒  Op(x, Reshape(Slice(Reshape(Transpose(Reshape(
                      MatMul(U_ℓk, Reshape(… MatMul(MatMul(G_1, G_2), G_3) …)) ⋯))))))     (constants only)

Neighbouring sites hold the same scale of an image's rows and columns (the bits of a flat index 28·r + c
would mix them), so smooth filters are low-rank across every cut; the geometry behind a Flatten/Reshape
comes from the graph (`Layer.input_axes`). Rank = the MPS bond χ, or a chain of bonds (1, χ_1, …, 1)
(`fill`: what a parameter target leaves above the largest uniform χ, spent one bond step at a time);
depth D = gate layers (`DEFAULT_DEPTH`). Stored numbers ≈ 2nχ² + 8D(n−1) against the weight's ∏ A_i ≈
2^n — exponentially fewer. Initialised by TT-SVD with identity gates (exactly the truncated TT), then
trained by healing (`tnopt --heal`); weight-only truncation at these sizes loses a lot, so use it with
healing. The contraction is constant-only: onnxruntime folds it at load, so the file shrinks and the
compute stays the dense layer's (the original op and attributes consume the rebuilt W). The layer's
constant bias is carried as the factor array "bias" (same size; what healing may refit). Not offered by
`--method auto`: it saves no FLOPs and pays only when healed.
"""

from __future__ import annotations

from math import prod

import numpy as np

from . import _deep_tn, _linalg
from ._method import Cost, Factors, Method, scaled_rank
from .tucker2 import spatial_conv_attrs

DEFAULT_DEPTH = 4
# Site order by axis role: groups of roles, each group's axes interleaved by scale, groups in order.
# One group (every axis's bits of one scale together, coarsest first) trained best on fc2 at ≥100x
# (bench/RESULTS.md, issue 11 session 10: 81.5% vs 79.8–80.3% for space | in | out or its reverse
# after 300 steps; 84.9% vs 83.9% for the matrix layout after 2000).
DEFAULT_ARRANGEMENT = (("out", "in", "space"),)


def axis_roles(layer) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """(axes, role of each axis: "out" | "in" | "space") of the layer's weight, or None when only the
    matrix layout is known. Conv (O, I, *k); Gemm/MatMul y = x·W (K, N) whose K inputs a
    Flatten/Reshape folded from (C, *spatial): (C, *spatial, N)."""
    shape = tuple(getattr(layer, "weight_shape", None) or np.shape(layer.weight))
    op = getattr(layer, "op", None)
    if op == "Conv" and len(shape) >= 3:
        return shape, ("out", "in") + ("space",) * (len(shape) - 2)
    folded = getattr(layer, "input_axes", None)
    if op in ("Gemm", "MatMul") and folded and len(shape) == 2 and prod(folded) == shape[0]:
        return (*folded, shape[1]), ("in",) + ("space",) * (len(folded) - 1) + ("out",)
    return None


def layout_for(layer, arrangement=DEFAULT_ARRANGEMENT, radix: str = "binary") -> _deep_tn.SiteLayout:
    shape = tuple(getattr(layer, "weight_shape", None) or np.shape(layer.weight))
    known = axis_roles(layer) if arrangement is not None else None
    if known is None:
        return _deep_tn.site_layout(shape, radix=radix)
    axes, roles = known
    groups = [tuple(i for i, r in enumerate(roles) if r in group) for group in arrangement]
    return _deep_tn.site_layout(shape, axes, [g for g in groups if g], radix=radix)


class DeepTNStorage(Method):
    name = "deep-tn-storage"
    op_types = ("Gemm", "MatMul", "Conv")
    folded_at_load = True
    in_auto = False

    def __init__(
        self,
        depth: int = DEFAULT_DEPTH,
        arrangement=DEFAULT_ARRANGEMENT,
        spread: str = "uniform",
        name=None,
        train_bias: bool = True,
        radix: str = "binary",
        summary: str | None = None,
        fill: bool = False,
    ):
        self.summary = summary
        # `rank_for_params` spends the whole parameter target (see there), not only a uniform bond's.
        self.fill = bool(fill)
        if radix != "binary" and depth:
            raise ValueError("gate layers act on binary sites: a mixed-radix network takes depth 0")
        self.radix = radix
        self.name = name or type(self).name
        self.depth = int(depth)
        # The layer's constant bias rides along as the factor array "bias" (same size, dense, emitted
        # in place of the original), so healing trains it with the cores: a 100x network cannot put
        # each output's offset where the dense weight had it.
        self.train_bias = bool(train_bias)
        self.arrangement = arrangement
        self.spread = spread

    def layout(self, layer) -> _deep_tn.SiteLayout:
        return layout_for(layer, self.arrangement, self.radix)

    def _sites(self, layer) -> int:
        return self.layout(layer).n

    def full_rank(self, layer) -> int:
        layout = self.layout(layer)
        return max(_deep_tn.bond_caps(layout.n, layout.dims))

    def rank_from_ratio(self, layer, ratio: float) -> int:
        return scaled_rank(self.full_rank(layer), ratio, round_to=0)

    def rank_from_energy(self, layer, energy: float) -> int:
        spectra = _deep_tn.unfolding_spectra(layer.weight, self.layout(layer))
        return max(_linalg.rank_for_energy(s, energy) for s in spectra)

    def rank_for_params(self, layer, target_params: float):
        """The largest uniform bond within `target_params`; with `fill` (tt-storage-mixed), the bond
        chain that then spends what the uniform bond leaves (`_deep_tn.fill_bonds`: a uniform χ
        lands anywhere between 1/R and ~0.8/R of the layer, e.g. fc2 at 1/100: χ 9 stores 2,076 of
        the 2,352 numbers allowed, χ 10 2,479)."""
        chi = super().rank_for_params(layer, target_params)
        if chi is None or not self.fill:
            return chi
        layout = self.layout(layer)
        spectra = _deep_tn.unfolding_spectra(layer.weight, layout) if layer.weight is not None else None
        cores_budget = target_params - 16 * _gate_count(layout, self.depth)
        chain = _deep_tn.fill_bonds(layout, chi, cores_budget, spectra)
        return chi if chain == _deep_tn.bonds(layout.n, chi, layout.dims) else tuple(chain)

    def rank_label(self, rank) -> str:
        if isinstance(rank, tuple):
            return f"{max(rank)} ({'-'.join(str(r) for r in rank[1:-1])})"
        return str(rank)

    def cost(self, layer, rank: int) -> Cost:
        return Cost(_deep_tn.param_count(self.layout(layer), rank, self.depth), layer.flops)

    def decompose(self, layer, rank: int, stats=None) -> Factors:
        weight = layer.weight
        # Weight-only: the input statistics have no place in a TT of binary sites; healing is the
        # data-aware step for this method.
        cores, gates, err = _deep_tn.decompose(weight, self.layout(layer), rank, self.depth, self.spread)
        arrays = {f"G{k + 1}": c for k, c in enumerate(cores)}
        arrays.update({f"U{k + 1}": g for k, g in enumerate(gates)})
        bias = getattr(layer, "bias", None)
        if self.train_bias and bias is not None:
            arrays["bias"] = np.asarray(bias)
        chain = (1, *(c.shape[2] for c in cores[:-1]), 1)
        uniform = chain == tuple(_deep_tn.bonds(len(cores), max(chain), [c.shape[1] for c in cores]))
        return Factors(
            {k: np.ascontiguousarray(v.astype(weight.dtype)) for k, v in arrays.items()},
            int(max(chain)) if uniform else chain,
            err,
            {"mode": "storage", "depth": self.depth, "sites": len(cores)},
        )

    def shared_ranks(self, layers, outputs: dict, total: float) -> dict[str, int]:
        """Bond per layer with the layers' stored numbers together ≤ `total`, shared by what each
        layer's output spans on the data: need = effective rank of its output channels (`outputs`:
        layer name → the layer's output on calibration samples) × (fan-in + fan-out), the numbers a
        map of that rank stores. A layer whose outputs span few directions (often a classifier's FC
        layers) gives its share to those that span many (often the 3x3 convs)."""
        needs = []
        for layer in layers:
            y = np.asarray(outputs[layer.name])
            axis = 1 if layer.op in ("Conv", "ConvTranspose") else -1
            if layer.op == "MatMul" and layer.attr("weight_side") == "left":
                axis = -2
            channels = np.moveaxis(y, axis, -1).reshape(-1, y.shape[axis])
            rows, cols = _deep_tn.matrix_shape(layer.weight_shape)
            needs.append(_deep_tn.effective_rank(channels) * (rows + cols))
        costs = [lambda chi, layer=layer: self.cost(layer, chi).params for layer in layers]
        chis = _deep_tn.share_budget(needs, costs, total)
        return {layer.name: chi for layer, chi in zip(layers, chis)}

    @staticmethod
    def split_arrays(arrays) -> tuple[list, list]:
        cores = [arrays[f"G{k + 1}"] for k in range(sum(key.startswith("G") for key in arrays))]
        gates = [arrays[f"U{k + 1}"] for k in range(sum(key.startswith("U") for key in arrays))]
        return cores, gates

    def forward(self, layer, arrays, x, bias=None):
        from . import _torch

        cores, gates = self.split_arrays(arrays)
        weight = _deep_tn.contract(cores, gates, self.layout(layer))
        return _torch.dense_forward(layer, weight, self.effective_bias(arrays, bias), x)

    def build(self, emit, layer, factors: Factors) -> None:
        cores, gates = self.split_arrays(factors.arrays)
        n = len(cores)
        w = emit.const("G1", cores[0].reshape(-1, cores[0].shape[2]))
        for k in range(1, n):
            core = emit.const(f"G{k + 1}", cores[k].reshape(cores[k].shape[0], -1))
            w = emit.op("MatMul", f"rebuild/core{k + 1}", [w, core])
            w = emit.op(
                "Reshape",
                f"rebuild/core{k + 1}/reshape",
                [w, _shape(emit, f"core{k + 1}", [-1, cores[k].shape[2]])],
            )
        for index, (layer_gates, sites) in enumerate(zip(gates, _deep_tn.gate_sites(n, len(gates)))):
            tensor = emit.const(f"U{index + 1}", layer_gates)
            for j, k in enumerate(sites):
                tag = f"rebuild/layer{index + 1}/gate{j + 1}"
                gate = emit.op(
                    "Gather", f"{tag}/take", [tensor, emit.const(f"{tag}/index", np.array(j, np.int64))]
                )
                w = emit.op("Reshape", f"{tag}/split", [w, _shape(emit, tag, [2**k, 4, -1])])
                w = emit.op("MatMul", tag, [gate, w])
        layout = self.layout(layer)
        w = emit.op("Reshape", "rebuild/sites", [w, _shape(emit, "rebuild/sites", layout.dims)])
        perm = [int(p) for p in np.argsort(layout.order)]
        w = emit.op("Transpose", "rebuild/unshuffle", [w], {"perm": perm})
        w = emit.op("Reshape", "rebuild/axes", [w, _shape(emit, "rebuild/axes", layout.padded)])
        if layout.axes != layout.padded:
            rank = len(layout.axes)
            bounds = [
                emit.const(f"rebuild/unpad/{role}", np.array(values, np.int64))
                for role, values in (("starts", [0] * rank), ("ends", layout.axes), ("axes", range(rank)))
            ]
            w = emit.op("Slice", "rebuild/unpad", [w, *bounds])
        shape = list(layer.weight_shape)
        w = emit.op("Reshape", "rebuild/weight", [w, _shape(emit, "rebuild/weight", shape)])
        bias_input = self.bias_input(emit, factors)
        bias = [bias_input] if bias_input is not None else []
        if layer.op == "Conv":
            attrs = spatial_conv_attrs(layer, layer.weight_shape[2:], group=layer.group)
            emit.op("Conv", "conv", [emit.data_input, w, *bias], attrs, final=True)
        elif layer.op == "Gemm":
            # A carried bias already holds beta·C.
            beta = 1.0 if "bias" in factors.arrays else layer.attr("beta")
            attrs = {"transA": layer.attr("transA"), "beta": beta}
            emit.op("Gemm", "gemm", [emit.data_input, w, *bias], attrs, final=True)
        elif layer.attr("weight_side") == "left":
            emit.op("MatMul", "matmul", [w, emit.data_input], final=True)
        else:
            emit.op("MatMul", "matmul", [emit.data_input, w], final=True)


def _gate_count(layout, depth: int) -> int:
    return sum(len(sites) for sites in _deep_tn.gate_sites(layout.n, depth))


def _shape(emit, role: str, dims) -> object:
    return emit.const(f"{role}/shape", np.array([int(d) for d in dims], np.int64))


def stored_params(factors: Factors) -> int:
    """The weight's stored numbers: cores and gates (the carried bias is the layer's own, same size)."""
    return int(sum(prod(v.shape) for k, v in factors.arrays.items() if k != "bias"))


STORAGE = DeepTNStorage()
# The depth-0 network (a quantics tensor train, no gates): at the same stored numbers the gates'
# 16 numbers each buy a larger bond instead; on fc2 at ≥100x it trained better (84.9% vs 83.9%).
TT_STORAGE = DeepTNStorage(
    depth=0,
    name="tt-storage",
    summary="Tensor-train storage (deep-tn-storage without gate layers): binary sites, folded at load; "
    "heal it.",
)
# The same TT on mixed-radix sites where padding wastes (an axis of 28 = 7·2·2 or 300 = 5·5·3·2·2
# is not padded to 32 or 512), binary sites on axes of ≤ 4 (a 3x3 kernel padded to 4x4 leaves the TT
# free entries): bench/RESULTS.md, issue 11 session 11: fc2 at ≥100x 85.7% mixed vs 84.7% binary
# after 1500 steps; VGG's four ≥50k layers 79.9% with its kernels in mixed radix vs 86.0% binary
# after 300. The rule is by axis size ("sized"): on VGG it is exactly the binary layout, on fc2
# exactly the mixed one.
# `fill`: a parameter target (bench/heal.py's 1/100) is spent to the last bond step, not only to the
# largest uniform bond (fc2: 2,339 of 2,352 numbers instead of 2,076; VGG: 5,756 of 5,816 instead of 5,306).
TT_STORAGE_MIXED = DeepTNStorage(
    depth=0,
    radix="sized",
    fill=True,
    name="tt-storage-mixed",
    summary="Tensor-train storage on mixed-radix sites (axes > 4 split into their prime factors ≤ 7, "
    "not padded to powers of two; axes ≤ 4, e.g. 3x3 kernels, padded to binary sites); a parameter "
    "target is spent to the last bond step; heal it.",
)
