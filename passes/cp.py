"""CP (canonical polyadic) decomposition of a 2-D convolution kernel, the separable chain of Lebedev 2015.

    W (O, I, kh, kw) ≈ Σ_r a_out[o,r] · a_in[i,r] · a_h[y,r] · a_w[x,r]

    Conv(I→O, kh×kw)  ⇒  Conv 1x1(I→r) → Conv kh×1(group r, H geometry) → Conv 1×kw(group r, W geometry)
                          → Conv 1x1(r→O, +bias)

The H axis's stride/pads/dilation go on the kh×1 depthwise conv and the W axis's on the 1×kw one
(putting both strides on one conv is the classic bug). auto_pad SAME_* / VALID are carried to both:
each axis's SAME padding depends only on that axis's size, kernel, stride and dilation, and the
other conv is 1-wide with stride 1 there, so it pads nothing on that axis.

Fits are by damped CP-ALS (`_cp_als.cp_als`); with calibration statistics the input mode is fitted
in the channel-covariance-weighted norm (CP of W ×_I Sᵀ, C = SSᵀ). A degenerate fit (huge
components cancelling each other, non-finite factors, or no fit at all) is still returned, with
a `Refusal` carrying the reason (`notes["degenerate"]` for degeneracy): it is never applied.
"""

from __future__ import annotations

import numpy as np

from . import _cp_als, _linalg
from ._conv import mixed_positions, plain_conv_reason
from ._method import Cost, Factors, Method, RefitSpec, Refusal, scaled_rank
from .tucker2 import spatial_conv_attrs


class CP(Method):
    name = "cp"
    zero_paddable = True
    op_types = ("Conv",)

    def check(self, layer) -> str | None:
        return super().check(layer) or plain_conv_reason(layer, "CP", two_d=True)

    def full_rank(self, layer) -> int:
        # The generic upper bound on the CP rank: the product of all modes but the largest.
        dims = layer.weight_shape
        total = int(np.prod(dims))
        return min(total // d for d in dims)

    def rank_from_ratio(self, layer, ratio: float) -> int:
        return scaled_rank(self.full_rank(layer), ratio)

    def rank_from_energy(self, layer, energy: float) -> int:
        # CP has no spectrum of its own; a rank-r CP has O- and I-mode ranks ≤ r, so the larger of the
        # two unfoldings' energy ranks is the smallest CP rank that can keep that energy.
        out_spectrum, in_spectrum = _linalg.tucker2_mode_spectra(layer.weight)
        return max(
            _linalg.rank_for_energy(out_spectrum, energy), _linalg.rank_for_energy(in_spectrum, energy)
        )

    def cost(self, layer, rank: int) -> Cost:
        o, i, kh, kw = layer.weight_shape
        params = rank * (i + kh + kw + o)
        flops = (
            2
            * rank
            * (layer.in_positions * i + mixed_positions(layer, (0,)) * kh + layer.out_positions * (kw + o))
        )
        return Cost(params, flops)

    def decompose(self, layer, rank: int, stats=None) -> Factors | Refusal:
        return self._fit(layer, rank, stats)

    def _fit(self, layer, rank: int, stats=None, n_refine: int = 10) -> Factors | Refusal:
        weight = layer.weight
        if stats is None:
            (a_out, a_in, a_h, a_w), err, notes = _cp_als.cp_als(weight, rank, n_refine=n_refine)
        else:
            # CP of W ×_I Sᵀ (C = SSᵀ the channel moment), then a_in = S⁻ᵀ·ã_in: the fit is weighted
            # by the input directions real data excites.
            s = _linalg.whitening(stats.input_moment)
            (a_out, a_in, a_h, a_w), _, notes = _cp_als.cp_als(
                _linalg.mode_product(weight, s.T, 1), rank, n_refine=n_refine
            )
            a_in = _linalg.unwhiten(s, a_in)
            err = _linalg.relative_error(weight, _cp_als.cp_reconstruct([a_out, a_in, a_h, a_w]))
            notes["data_aware"] = True
        if notes.get("refused"):
            return Refusal(notes.pop("refused"), err, notes)
        arrays = {"A_out": a_out, "A_in": a_in, "A_h": a_h, "A_w": a_w}
        return Factors({k: v.astype(weight.dtype) for k, v in arrays.items()}, int(rank), err, notes)

    def estimate(self, layer, rank: int, stats=None) -> Factors | Refusal:
        weight = layer.weight
        o, i, kh, kw = weight.shape
        if kh * kw == 1 and rank <= min(o, i):
            # A 1x1 kernel's rank-r CP is a rank-r matrix, whose best fit (in the whitened norm
            # with statistics) is the truncated SVD that ALS only approaches: one SVD for all ranks.
            matrix = np.asarray(weight[:, :, 0, 0], dtype=np.float64).T  # (I, O): y = x·M
            if stats is not None:
                a_in, b, _, _ = _linalg.whitened_svd(matrix, stats.input_moment, rank)
            else:
                a_in, b, _ = _linalg.truncated_svd(matrix, rank)
            r = a_in.shape[1]
            factors = [b.T, a_in, np.ones((1, r)), np.ones((1, r))]
            err = _linalg.relative_error(weight, _cp_als.cp_reconstruct(factors))
            arrays = dict(zip(("A_out", "A_in", "A_h", "A_w"), factors))
            notes = {"estimate": True}
            return Factors({k: v.astype(weight.dtype) for k, v in arrays.items()}, int(r), err, notes)
        # Larger kernels: the fit itself. Without its refining sweeps on the full kernel a fit costs
        # only ~20% less (ResNet-50) and its error is higher, which moved the method screen on VGG.
        return self.decompose(layer, rank, stats)

    def build(self, emit, layer, factors: Factors) -> None:
        a = factors.arrays
        r = a["A_out"].shape[1]
        kh, kw = a["A_h"].shape[0], a["A_w"].shape[0]
        hidden = emit.op(
            "Conv",
            "in_1x1",
            [emit.data_input, emit.const("in_1x1/W", a["A_in"].T[:, :, None, None])],
            {"kernel_shape": [1, 1]},
        )
        hidden = emit.op(
            "Conv",
            "depth_h",
            [hidden, emit.const("depth_h/W", a["A_h"].T[:, None, :, None])],
            spatial_conv_attrs(layer, (kh, 1), group=r, axes=(0,)),
        )
        hidden = emit.op(
            "Conv",
            "depth_w",
            [hidden, emit.const("depth_w/W", a["A_w"].T[:, None, None, :])],
            spatial_conv_attrs(layer, (1, kw), group=r, axes=(1,)),
        )
        bias = self.bias_input(emit, factors)
        inputs = [hidden, emit.const("out_1x1/W", a["A_out"][:, :, None, None])]
        emit.op(
            "Conv",
            "out_1x1",
            inputs + ([bias] if bias is not None else []),
            {"kernel_shape": [1, 1]},
            final=True,
        )

    def forward(self, layer, arrays, x, bias=None):
        from . import _torch

        r = arrays["A_out"].shape[1]
        kh, kw = arrays["A_h"].shape[0], arrays["A_w"].shape[0]
        h = _torch.conv(x, arrays["A_in"].T[:, :, None, None], None, {})
        h = _torch.conv(
            h, arrays["A_h"].T[:, None, :, None], None, spatial_conv_attrs(layer, (kh, 1), group=r, axes=(0,))
        )
        h = _torch.conv(
            h, arrays["A_w"].T[:, None, None, :], None, spatial_conv_attrs(layer, (1, kw), group=r, axes=(1,))
        )
        return _torch.conv(h, arrays["A_out"][:, :, None, None], self.effective_bias(arrays, bias), {})

    def refit_spec(self, layer) -> RefitSpec:
        # The output 1x1 is a per-pixel linear map of the depthwise chain's output: refittable.
        return RefitSpec("depth_w", "A_out", 1, True, intercept=True)


METHOD = CP()
