"""MPO / TT-matrix of a Gemm, MatMul or 1x1 Conv weight (Novikov et al. 2015, "Tensorizing NNs").

    y = x·W,  W (K, N),  K = ∏ i_k,  N = ∏ o_k,
    W[(i_1..i_d), (o_1..o_d)] = G_1[i_1, o_1] ⋯ G_d[i_d, o_d],  cores G_k (r_{k-1}, i_k, o_k, r_k)

    compute:  MatMul(x, W)  ⇒  [Reshape → Transpose → (Reshape) → MatMul(G_k)] × d → Reshape (→ Add)
    storage:  MatMul(x, W)  ⇒  MatMul(x, Reshape(Transpose(MatMul(⋯MatMul(G_1, G_2)⋯, G_d))))

The rank is the max bond dimension (an int; a tuple gives the d-1 bonds one by one); every bond is
clipped to the rank of its unfolding, and full rank (the largest such cap) is an exact TT. Modes are
`balanced_factorization(K, d)` and `(N, d)`, d = `cores` (default 3). No Einsum: several runtimes
mishandle it. Compute mode reads the input's shape at run time (Shape/Slice/Concat), so dynamic batch
and sequence dims survive. Storage mode keeps the dense op and its FLOPs; the runtime folds the
constant-only contraction at load, so only the file shrinks (by the TT parameter ratio).
Gemm folds alpha/transB into W; transA becomes a Transpose, beta·C an Add. A weight on the left of a
MatMul (y = W·x) is the same TT with i/o swapped, contracted over x's second-to-last axis.
"""

from __future__ import annotations

from math import prod

import numpy as np

from . import _linalg, _tensor_train
from ._method import Cost, Factors, Method, scaled_rank

DEFAULT_CORES = 3
_INT64_MAX = np.iinfo(np.int64).max


class MPO(Method):
    op_types = ("Gemm", "MatMul", "Conv")

    def __init__(self, cores: int = DEFAULT_CORES, mode: str = "compute"):
        if cores < 2:
            raise ValueError(f"an MPO needs at least 2 cores, got {cores}")
        if mode not in ("compute", "storage"):
            raise ValueError(f"mode must be 'compute' or 'storage', got {mode!r}")
        self.cores, self.mode = int(cores), mode
        self.name = "mpo" if mode == "compute" else "mpo-storage"
        # Storage mode runs exactly as the dense layer once the runtime folds the cores at load: a
        # latency guard should ask it not to be slower, not to be faster.
        self.folded_at_load = mode == "storage"

    def check(self, layer) -> str | None:
        reason = super().check(layer)
        if reason is not None or layer.op != "Conv":
            # W·x contracts x's second-to-last axis: without x's rank that axis cannot be found.
            unknown_rank = self.mode == "compute" and _left_weight(layer) and layer.input_shape is None
            return "weight on the left of a MatMul whose input rank is unknown" if unknown_rank else reason
        if layer.group != 1:
            return "grouped Conv: MPO needs group=1"
        if any(k != 1 for k in layer.weight_shape[2:]):
            return "MPO handles 1x1 Conv only (a spatial kernel has no (K, N) matrix form)"
        if any(s != 1 for s in layer.attr("strides")) or any(p != 0 for p in layer.attr("pads")):
            return "MPO handles 1x1 Conv with stride 1 and no padding only"
        return None

    def full_rank(self, layer) -> int:
        return max(_tensor_train.tt_bond_caps(*self._modes(layer)))

    def rank_from_ratio(self, layer, ratio: float) -> int:
        return scaled_rank(self.full_rank(layer), ratio)

    def rank_from_energy(self, layer, energy: float) -> int:
        # Each bond keeps `energy` of its unfolding's spectrum; TT-SVD's squared error is then at most
        # (d-1)·(1 - energy) of ‖W‖², and the max bond is the rank.
        matrix = _matrix(layer.weight)
        spectra = _tensor_train.tt_unfolding_spectra(matrix, *self._natural_modes(matrix.shape))
        return max(_linalg.rank_for_energy(s, energy) for s in spectra)

    def candidate_ranks(self, layer) -> list:
        """The base rule (fewer parameters than the dense layer), and in compute mode fewer FLOPs
        too: the chain holds rows·∏_{j>k} i_j·∏_{j≤k} o_j·r_k values after core k, so a rank that
        costs more FLOPs than the dense layer also holds intermediates far larger than its output
        (a MatMul (…, 80)·(80, 6906): 6906 = 2·3·1151 puts the out mode 1151 first, and bond 90
        holds ~240x the output per row; its bonds 3-88 cost 1.25-86x the dense FLOPs) — never a
        compute saving, and memory a batch cannot afford. A parameter saving at any FLOPs is what
        `mpo-storage` is for."""
        ranks = super().candidate_ranks(layer)
        if self.mode == "storage":
            return ranks
        return [r for r in ranks if self.cost(layer, r).flops < layer.flops]

    def cost(self, layer, rank) -> Cost:
        in_modes, out_modes = self._modes(layer)
        bonds = _tensor_train.tt_bonds(in_modes, out_modes, rank)
        params = _tensor_train.tt_param_count(in_modes, out_modes, bonds)
        if self.mode == "storage":
            return Cost(params, layer.flops)
        return Cost(params, _tensor_train.tt_chain_flops(in_modes, out_modes, bonds, layer.in_positions))

    def decompose(self, layer, rank, stats=None) -> Factors:
        weight = layer.weight
        matrix = _matrix(weight)
        in_modes, out_modes = self._natural_modes(matrix.shape)
        cores = _tensor_train.tt_svd_matrix(matrix, in_modes, out_modes, rank)
        err = _linalg.relative_error(matrix, _tensor_train.tt_to_matrix(cores))
        bonds = tuple(c.shape[3] for c in cores[:-1])
        realized = max(bonds) if np.isscalar(rank) else bonds
        arrays = {f"G{k + 1}": np.ascontiguousarray(c.astype(weight.dtype)) for k, c in enumerate(cores)}
        return Factors(
            arrays,
            realized,
            err,
            {"mode": self.mode, "bonds": bonds, "in_modes": in_modes, "out_modes": out_modes},
        )

    def build(self, emit, layer, factors: Factors) -> None:
        cores = [factors.arrays[f"G{k + 1}"] for k in range(len(factors.arrays))]
        (_build_storage if self.mode == "storage" else _build_compute)(emit, layer, cores)

    def forward(self, layer, arrays, x, bias=None):
        """Both modes train through the contracted weight: the same function as the compute chain
        (a product of the same cores), so the gradients are the chain's; only the FLOPs differ."""
        from . import _torch

        cores = [arrays[f"G{k + 1}"] for k in range(sum(key.startswith("G") for key in arrays))]
        matrix = _torch.tt_to_matrix(cores)
        weight = matrix.T.reshape(layer.weight_shape) if layer.op == "Conv" else matrix
        return _torch.dense_forward(layer, weight, bias, x)

    def _natural_modes(self, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (
            _tensor_train.balanced_factorization(shape[0], self.cores),
            _tensor_train.balanced_factorization(shape[1], self.cores),
        )

    def _modes(self, layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input modes, output modes) in the direction the activations flow."""
        shape = layer.weight_shape
        rows, cols = (shape[1], shape[0]) if layer.op == "Conv" else shape[:2]
        in_modes, out_modes = self._natural_modes((rows, cols))
        return (out_modes, in_modes) if _left_weight(layer) else (in_modes, out_modes)


def _matrix(weight: np.ndarray) -> np.ndarray:
    """The weight as the matrix that gets factorized: a Conv's (O, I, 1, ..) kernel becomes (I, O)."""
    return weight.reshape(weight.shape[0], -1).T if weight.ndim > 2 else weight


def _left_weight(layer) -> bool:
    return layer.op == "MatMul" and layer.attr("weight_side") == "left"


def _shape(emit, x, role: str, parts, static):
    """An int64 shape tensor from `parts`: ints, or (start, end) slices of x's run-time shape.
    Slices that the analyzed input shape `static` knows (all ints, or empty) become constants, so a
    static model gets no Shape ops at all."""
    pieces: list = []
    for part in parts:
        if not isinstance(part, tuple):
            pieces.append(int(part))
            continue
        dims = list(static)[slice(part[0], None if part[1] == _INT64_MAX else part[1])] if static else None
        if dims is not None and all(isinstance(d, int) for d in dims):
            pieces.extend(int(d) for d in dims)
        else:
            pieces.append(part)
    if all(isinstance(p, int) for p in pieces):
        return emit.const(f"{role}/shape", np.array(pieces, np.int64))
    whole = emit.op("Shape", f"{role}/input_shape", [x], dtype=np.int64)
    inputs, constants = [], []
    for index, piece in enumerate(pieces + [None]):
        if isinstance(piece, int):
            constants.append(piece)
            continue
        if constants:
            inputs.append(emit.const(f"{role}/dims{index}", np.array(constants, np.int64)))
            constants = []
        if piece is not None:
            bounds = [
                emit.const(f"{role}/slice{index}/{name}", np.array([v], np.int64))
                for name, v in (("start", piece[0]), ("end", piece[1]), ("axis", 0))
            ]
            inputs.append(emit.op("Slice", f"{role}/slice{index}", [whole, *bounds], dtype=np.int64))
    if len(inputs) == 1:
        return inputs[0]
    return emit.op("Concat", f"{role}/concat", inputs, {"axis": 0}, dtype=np.int64)


def _reshape(emit, tensor, role: str, shape, *, final: bool = False):
    shape_tensor = emit.const(f"{role}/shape", np.array(shape, np.int64))
    return emit.op("Reshape", role, [tensor, shape_tensor], final=final)


def _build_compute(emit, layer, cores) -> None:
    if _left_weight(layer):
        cores = [c.transpose(0, 2, 1, 3) for c in cores]  # W·x = (xᵀ·Wᵀ)ᵀ: swap each core's i and o
    in_modes, out_modes = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    bonds = [c.shape[0] for c in cores] + [1]
    n_out, rest = prod(out_modes), prod(in_modes[1:])
    x = emit.data_input
    static = layer.input_shape
    # Channel layout: the contracted axis has trailing dims S (Conv spatial, x's last axis for a
    # left weight); folding S into the batch in the first Transpose saves an NCHW→NHWC pass.
    channel = layer.op == "Conv" or (_left_weight(layer) and len(static) != 1)
    if layer.op == "Gemm" and layer.attr("transA"):
        x = emit.op("Transpose", "transpose_a", [x], {"perm": [1, 0]})
    h, first = x, 0
    if channel:
        if layer.op == "Conv":
            split = emit.const("split/shape", np.array([0, in_modes[0], rest, -1], np.int64))
        else:
            split = _shape(emit, x, "split", [-1, in_modes[0], rest, (-1, _INT64_MAX)], static)
        h = emit.op("Reshape", "split", [h, split])
        h = emit.op("Transpose", "core1/transpose", [h], {"perm": [0, 3, 2, 1]})
        h = emit.op("MatMul", "core1", [h, emit.const("G1", cores[0].reshape(in_modes[0], -1))])
        first = 1
    for k in range(first, len(cores)):
        i, r, batch = in_modes[k], bonds[k], prod(in_modes[k + 1 :]) * prod(out_modes[:k])
        tag = f"core{k + 1}"
        if i == 1:  # nothing to move: the bond already sits last
            h = _reshape(emit, h, f"{tag}/reshape", [-1, batch, r])
        elif r == 1:
            h = _reshape(emit, h, f"{tag}/reshape", [-1, i, batch])
            h = emit.op("Transpose", f"{tag}/transpose", [h], {"perm": [0, 2, 1]})
        else:
            h = _reshape(emit, h, f"{tag}/reshape", [-1, i, batch, r])
            h = emit.op("Transpose", f"{tag}/transpose", [h], {"perm": [0, 2, 3, 1]})
            h = _reshape(emit, h, f"{tag}/merge", [-1, batch, r * i])
        h = emit.op("MatMul", tag, [h, emit.const(f"G{k + 1}", cores[k].reshape(r * i, -1))])

    bias = _compute_bias(emit, layer, n_out)
    if layer.op == "Conv":
        n_spatial = len(layer.weight_shape) - 2
        target = _shape(emit, x, "output", [(0, 1), (2, _INT64_MAX), n_out], static)
        h = emit.op("Reshape", "output", [h, target])
        perm = [0, n_spatial + 1, *range(1, n_spatial + 1)]
        h = emit.op("Transpose", "to_channels_first", [h], {"perm": perm}, final=bias is None)
    elif channel:
        unfold = _shape(emit, x, "unfold", [-1, (-1, _INT64_MAX), n_out], static)
        h = emit.op("Reshape", "unfold", [h, unfold])
        h = emit.op("Transpose", "swap_last", [h], {"perm": [0, 2, 1]})
        target = _shape(emit, x, "output", [(0, -2), n_out, (-1, _INT64_MAX)], static)
        h = emit.op("Reshape", "output", [h, target], final=bias is None)
    else:
        parts = [-1, n_out] if layer.op == "Gemm" else [(0, -1), n_out]
        h = emit.op("Reshape", "output", [h, _shape(emit, x, "output", parts, static)], final=bias is None)
    if bias is not None:
        emit.op("Add", "bias", [h, bias], final=True)


def _compute_bias(emit, layer, n_out):
    """The tensor to add after the chain: Gemm's beta·C (broadcastable as C is), Conv's B as (O, 1, ..)."""
    if emit.bias is None:
        return None
    if layer.op == "Conv":
        shape = [n_out] + [1] * (len(layer.weight_shape) - 2)
        return _reshape(emit, emit.bias, "bias/reshape", shape)
    beta = float(layer.attr("beta", 1.0))
    if beta == 0.0:
        return None  # Gemm ignores C; 0·C would turn an inf in C into NaN
    if beta == 1.0:
        return emit.bias
    return emit.op("Mul", "bias/beta", [emit.bias, emit.const("beta", np.array(beta, emit.dtype))])


def _build_storage(emit, layer, cores) -> None:
    """Constant-only contraction of the cores back to the dense weight, consumed by the original op."""
    d = len(cores)
    in_modes, out_modes = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    w = emit.const("G1", cores[0].reshape(-1, cores[0].shape[3]))
    for k in range(1, d):
        core = emit.const(f"G{k + 1}", cores[k].reshape(cores[k].shape[0], -1))
        w = emit.op("MatMul", f"rebuild/core{k + 1}", [w, core])
        if k < d - 1:
            w = _reshape(emit, w, f"rebuild/core{k + 1}/reshape", [-1, cores[k].shape[3]])
    w = _reshape(emit, w, "rebuild/split", [m for pair in zip(in_modes, out_modes) for m in pair])
    rows_first = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    cols_first = rows_first[d:] + rows_first[:d]
    rows, cols = prod(in_modes), prod(out_modes)
    if layer.op == "Conv":  # (I, O) matrix → (O, I, 1, ..) kernel
        w = emit.op("Transpose", "rebuild/transpose", [w], {"perm": cols_first})
        w = _reshape(emit, w, "rebuild/weight", [cols, rows] + [1] * (len(layer.weight_shape) - 2))
    else:
        w = emit.op("Transpose", "rebuild/transpose", [w], {"perm": rows_first})
        w = _reshape(emit, w, "rebuild/weight", [rows, cols])
    bias = [emit.bias] if emit.bias is not None else []
    if layer.op == "Conv":
        kernel = [1] * (len(layer.weight_shape) - 2)
        emit.op("Conv", "conv", [emit.data_input, w, *bias], {"kernel_shape": kernel}, final=True)
    elif layer.op == "Gemm":
        attrs = {"transA": layer.attr("transA"), "beta": layer.attr("beta")}
        emit.op("Gemm", "gemm", [emit.data_input, w, *bias], attrs, final=True)
    elif _left_weight(layer):
        emit.op("MatMul", "matmul", [w, emit.data_input], final=True)
    else:
        emit.op("MatMul", "matmul", [emit.data_input, w], final=True)


METHOD = MPO()
STORAGE = MPO(mode="storage")
