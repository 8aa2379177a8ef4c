"""SVD cuts of a convolution kernel: split its indices (O, I, *k) into two groups, SVD that matrix.

    cut-o        {O | I·k}:        W as O × (I·k),          W ≈ A·B
                 Conv(I→O, k) ⇒ Conv k(I→r, stride/pads/dilation) → Conv 1x1(r→O, +bias)
    cut-i        {I | O·k}:        W as I × (O·k),          W ≈ A·B
                 Conv(I→O, k) ⇒ Conv 1x1(I→r) → Conv k(r→O, stride/pads/dilation, +bias)
    cut-spatial  {O·kh | I·kw}:    W (O, kh, I, kw) as (O·kh) × (I·kw),  W ≈ A·B      (2-D only)
                 Conv(I→O, kh×kw) ⇒ Conv 1×kw(I→r, W geometry) → Conv kh×1(r→O, H geometry, +bias)

The discarded singular values of each cut are exactly the kernel norm lost (Singh, Jahromi, Orús
2024), which also makes the cuts the per-layer sensitivity probe of `tnopt inspect --cuts`.
A rank-r cut of an m×n matrix stores r·(m + n) numbers instead of m·n. With calibration statistics
the SVD is whitened on the input side (channel moment for cut-i, patch moment for cut-o, its row
blocks for the spatial cut), so it truncates output error rather than weight norm.
"""

from __future__ import annotations

from math import prod

import numpy as np

from . import _linalg
from ._conv import mixed_positions, plain_conv_reason
from ._method import Cost, Factors, Method, RefitSpec, scaled_rank
from .tucker2 import spatial_conv_attrs

CUTS = ("o", "i", "spatial")
CUT_LABELS = {"o": "O|Ikk", "i": "I|Okk", "spatial": "Okh|Ikw"}


def cut_matrix(weight: np.ndarray, cut: str) -> np.ndarray:
    """The kernel as the matrix whose SVD is the cut: rows are the indices left of the bar."""
    o, i = weight.shape[:2]
    if cut == "o":
        return weight.reshape(o, -1)
    if cut == "i":
        return np.swapaxes(weight, 0, 1).reshape(i, -1)
    if cut == "spatial":
        _, _, kh, kw = weight.shape
        return weight.transpose(0, 2, 1, 3).reshape(o * kh, i * kw)
    raise ValueError(f"unknown cut {cut!r}; choose from {CUTS}")


def cut_shape(weight_shape: tuple[int, ...], cut: str) -> tuple[int, int]:
    o, i, k = weight_shape[0], weight_shape[1], prod(weight_shape[2:])
    if cut == "o":
        return o, i * k
    if cut == "i":
        return i, o * k
    if cut == "spatial":
        return o * weight_shape[2], i * weight_shape[3]
    raise ValueError(f"unknown cut {cut!r}; choose from {CUTS}")


def cut_profile(weight: np.ndarray, cut: str, factors=(2, 4, 8)) -> dict:
    """For each parameter-reduction factor f: the largest rank with r·(m+n) ≤ m·n/f and the fraction
    of the kernel's Frobenius norm it keeps (rank None when even rank 1 is too large)."""
    m, n = cut_shape(weight.shape, cut)
    values = _linalg.singular_values(cut_matrix(weight, cut))
    out = {}
    for f in factors:
        r = _linalg.rank_for_param_ratio(m, n, f)
        out[f] = (r, _linalg.kept_norm_fraction(values, r)) if r >= 1 else (None, None)
    return out


def input_side_moment(weight_shape, cut: str, stats) -> np.ndarray:
    """Second moment of what the cut's input-side factor reads: the im2col patch (I, *k) for cut-o,
    a row segment (I, kw) for the spatial cut. From the patch moment when it was collected (its
    fixed-row blocks averaged over kh for the spatial cut), else the channel moment ⊗ I, which
    ignores the correlation between neighbouring pixels."""
    i, kernel = weight_shape[1], tuple(weight_shape[2:])
    patch = getattr(stats, "patch_moment", None)
    taps = prod(kernel) if cut == "o" else kernel[-1]
    if patch is not None and patch.shape == (i * prod(kernel),) * 2:
        if cut == "o":
            return patch
        kh, kw = kernel
        blocks = patch.reshape(i, kh, kw, i, kh, kw)
        # Averaged in float64 (a stored patch moment is float32).
        return np.mean([blocks[:, h, :, :, h, :] for h in range(kh)], axis=0, dtype=np.float64).reshape(
            i * kw, i * kw
        )
    return np.kron(stats.input_moment, np.eye(taps))


class Cut(Method):
    op_types = ("Conv",)
    zero_paddable = True

    def __init__(self, cut: str):
        if cut not in CUTS:
            raise ValueError(f"unknown cut {cut!r}; choose from {CUTS}")
        self.cut = cut
        self.name = f"cut-{cut}"

    def check(self, layer) -> str | None:
        return super().check(layer) or plain_conv_reason(layer, self.name, two_d=self.cut == "spatial")

    def full_rank(self, layer) -> int:
        return min(cut_shape(layer.weight_shape, self.cut))

    def rank_from_ratio(self, layer, ratio: float) -> int:
        return scaled_rank(self.full_rank(layer), ratio)

    def rank_from_energy(self, layer, energy: float) -> int:
        return _linalg.rank_for_energy(_linalg.singular_values(cut_matrix(layer.weight, self.cut)), energy)

    def cost(self, layer, rank: int) -> Cost:
        o, i = layer.weight_shape[:2]
        k = prod(layer.weight_shape[2:])
        if self.cut == "o":
            first, last = rank * i * k, rank * o
            flops = 2 * layer.out_positions * (first + last)
        elif self.cut == "i":
            first, last = i * rank, rank * o * k
            flops = 2 * (layer.in_positions * first + layer.out_positions * last)
        else:
            kh, kw = layer.weight_shape[2:]
            first, last = rank * i * kw, o * rank * kh
            # The 1×kw conv strides only W, so its output sits at (H_in, W_out).
            flops = 2 * (mixed_positions(layer, (1,)) * first + layer.out_positions * last)
        return Cost(first + last, flops)

    def decompose(self, layer, rank: int, stats=None) -> Factors:
        weight = layer.weight
        matrix = cut_matrix(weight, self.cut)
        if stats is None:
            a, b, err = _linalg.truncated_svd(matrix, rank)
            notes = {}
        elif self.cut == "i":
            # Rows are input channels: whiten them by the channel moment, as for y = x·M.
            a, b, err, output_err = _linalg.whitened_svd(matrix, stats.input_moment, rank)
            notes = {"data_aware": True, "output_error": output_err}
        else:
            # Columns hold the input side (I·k patch or I·kw row segment): whiten the transpose.
            at, bt, err, output_err = _linalg.whitened_svd(
                matrix.T, input_side_moment(weight.shape, self.cut, stats), rank
            )
            a, b = bt.T, at.T
            notes = {"data_aware": True, "output_error": output_err}
        return Factors(
            {"A": a.astype(weight.dtype), "B": b.astype(weight.dtype)}, int(a.shape[1]), err, notes
        )

    def build(self, emit, layer, factors: Factors) -> None:
        a, b = factors.arrays["A"], factors.arrays["B"]
        r = a.shape[1]
        o, i = layer.weight_shape[:2]
        kernel = tuple(layer.weight_shape[2:])
        point = (1,) * len(kernel)
        bias_input = self.bias_input(emit, factors)
        bias = [bias_input] if bias_input is not None else []
        if self.cut == "o":
            hidden = emit.op(
                "Conv",
                "spatial",
                [emit.data_input, emit.const("spatial/W", b.reshape(r, i, *kernel))],
                spatial_conv_attrs(layer, kernel),
            )
            emit.op(
                "Conv",
                "out_1x1",
                [hidden, emit.const("out_1x1/W", a.reshape(o, r, *point))] + bias,
                {"kernel_shape": list(point)},
                final=True,
            )
        elif self.cut == "i":
            hidden = emit.op(
                "Conv",
                "in_1x1",
                [emit.data_input, emit.const("in_1x1/W", a.T.reshape(r, i, *point))],
                {"kernel_shape": list(point)},
            )
            w_out = np.swapaxes(b.reshape(r, o, *kernel), 0, 1)
            emit.op(
                "Conv",
                "spatial",
                [hidden, emit.const("spatial/W", w_out)] + bias,
                spatial_conv_attrs(layer, kernel),
                final=True,
            )
        else:
            kh, kw = kernel
            w_first = b.reshape(r, i, 1, kw)
            w_last = a.reshape(o, kh, r).transpose(0, 2, 1)[..., None]
            hidden = emit.op(
                "Conv",
                "row",
                [emit.data_input, emit.const("row/W", w_first)],
                spatial_conv_attrs(layer, (1, kw), axes=(1,)),
            )
            emit.op(
                "Conv",
                "column",
                [hidden, emit.const("column/W", w_last)] + bias,
                spatial_conv_attrs(layer, (kh, 1), axes=(0,)),
                final=True,
            )

    def forward(self, layer, arrays, x, bias=None):
        from . import _torch

        a, b = arrays["A"], arrays["B"]
        r = a.shape[1]
        o, i = layer.weight_shape[:2]
        kernel = tuple(layer.weight_shape[2:])
        point = (1,) * len(kernel)
        bias = self.effective_bias(arrays, bias)
        if self.cut == "o":
            h = _torch.conv(x, b.reshape(r, i, *kernel), None, spatial_conv_attrs(layer, kernel))
            return _torch.conv(h, a.reshape(o, r, *point), bias, {})
        if self.cut == "i":
            h = _torch.conv(x, a.T.reshape(r, i, *point), None, {})
            return _torch.conv(
                h, b.reshape(r, o, *kernel).transpose(0, 1), bias, spatial_conv_attrs(layer, kernel)
            )
        kh, kw = kernel
        h = _torch.conv(x, b.reshape(r, i, 1, kw), None, spatial_conv_attrs(layer, (1, kw), axes=(1,)))
        w_last = a.reshape(o, kh, r).permute(0, 2, 1)[..., None]
        return _torch.conv(h, w_last, bias, spatial_conv_attrs(layer, (kh, 1), axes=(0,)))

    def refit_spec(self, layer) -> RefitSpec | None:
        # Only cut-o ends in a 1x1 conv (a per-pixel linear map); the others end in a spatial conv.
        return RefitSpec("spatial", "A", 1, True, intercept=True) if self.cut == "o" else None


CUT_O, CUT_I, CUT_SPATIAL = Cut("o"), Cut("i"), Cut("spatial")
