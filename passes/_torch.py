"""Differentiable torch forms of the ops the passes emit (pure torch; never imports onnx).

Each method's `forward(layer, arrays, x, bias)` chains these exactly as its `build` chains ONNX nodes,
so healing trains the same function onnxruntime later runs. Conventions follow ONNX: Conv pads are
[begin..., end...], auto_pad SAME_UPPER/SAME_LOWER/VALID, Gemm's weight is the effective (K, N) of
y = x·W (alpha and transB already folded by analyze), its bias already times beta.

Imported lazily by the passes (torch costs a second to import; compressing without healing never needs it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def as_tensor(array, dtype=torch.float32) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.as_tensor(array, dtype=dtype)


def _same_pads(in_sizes, kernel, strides, dilations, upper: bool) -> list[int]:
    begin, end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if upper else large)
        end.append(large if upper else small)
    return begin + end


def conv(x: torch.Tensor, weight, bias, attrs: dict) -> torch.Tensor:
    """ONNX Conv on x (N, C, *spatial) with `attrs` as spatial_conv_attrs / analyze produce them."""
    weight = as_tensor(weight)
    n = weight.dim() - 2
    kernel = list(weight.shape[2:])
    strides = list(attrs.get("strides") or [1] * n)
    dilations = list(attrs.get("dilations") or [1] * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x.shape[2:], kernel, strides, dilations, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(attrs.get("pads") or [0] * (2 * n))
    if any(pads):
        # F.pad lists the last axis first; ONNX lists all begins, then all ends.
        x = F.pad(x, [p for axis in reversed(range(n)) for p in (pads[axis], pads[n + axis])])
    return _CONV[n](
        x,
        weight,
        None if bias is None else as_tensor(bias),
        stride=strides,
        dilation=dilations,
        groups=int(attrs.get("group", 1)),
    )


def no_torch_form(op: str, attrs: dict) -> str | None:
    """Why a node of this op and attributes has no torch form here (None: it has one)."""
    if op != "ConvTranspose":
        return None
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "") or attrs.get("output_shape"):
        return "ConvTranspose with auto_pad or output_shape has no torch form here"
    return None


def conv_transpose(x: torch.Tensor, weight, bias, attrs: dict) -> torch.Tensor:
    """ONNX ConvTranspose with explicit pads and output_padding (auto_pad / output_shape: refused)."""
    weight = as_tensor(weight)
    n = weight.dim() - 2
    refused = no_torch_form("ConvTranspose", attrs)
    if refused:
        raise NotImplementedError(refused)
    strides = list(attrs.get("strides") or [1] * n)
    dilations = list(attrs.get("dilations") or [1] * n)
    pads = list(attrs.get("pads") or [0] * (2 * n))
    out_pad = list(attrs.get("output_padding") or [0] * n)
    # Full output first (no pads), then crop: ONNX pads may be asymmetric, torch's are not.
    y = _CONV_T[n](
        x,
        weight,
        None,
        stride=strides,
        dilation=dilations,
        groups=int(attrs.get("group", 1)),
    )
    if any(out_pad):
        y = F.pad(y, [p for axis in reversed(range(n)) for p in (0, out_pad[axis])])
    slices = [slice(None), slice(None)]
    for axis in range(n):
        size = y.shape[2 + axis]
        slices.append(slice(pads[axis], size - pads[n + axis]))
    y = y[tuple(slices)]
    if bias is not None:
        y = y + as_tensor(bias).reshape(1, -1, *([1] * n))
    return y


def add_bias(y: torch.Tensor, bias) -> torch.Tensor:
    return y if bias is None else y + as_tensor(bias)


def conv_attrs(layer) -> dict:
    """The layer's own Conv / ConvTranspose attributes as a plain dict."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in layer.attrs}


def dense_forward(layer, weight, bias, x: torch.Tensor) -> torch.Tensor:
    """The original layer's op with `weight` in its natural layout (Conv (O, I/g, *k), ConvTranspose
    (I, O/g, *k), Gemm the effective (K, N), MatMul the stored matrix) and the effective bias."""
    weight = as_tensor(weight)
    if layer.op == "Conv":
        return conv(x, weight, bias, conv_attrs(layer))
    if layer.op == "ConvTranspose":
        return conv_transpose(x, weight, bias, conv_attrs(layer))
    if layer.op == "Gemm":
        if layer.attr("transA"):
            x = x.transpose(0, 1)
        return add_bias(x @ weight, bias)
    if layer.attr("weight_side") == "left":
        return weight @ x
    return x @ weight


def tt_to_matrix(cores) -> torch.Tensor:
    """TT-matrix cores G_k (r_{k-1}, i_k, o_k, r_k) contracted to W (∏ i_k, ∏ o_k), as
    `_tensor_train.tt_to_matrix` does in numpy."""
    d = len(cores)
    in_modes = [c.shape[1] for c in cores]
    out_modes = [c.shape[2] for c in cores]
    acc = cores[0].reshape(-1, cores[0].shape[3])
    for core in cores[1:]:
        acc = (acc @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[3])
    acc = acc.reshape([m for pair in zip(in_modes, out_modes) for m in pair])
    order = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return acc.permute(order).reshape(math.prod(in_modes), math.prod(out_modes))
