"""Tucker-2 of an N-d convolution kernel on its output and input channel modes.

    W (O, I, *k) ≈ core ×_O U_out ×_I U_in,  core (r_o, r_i, *k),  U_out (O, r_o),  U_in (I, r_i)

    Conv(I→O, k)  ⇒  Conv 1x1(I→r_i) → Conv k(r_i→r_o, stride/pads/dilation) → Conv 1x1(r_o→O, +bias)

With calibration statistics the input mode is fitted in the channel-covariance-weighted norm.
The input 1x1 runs at the input resolution, the core and output 1x1 at the output resolution, so
stride lands on the core where it cuts the most work. Works for Conv1d/2d/3d unchanged.
"""

from __future__ import annotations

from math import prod

import numpy as np

from . import _linalg
from ._method import Cost, Factors, Method, RefitSpec, scaled_rank

# HOOI sweeps of a fit after its HOSVD start (_linalg.partial_tucker stops earlier once converged).
HOOI_SWEEPS = 10


class Tucker2(Method):
    name = "tucker2"
    zero_paddable = True
    op_types = ("Conv",)

    def check(self, layer) -> str | None:
        reason = super().check(layer)
        if reason is None and layer.group != 1:
            return "grouped Conv: Tucker-2 needs group=1"
        return reason

    def full_rank(self, layer) -> tuple[int, int]:
        o, i = layer.weight_shape[:2]
        k = prod(layer.weight_shape[2:])
        # The O-mode unfolding has rank ≤ min(O, I·k) and the I-mode ≤ min(I, O·k).
        return (min(o, i * k), min(i, o * k))

    def rank_from_ratio(self, layer, ratio: float) -> tuple[int, int]:
        r_out, r_in = self.full_rank(layer)
        return (scaled_rank(r_out, ratio), scaled_rank(r_in, ratio))

    def rank_from_energy(self, layer, energy: float) -> tuple[int, int]:
        out_spectrum, in_spectrum = _linalg.tucker2_mode_spectra(layer.weight)
        return (_linalg.rank_for_energy(out_spectrum, energy), _linalg.rank_for_energy(in_spectrum, energy))

    def cost(self, layer, rank: tuple[int, int]) -> Cost:
        o, i = layer.weight_shape[:2]
        k = prod(layer.weight_shape[2:])
        r_out, r_in = rank
        first, core, last = i * r_in, r_out * r_in * k, r_out * o
        flops = 2 * (layer.in_positions * first + layer.out_positions * (core + last))
        return Cost(first + core + last, flops)

    def decompose(self, layer, rank: tuple[int, int], stats=None) -> Factors:
        return self._fit(layer, rank, stats, HOOI_SWEEPS)

    def estimate(self, layer, rank: tuple[int, int], stats=None) -> Factors:
        # The truncated HOSVD: the two mode SVDs are shared by every rank (memoised), where HOOI
        # pays two SVDs per sweep per rank; HOOI starts there and only lowers the residual.
        factors = self._fit(layer, rank, stats, 0)
        factors.notes["estimate"] = True
        return factors

    def _fit(self, layer, rank: tuple[int, int], stats, n_iter: int) -> Factors:
        weight = layer.weight
        if stats is not None:
            u_out, core, u_in, err = _linalg.whitened_partial_tucker(
                weight, rank, stats.input_moment, n_iter=n_iter
            )
        else:
            u_out, core, u_in, err = _linalg.partial_tucker(weight, rank, n_iter=n_iter)
        return Factors(
            {
                "U_out": u_out.astype(weight.dtype),
                "core": core.astype(weight.dtype),
                "U_in": u_in.astype(weight.dtype),
            },
            (u_out.shape[1], u_in.shape[1]),
            err,
        )

    def build(self, emit, layer, factors: Factors) -> None:
        u_out, core, u_in = factors.arrays["U_out"], factors.arrays["core"], factors.arrays["U_in"]
        n_spatial = core.ndim - 2
        point = (1,) * n_spatial
        w_in = u_in.T.reshape(u_in.shape[1], u_in.shape[0], *point)
        w_out = u_out.reshape(u_out.shape[0], u_out.shape[1], *point)
        hidden = emit.op(
            "Conv", "in_1x1", [emit.data_input, emit.const("in_1x1/W", w_in)], {"kernel_shape": list(point)}
        )
        hidden = emit.op(
            "Conv",
            "core",
            [hidden, emit.const("core/W", np.ascontiguousarray(core))],
            spatial_conv_attrs(layer, core.shape[2:]),
        )
        bias = self.bias_input(emit, factors)
        inputs = [hidden, emit.const("out_1x1/W", w_out)] + ([bias] if bias is not None else [])
        emit.op("Conv", "out_1x1", inputs, {"kernel_shape": list(point)}, final=True)

    def forward(self, layer, arrays, x, bias=None):
        from . import _torch

        u_out, core, u_in = arrays["U_out"], arrays["core"], arrays["U_in"]
        point = (1,) * (core.dim() - 2)
        h = _torch.conv(x, u_in.T.reshape(u_in.shape[1], u_in.shape[0], *point), None, {})
        h = _torch.conv(h, core, None, spatial_conv_attrs(layer, core.shape[2:]))
        w_out = u_out.reshape(u_out.shape[0], u_out.shape[1], *point)
        return _torch.conv(h, w_out, self.effective_bias(arrays, bias), {})

    def refit_spec(self, layer) -> RefitSpec:
        return RefitSpec("core", "U_out", 1, True, intercept=True)


def spatial_conv_attrs(layer, kernel_shape, *, group: int = 1, keep_pads=True, axes=None) -> dict:
    """The original conv's stride/pads/dilation/auto_pad for the node that carries its spatial kernel.

    `axes` restricts the geometry to some spatial axes (the others get stride 1, no pad) for the
    separable forms of other passes; None keeps all of them.
    """
    n = len(kernel_shape)
    axes = range(n) if axes is None else axes
    strides = [layer.attr("strides")[a] if a in axes else 1 for a in range(n)]
    dilations = [layer.attr("dilations")[a] if a in axes else 1 for a in range(n)]
    pads = layer.attr("pads")
    begin = [pads[a] if a in axes else 0 for a in range(n)]
    end = [pads[n + a] if a in axes else 0 for a in range(n)]
    attrs = {"kernel_shape": [int(k) for k in kernel_shape], "strides": strides, "dilations": dilations}
    if group != 1:
        attrs["group"] = group
    auto_pad = layer.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "", b"NOTSET"):
        attrs["auto_pad"] = auto_pad
    elif keep_pads:
        attrs["pads"] = begin + end
    return attrs


class Tucker2Transposed(Tucker2):
    """Tucker-2 of a ConvTranspose kernel W (I, O, *k) ≈ core ×_I U_in ×_O U_out, core (r_i, r_o, *k):

        ConvTranspose(I→O, k)  ⇒  Conv 1x1(I→r_i) → ConvTranspose k(r_i→r_o, all geometry)
                                  → Conv 1x1(r_o→O, +bias)

    Ranks are (r_i, r_o), in the order of the kernel's modes, so full_rank, rank_from_ratio and
    rank_from_energy carry over from Tucker2 unchanged. Channel mixing commutes with the
    transposed convolution's scatter exactly as with a convolution's gather, so the split is exact
    at full rank. Weight-only: the input moment is on mode 0 here, not the mode Tucker2 whitens."""

    name = "tucker2-transpose"
    op_types = ("ConvTranspose",)

    def check(self, layer) -> str | None:
        return Method.check(self, layer)

    def cost(self, layer, rank: tuple[int, int]) -> Cost:
        i, o = layer.weight_shape[:2]
        k = prod(layer.weight_shape[2:])
        r_in, r_out = rank
        first, core, last = i * r_in, r_in * r_out * k, r_out * o
        # The core scatters from every input position; the output 1x1 runs at the output resolution.
        flops = 2 * (layer.in_positions * (first + core) + layer.out_positions * last)
        return Cost(first + core + last, flops)

    def decompose(self, layer, rank: tuple[int, int], stats=None) -> Factors:
        return self._fit(layer, rank, stats, HOOI_SWEEPS)

    def _fit(self, layer, rank: tuple[int, int], stats, n_iter: int) -> Factors:
        weight = layer.weight
        u_in, core, u_out, err = _linalg.partial_tucker(weight, rank, n_iter=n_iter)
        arrays = {
            "U_in": u_in.astype(weight.dtype),
            "core": core.astype(weight.dtype),
            "U_out": u_out.astype(weight.dtype),
        }
        return Factors(arrays, (u_in.shape[1], u_out.shape[1]), err)

    def build(self, emit, layer, factors: Factors) -> None:
        u_in, core, u_out = factors.arrays["U_in"], factors.arrays["core"], factors.arrays["U_out"]
        point = (1,) * (core.ndim - 2)
        w_in = u_in.T.reshape(u_in.shape[1], u_in.shape[0], *point)
        hidden = emit.op(
            "Conv", "in_1x1", [emit.data_input, emit.const("in_1x1/W", w_in)], {"kernel_shape": list(point)}
        )
        attrs = spatial_conv_attrs(layer, core.shape[2:])
        for key in ("output_padding", "output_shape"):
            if layer.attr(key) is not None:
                attrs[key] = list(layer.attr(key))
        hidden = emit.op(
            "ConvTranspose", "core", [hidden, emit.const("core/W", np.ascontiguousarray(core))], attrs
        )
        w_out = u_out.reshape(u_out.shape[0], u_out.shape[1], *point)
        bias = self.bias_input(emit, factors)
        inputs = [hidden, emit.const("out_1x1/W", w_out)] + ([bias] if bias is not None else [])
        emit.op("Conv", "out_1x1", inputs, {"kernel_shape": list(point)}, final=True)

    def forward(self, layer, arrays, x, bias=None):
        from . import _torch

        u_in, core, u_out = arrays["U_in"], arrays["core"], arrays["U_out"]
        point = (1,) * (core.dim() - 2)
        h = _torch.conv(x, u_in.T.reshape(u_in.shape[1], u_in.shape[0], *point), None, {})
        attrs = spatial_conv_attrs(layer, core.shape[2:])
        for key in ("output_padding", "output_shape"):
            if layer.attr(key) is not None:
                attrs[key] = list(layer.attr(key))
        h = _torch.conv_transpose(h, core, None, attrs)
        w_out = u_out.reshape(u_out.shape[0], u_out.shape[1], *point)
        return _torch.conv(h, w_out, self.effective_bias(arrays, bias), {})

    def refit_spec(self, layer) -> RefitSpec:
        return RefitSpec("core", "U_out", 1, True, intercept=True)


METHOD = Tucker2()
TRANSPOSED = Tucker2Transposed()
