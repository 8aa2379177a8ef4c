"""Convolution geometry shared by the separable passes (cp, cut): where each emitted conv runs.

A separable chain applies the original stride on one spatial axis at a time, so its middle tensors
sit at mixed resolutions, e.g. (H_out, W_in) after a kh×1 conv that carries only the H-axis stride.
"""

from __future__ import annotations

import math


def _static(dim) -> int:
    return dim if isinstance(dim, int) and dim > 0 else 1


def mixed_positions(layer, out_axes) -> int:
    """batch · Π spatial extents, taking the output extent on `out_axes` and the input extent on the
    other spatial axes (symbolic dims count as 1, like analyze's FLOPs)."""
    n = len(layer.weight_shape) - 2
    # Shapes at the calibration data's size where the data bound them (tnopt.analyze.at_data_shapes).
    input_shape = getattr(layer, "data_input_shape", None) or layer.input_shape
    output_shape = getattr(layer, "data_output_shape", None) or layer.output_shape
    if not (input_shape and output_shape and len(input_shape) == len(output_shape) == n + 2):
        # Shapes unknown: the geometric mean of input and output positions is the least-biased guess.
        return round(math.sqrt(layer.in_positions * layer.out_positions))
    total = _static(input_shape[0])
    for axis in range(n):
        source = output_shape if axis in out_axes else input_shape
        total *= _static(source[2 + axis])
    return total


def plain_conv_reason(layer, name: str, *, two_d: bool = False) -> str | None:
    """Why a channel-mixing factorization cannot take this Conv (None when it can)."""
    if layer.group != 1:
        return f"grouped Conv (group={layer.group}): {name} needs group=1"
    if two_d and len(layer.weight_shape) != 4:
        return f"{name} needs a 2-D Conv (this one has {len(layer.weight_shape) - 2} spatial dims)"
    return None
