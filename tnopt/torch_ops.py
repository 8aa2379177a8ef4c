"""The ONNX ops `tnopt.torch_graph` runs, each as a differentiable torch function.

Every op follows its ONNX definition for the opsets torch and tf2onnx export (axes given as
attributes or, from opset 13/18 on, as inputs). Integer tensors (shapes, token ids) flow as int64.
An op function takes its inputs positionally and the node's attributes as `attrs`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from tnopt.passes import _torch


class NotConvertible(Exception):
    """The graph has ops this interpreter does not run."""


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _tensor(value) -> torch.Tensor:
    array = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
    if array.dtype == np.float64:
        return torch.from_numpy(array.copy())
    return torch.from_numpy(np.array(array, copy=True))


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _text(value) -> str:
    """A string attribute as text (onnx hands them over as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _axes(node_attrs, inputs, index, default=None):
    """Axes from the attribute (old opsets) or the optional input at `index` (new opsets)."""
    if "axes" in node_attrs:
        return list(node_attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return default


def _reduce(fn):
    def run(x, *rest, attrs):
        axes = _axes(attrs, (x, *rest), 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=axes, keepdim=keep)

    return run


def _reshape(x, shape, attrs):
    dims = _ints(shape)
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(x, starts, ends, axes=None, steps=None, attrs=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 0:
            size = x.shape[axis]
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = max(min(end + size if end < 0 else end, size), -1)
            flipped = x.flip(axis)
            x = flipped.narrow(axis, size - 1 - start, max(0, start - end))
            x = x[tuple(slice(None) if a != axis else slice(None, None, -step) for a in range(x.dim()))]
            continue
        index[axis] = slice(start, min(end, 2**62), step)
    return x[tuple(index)]


def _gather(data, indices, attrs):
    axis = attrs.get("axis", 0)
    idx = indices.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    if idx.dim() == 0:
        return data.select(axis, int(idx))
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :])


def _pool_pads(x, attrs, n, value):
    pads = list(attrs.get("pads", [0] * (2 * n)))
    auto_pad = _text(attrs.get("auto_pad", b"NOTSET"))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _torch._same_pads(
            x.shape[2:],
            attrs["kernel_shape"],
            attrs.get("strides", [1] * n),
            attrs.get("dilations", [1] * n),
            auto_pad == "SAME_UPPER",
        )
    if any(pads):
        x = F.pad(x, [p for a in reversed(range(n)) for p in (pads[a], pads[n + a])], value=value)
    return x


def _max_pool(x, attrs):
    n = x.dim() - 2
    x = _pool_pads(x, attrs, n, float("-inf"))
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    return fn(
        x,
        attrs["kernel_shape"],
        stride=attrs.get("strides", [1] * n),
        dilation=attrs.get("dilations", [1] * n),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
    )


def _avg_pool(x, attrs):
    n = x.dim() - 2
    pads = list(attrs.get("pads", [0] * (2 * n)))
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    if attrs.get("count_include_pad", 0) or not any(pads):
        x = _pool_pads(x, attrs, n, 0.0)
        return fn(
            x,
            attrs["kernel_shape"],
            stride=attrs.get("strides", [1] * n),
            ceil_mode=bool(attrs.get("ceil_mode", 0)),
        )
    ones = torch.ones_like(x[:1, :1])
    total = fn(_pool_pads(x, attrs, n, 0.0), attrs["kernel_shape"], stride=attrs.get("strides", [1] * n))
    count = fn(_pool_pads(ones, attrs, n, 0.0), attrs["kernel_shape"], stride=attrs.get("strides", [1] * n))
    return total / count


def _clip(x, low=None, high=None, attrs=None):
    low = attrs.get("min") if low is None and "min" in attrs else low
    high = attrs.get("max") if high is None and "max" in attrs else high
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return x


def _gemm(a, b, c=None, attrs=None):
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _layer_norm(x, scale, bias=None, attrs=None):
    axis = attrs.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    return F.layer_norm(x, x.shape[axis:], scale, bias, attrs.get("epsilon", 1e-5))


def _batch_norm(x, scale, bias, mean, var, attrs):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _split(x, split=None, attrs=None):
    axis = attrs.get("axis", 0)
    sizes = list(attrs["split"]) if "split" in attrs else (_ints(split) if split is not None else None)
    if sizes is None:
        parts = attrs.get("num_outputs") or attrs["_outputs"]
        sizes = [math.ceil(x.shape[axis] / parts)] * parts
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, sizes, dim=axis))


def _pad(x, pads=None, value=None, axes=None, attrs=None):
    pads = list(attrs["pads"]) if "pads" in attrs else _ints(pads)
    mode = _text(attrs.get("mode", b"constant"))
    n = x.dim()
    axes = _ints(axes) if axes is not None else list(range(n))
    begin, end = pads[: len(axes)], pads[len(axes) :]
    full = [0] * (2 * n)
    for a, b_, e in zip(axes, begin, end):
        full[2 * (n - 1 - (a % n))], full[2 * (n - 1 - (a % n)) + 1] = b_, e
    fill = float(value) if value is not None else float(attrs.get("value", 0.0))
    # torch lists pads from the last axis; strip leading all-zero axes so non-constant modes accept it.
    while len(full) > 2 and full[-1] == 0 and full[-2] == 0:
        full = full[:-2]
    if mode == "constant":
        return F.pad(x, full, value=fill)
    return F.pad(x, full, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _softmax(x, attrs, opset):
    axis = attrs.get("axis", -1 if opset >= 13 else 1)
    if opset >= 13:
        return torch.softmax(x, dim=axis)
    shape = x.shape
    return torch.softmax(x.flatten(axis), dim=-1).reshape(shape) if axis >= 0 else torch.softmax(x, dim=axis)


def _flatten(x, attrs):
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _cast(x, attrs):
    return x.to(_DTYPES[attrs["to"]])


def _constant(attrs):
    if "value" in attrs:
        return _tensor(attrs["value"])
    for key in ("value_float", "value_int"):
        if key in attrs:
            return torch.tensor(attrs[key])
    for key in ("value_floats", "value_ints"):
        if key in attrs:
            return torch.tensor(list(attrs[key]))
    raise NotConvertible(f"Constant with {sorted(attrs)}")


def _constant_of_shape(shape, attrs):
    value = _tensor(attrs["value"]) if "value" in attrs else torch.zeros(1)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _expand(x, shape, attrs):
    dims = _ints(shape)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(dims))
    return x.expand(target)


def _unsqueeze(x, axes=None, attrs=None):
    axes = sorted(
        a + x.dim() + len(_axes(attrs, (x, axes), 1)) if a < 0 else a for a in _axes(attrs, (x, axes), 1)
    )
    for a in axes:
        x = x.unsqueeze(a)
    return x


def _squeeze(x, axes=None, attrs=None):
    axes = _axes(attrs, (x, axes), 1)
    if axes is None:
        return x.squeeze()
    for a in sorted((a + x.dim() if a < 0 else a for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _conv(x, w, b=None, attrs=None):
    return _torch.conv(x, w, b, attrs)


def _conv_transpose(x, w, b=None, attrs=None):
    return _torch.conv_transpose(x, w, b, attrs)


def _prelu(x, slope, attrs):
    # ONNX broadcasts the slope to x (one per channel as (C, 1, 1) in exports, or a single value).
    return torch.where(x < 0, x * slope, x)


# Resize attributes whose non-default values this interpreter does not reproduce.
_RESIZE_REFUSED = {"exclude_outside": 0, "antialias": 0, "keep_aspect_ratio_policy": "stretch", "axes": None}


def resize_refusal(attrs: dict) -> str | None:
    """Why a Resize node with these attributes has no torch form here (None: it has one)."""
    mode = _text(attrs.get("mode", "nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    if mode not in ("nearest", "linear"):
        return f"Resize mode {mode!r} (nearest and linear only)"
    if transform not in _SOURCE_COORDINATE:
        return f"Resize coordinate_transformation_mode {transform!r}"
    rounding = _text(attrs.get("nearest_mode", "round_prefer_floor"))
    if mode == "nearest" and rounding not in _NEAREST:
        return f"Resize nearest_mode {rounding!r}"
    for key, default in _RESIZE_REFUSED.items():
        value = attrs.get(key, default)
        if (_text(value) if isinstance(value, bytes) else value) != default:
            return f"Resize with {key}={value!r}"
    return None


# ONNX's coordinate transforms: the source coordinate of output index i on an axis of `size` samples
# resized to `out` with scale `scale`.
_SOURCE_COORDINATE = {
    "half_pixel": lambda i, scale, size, out: (i + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda i, scale, size, out: (i + 0.5) / scale - 0.5 if out > 1 else 0.0 * i,
    "asymmetric": lambda i, scale, size, out: i / scale,
    "align_corners": lambda i, scale, size, out: i * (size - 1) / (out - 1) if out > 1 else 0.0 * i,
    "tf_half_pixel_for_nn": lambda i, scale, size, out: (i + 0.5) / scale,
}
_NEAREST = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _resize(x, roi=None, scales=None, sizes=None, attrs=None):
    """ONNX Resize (and opset 10's: x, scales, asymmetric), nearest or (multi)linear, one spatial axis at
    a time by index arithmetic (exact for every coordinate transform and nearest rounding, unlike
    torch's interpolate); differentiable in x."""
    opset10 = roi is not None and scales is None and sizes is None
    if opset10:
        roi, scales = None, roi
    refused = resize_refusal(attrs)
    if refused:
        raise NotConvertible(refused)
    mode = _text(attrs.get("mode", "nearest"))
    transform = "asymmetric" if opset10 else _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    rounding = "floor" if opset10 else _text(attrs.get("nearest_mode", "round_prefer_floor"))
    if sizes is not None and sizes.numel():
        outs = _ints(sizes)
        factors = [o / s for o, s in zip(outs, x.shape)]
    else:
        factors = [float(v) for v in scales.tolist()]
        outs = [int(math.floor(s * f + 1e-9)) for s, f in zip(x.shape, factors)]
    if len(outs) != x.dim():
        raise NotConvertible(f"Resize to {len(outs)} dims of a {x.dim()}-d tensor")
    for axis, (size, out, scale) in enumerate(zip(x.shape, outs, factors)):
        if out == size and scale == 1.0:
            continue
        index = torch.arange(out, dtype=torch.float64)
        source = _SOURCE_COORDINATE[transform](index, scale, size, out)
        view = [1] * x.dim()
        view[axis] = out
        if mode == "nearest":
            picked = _NEAREST[rounding](source).clamp(0, size - 1).long()
            x = x.index_select(axis, picked)
            continue
        source = source.clamp(0, size - 1)
        low = torch.floor(source).long()
        high = (low + 1).clamp(max=size - 1)
        weight = (source - low).to(x.dtype).reshape(view)
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return x


def _binary(fn):
    return lambda a, b, attrs: fn(a, b)


def _div(a, b, attrs):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


OPS: dict[str, Callable] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "MatMul": _binary(torch.matmul),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "Min": lambda *xs, attrs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    "Max": lambda *xs, attrs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    "Sum": lambda *xs, attrs: sum(xs),
    "Where": lambda c, a, b, attrs: torch.where(c.bool(), a, b),
    "Not": lambda x, attrs: torch.logical_not(x),
    "Neg": lambda x, attrs: -x,
    "Abs": lambda x, attrs: x.abs(),
    "Sqrt": lambda x, attrs: x.sqrt(),
    "Reciprocal": lambda x, attrs: x.reciprocal(),
    "Exp": lambda x, attrs: x.exp(),
    "Log": lambda x, attrs: x.log(),
    "Erf": lambda x, attrs: torch.erf(x),
    "Tanh": lambda x, attrs: torch.tanh(x),
    "Sigmoid": lambda x, attrs: torch.sigmoid(x),
    "Relu": lambda x, attrs: F.relu(x),
    "PRelu": _prelu,
    "Resize": lambda x, *r, attrs: _resize(x, *r, attrs=attrs),
    "LeakyRelu": lambda x, attrs: F.leaky_relu(x, attrs.get("alpha", 0.01)),
    "Elu": lambda x, attrs: F.elu(x, attrs.get("alpha", 1.0)),
    "HardSigmoid": lambda x, attrs: torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1),
    "HardSwish": lambda x, attrs: F.hardswish(x),
    "Gelu": lambda x, attrs: F.gelu(
        x, approximate="tanh" if attrs.get("approximate", b"none") == b"tanh" else "none"
    ),
    "Clip": lambda x, *lh, attrs: _clip(x, *lh, attrs=attrs),
    "Softmax": None,  # needs the opset; bound in TorchGraph
    "LayerNormalization": lambda x, *r, attrs: _layer_norm(x, *r, attrs=attrs),
    "BatchNormalization": _batch_norm,
    "Gemm": lambda *xs, attrs: _gemm(*xs, attrs=attrs),
    "Conv": lambda *xs, attrs: _conv(*xs, attrs=attrs),
    "ConvTranspose": lambda *xs, attrs: _conv_transpose(*xs, attrs=attrs),
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda x, attrs: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda x, attrs: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda x, attrs: x.permute(
        list(attrs["perm"]) if "perm" in attrs else list(reversed(range(x.dim())))
    ),
    "Unsqueeze": lambda x, *a, attrs: _unsqueeze(x, *a, attrs=attrs),
    "Squeeze": lambda x, *a, attrs: _squeeze(x, *a, attrs=attrs),
    "Concat": lambda *xs, attrs: torch.cat(xs, dim=attrs["axis"]),
    "Gather": _gather,
    "Shape": lambda x, attrs: torch.tensor(
        list(x.shape)[attrs.get("start", 0) : attrs.get("end", None)], dtype=torch.int64
    ),
    "Size": lambda x, attrs: torch.tensor(x.numel(), dtype=torch.int64),
    "Slice": lambda x, *r, attrs: _slice(x, *r, attrs=attrs),
    "Cast": _cast,
    "Identity": lambda x, attrs: x,
    "Dropout": lambda x, *r, attrs: x,
    "ReduceSum": _reduce(torch.sum),
    "ReduceMean": _reduce(torch.mean),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "Split": lambda x, *r, attrs: _split(x, *r, attrs=attrs),
    "Pad": lambda x, *r, attrs: _pad(x, *r, attrs=attrs),
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Range": lambda s, e, d, attrs: torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype),
    "Tile": lambda x, r, attrs: x.repeat(_ints(r)),
    "Constant": None,  # no inputs; built once
}
