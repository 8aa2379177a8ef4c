"""Tucker-2 of a grouped convolution, one Tucker-2 per group at a common rank, emitted as grouped convs.

    W (O, I/g, *k), group j: W_j (O/g, I/g, *k) ≈ core_j ×_O U_out,j ×_I U_in,j,  core_j (r_o, r_i, *k)

    Conv(I→O, k, group g)  ⇒  Conv 1x1(I→g·r_i, group g) → Conv k(g·r_i→g·r_o, group g, stride/pads/dilation)
                              → Conv 1x1(g·r_o→O, group g, +bias)

Each group of a grouped conv is an independent dense conv, so the groups factorize independently;
a common rank keeps every emitted conv a plain grouped conv. Depthwise convs (one input channel per
group) have nothing to factorize across channels and stay out (analyze skips them).

The rank is (r_o, r_i), common to all groups; the group count is the layer's (`decompose` gets the
layer).
"""

from __future__ import annotations

from math import prod
from typing import NamedTuple

import numpy as np

from . import _linalg
from ._method import Cost, Factors, Method, scaled_rank
from .tucker2 import HOOI_SWEEPS, spatial_conv_attrs


class GroupedRank(NamedTuple):
    r_out: int
    r_in: int


class GroupedTucker2(Method):
    name = "tucker2-grouped"
    op_types = ("Conv",)

    def check(self, layer) -> str | None:
        reason = super().check(layer)
        if reason is None and layer.group == 1:
            return "tucker2-grouped is for grouped Conv (group > 1); tucker2 takes group=1"
        if reason is None and layer.weight_shape[1] == 1:
            return "depthwise Conv (one input channel per group): nothing to factorize across channels"
        return reason

    @staticmethod
    def _group_dims(layer) -> tuple[int, int, int, int]:
        g = layer.group
        return g, layer.weight_shape[0] // g, layer.weight_shape[1], prod(layer.weight_shape[2:])

    def full_rank(self, layer) -> GroupedRank:
        _, o, i, k = self._group_dims(layer)
        return GroupedRank(min(o, i * k), min(i, o * k))

    def rank_from_ratio(self, layer, ratio: float) -> GroupedRank:
        r_out, r_in = self.full_rank(layer)
        return GroupedRank(scaled_rank(r_out, ratio), scaled_rank(r_in, ratio))

    def rank_from_energy(self, layer, energy: float) -> GroupedRank:
        # One rank for all groups: the largest any group needs to keep `energy`.
        g = layer.group
        r_out = r_in = 1
        for block in np.split(layer.weight, g, axis=0):
            out_spectrum, in_spectrum = _linalg.tucker2_mode_spectra(block)
            r_out = max(r_out, _linalg.rank_for_energy(out_spectrum, energy))
            r_in = max(r_in, _linalg.rank_for_energy(in_spectrum, energy))
        return GroupedRank(r_out, r_in)

    def cost(self, layer, rank) -> Cost:
        g, (r_out, r_in) = layer.group, rank
        o, i_total = layer.weight_shape[0], layer.weight_shape[1] * g
        k = prod(layer.weight_shape[2:])
        first, core, last = i_total * r_in, g * r_out * r_in * k, o * r_out
        flops = 2 * (layer.in_positions * first + layer.out_positions * (core + last))
        return Cost(first + core + last, flops)

    def decompose(self, layer, rank, stats=None) -> Factors:
        return self._fit(layer, rank, stats, HOOI_SWEEPS)

    def estimate(self, layer, rank, stats=None) -> Factors:
        # Each group's truncated HOSVD (see Tucker2.estimate).
        factors = self._fit(layer, rank, stats, 0)
        factors.notes["estimate"] = True
        return factors

    def _fit(self, layer, rank, stats, n_iter: int) -> Factors:
        if len(rank) != 2:
            raise ValueError(f"tucker2-grouped rank is (r_out, r_in), got {rank!r}")
        weight, g = layer.weight, layer.group
        r_out, r_in = (int(r) for r in rank)
        o, i = weight.shape[:2]
        if o % g:
            raise ValueError(f"{o} output channels do not split into {g} groups")
        k = prod(weight.shape[2:])
        r_out, r_in = min(r_out, o // g, i * k), min(r_in, i, (o // g) * k)
        u_outs, cores, u_ins, approx = [], [], [], []
        for j, block in enumerate(np.split(np.asarray(weight, dtype=np.float64), g, axis=0)):
            if stats is not None:
                moment = stats.input_moment[j * i : (j + 1) * i, j * i : (j + 1) * i]
                u_out, core, u_in, _ = _linalg.whitened_partial_tucker(
                    block, (r_out, r_in), moment, n_iter=n_iter
                )
            else:
                u_out, core, u_in, _ = _linalg.partial_tucker(block, (r_out, r_in), n_iter=n_iter)
            u_outs.append(u_out)
            cores.append(core)
            u_ins.append(u_in)
            approx.append(_linalg.mode_product(_linalg.mode_product(core, u_out, 0), u_in, 1))
        err = _linalg.relative_error(weight, np.concatenate(approx, axis=0))
        arrays = {"U_out": np.stack(u_outs), "core": np.stack(cores), "U_in": np.stack(u_ins)}
        notes = {"data_aware": True} if stats is not None else {}
        return Factors(
            {key: v.astype(weight.dtype) for key, v in arrays.items()},
            GroupedRank(r_out, r_in),
            err,
            notes,
        )

    def build(self, emit, layer, factors: Factors) -> None:
        u_out, core, u_in = factors.arrays["U_out"], factors.arrays["core"], factors.arrays["U_in"]
        g, o_g, r_out = u_out.shape
        _, i_g, r_in = u_in.shape
        kernel = core.shape[3:]
        point = (1,) * len(kernel)
        # Stacking the groups' factors along the output axis is exactly ONNX's grouped-weight layout.
        w_in = u_in.transpose(0, 2, 1).reshape(g * r_in, i_g, *point)
        w_core = core.reshape(g * r_out, r_in, *kernel)
        w_out = u_out.reshape(g * o_g, r_out, *point)
        hidden = emit.op(
            "Conv",
            "in_1x1",
            [emit.data_input, emit.const("in_1x1/W", w_in)],
            {"kernel_shape": list(point), "group": g},
        )
        hidden = emit.op(
            "Conv", "core", [hidden, emit.const("core/W", w_core)], spatial_conv_attrs(layer, kernel, group=g)
        )
        bias = self.bias_input(emit, factors)
        emit.op(
            "Conv",
            "out_1x1",
            [hidden, emit.const("out_1x1/W", w_out)] + ([bias] if bias is not None else []),
            {"kernel_shape": list(point), "group": g},
            final=True,
        )

    def forward(self, layer, arrays, x, bias=None):
        from . import _torch

        u_out, core, u_in = arrays["U_out"], arrays["core"], arrays["U_in"]
        g, o_g, r_out = u_out.shape
        _, i_g, r_in = u_in.shape
        kernel = tuple(core.shape[3:])
        point = (1,) * len(kernel)
        w_in = u_in.permute(0, 2, 1).reshape(g * r_in, i_g, *point)
        h = _torch.conv(x, w_in, None, {"group": g})
        h = _torch.conv(
            h, core.reshape(g * r_out, r_in, *kernel), None, spatial_conv_attrs(layer, kernel, group=g)
        )
        w_out = u_out.reshape(g * o_g, r_out, *point)
        return _torch.conv(h, w_out, self.effective_bias(arrays, bias), {"group": g})


METHOD = GroupedTucker2()
