"""Find the layers tnopt can factorize and describe each as a frozen `Layer` record.

Candidates: every Conv (N-d; grouped ones too, depthwise ones get a skip reason), every
Gemm, every MatMul with one constant operand, and every Einsum with one (a product x·W over x's
last axis, "bij,jk->bik", is a MatMul layer; any other is listed with a reason). A MatMul of two
activations (attention QKᵀ, attention·V) is never a candidate and is not even listed. Layers inside
If/Loop/Scan bodies and local functions are listed with a skip reason (kept as they are). FLOPs
are 2·MACs at the inferred shapes, with symbolic dims (batch, sequence) counted as 1.
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from types import SimpleNamespace

import numpy as np
import onnx

from tnopt import graph as G
from tnopt.layer import Layer

__all__ = ["Layer", "analyze", "analyze_graph", "at_data_shapes"]


def analyze(model: onnx.ModelProto) -> list[Layer]:
    graph = G.import_graph(model)
    return analyze_graph(graph, overridable=G.overridable_initializers(model))


def analyze_graph(graph, overridable: frozenset[str] = frozenset()) -> list[Layer]:
    """`overridable`: initializers that are also graph inputs (IR ≥ 4) — defaults a caller may
    replace at run time, so never constants to factorize."""
    layers = []
    for node in graph.nodes:
        layer = _layer_of(node)
        if layer is None:
            continue
        if layer.candidate and overridable:
            inputs = {t.name for t in node.inputs}
            overridden = sorted(inputs & overridable)
            if overridden:
                layer = replace(
                    layer,
                    skip_reason=f"weight {overridden[0]!r} is also a graph input (a default the caller "
                    "may override at run time); left dense",
                    weight=None,
                    bias=None,
                )
        layers.append(layer)
    layers.extend(_body_layers(graph))
    layers.extend(_function_layers(graph))
    return layers


def _layer_of(node) -> Layer | None:
    """The layer record of a Conv, ConvTranspose, Gemm or constant-weight MatMul; None otherwise."""
    if node.op in ("Conv", "ConvTranspose"):
        return _conv_layer(node)
    if node.op == "Gemm":
        return _gemm_layer(node)
    if node.op == "MatMul":
        return _matmul_layer(node)
    if node.op == "Einsum":
        return _einsum_layer(node)
    return None


BODY_REASON = "inside the {op} node {parent!r} ({attribute}): If/Loop/Scan bodies are kept as they are"


def _body_layers(graph, depth: int = 0) -> list[Layer]:
    """The layers of If/Loop/Scan bodies (and bodies within them), listed with a skip reason so the
    report accounts for them; named `{parent}/{attribute}/{node}`, since body node names need not be
    unique across the model."""
    found: list[Layer] = []
    if depth > 8:
        return found
    for parent in graph.nodes:
        for attribute, body in sorted(parent.attrs.items()):
            if not isinstance(body, G.Subgraph):
                continue
            for index, node in enumerate(body.nodes):
                layer = _layer_of(node)
                if layer is None:
                    continue
                name = f"{parent.name}/{attribute}/{node.name or f'{node.op}_{index}'}"
                reason = BODY_REASON.format(op=parent.op, parent=parent.name, attribute=attribute)
                found.append(replace(layer, name=name, skip_reason=reason, weight=None, bias=None))
            found.extend(
                replace(layer, name=f"{parent.name}/{attribute}/{layer.name}")
                for layer in _body_layers(body, depth + 1)
            )
    return found


FUNCTION_REASON = (
    "inside the local function {function!r} (called by {call!r}): local functions are kept as they are"
)


def _function_layers(graph) -> list[Layer]:
    """The layers inside the model's local functions (ModelProto.functions), once per call in the
    main graph, listed with a skip reason so the report accounts for them; named
    `{call}/{function}/{node}`. A weight the call passes in is read from the caller's tensor, so the
    record has its shape and size. (Calls from bodies or from other functions are not followed.)"""
    functions = {(f.domain, f.name): f for f in getattr(graph, "functions", [])}
    found: list[Layer] = []
    for call in graph.nodes:
        function = functions.get((call.domain, call.op))
        if function is None:
            continue
        passed = {formal.name: actual for formal, actual in zip(function.inputs, call.inputs)}
        for index, node in enumerate(function.nodes):
            layer = _layer_of(_as_called(node, passed, call.attrs))
            if layer is None:
                continue
            name = f"{call.name}/{function.name}/{node.name or f'{node.op}_{index}'}"
            reason = FUNCTION_REASON.format(function=f"{function.domain}.{function.name}", call=call.name)
            found.append(replace(layer, name=name, skip_reason=reason, weight=None, bias=None))
    return found


def _as_called(node, passed: dict, call_attrs: dict) -> SimpleNamespace:
    """A read-only view of a function's node as one call runs it: its formal inputs replaced by the
    caller's tensors, its attribute references by the caller's attributes (unset ones dropped:
    the op's defaults apply). A plain view, not a graph node, so the graph is left untouched."""
    inputs = [passed.get(t.name, t) if G.is_present(t) else t for t in node.inputs]
    attrs = {}
    for key, value in node.attrs.items():
        if isinstance(value, G.AttributeRef):
            if value.name not in call_attrs:
                continue
            value = call_attrs[value.name]
        attrs[key] = value
    return SimpleNamespace(op=node.op, name=node.name, attrs=attrs, inputs=inputs, outputs=node.outputs)


def _dims(shape) -> int:
    """Product of a shape with symbolic dims counted as 1."""
    if shape is None:
        return 1
    return prod(d if isinstance(d, int) else 1 for d in shape)


def _bias_vector(tensor, scale: float, channels: int) -> np.ndarray | None:
    """A constant bias as one value per output channel (a broadcast scalar repeated), times `scale`
    (Gemm's beta); None when it is computed at run time or does not have that shape."""
    constant = G.resolve_constant(tensor)
    if constant is None or constant.values.size not in (1, channels):
        return None
    values = np.broadcast_to(constant.values.reshape(-1), (channels,))
    return (values * np.asarray(scale, values.dtype)).astype(constant.values.dtype)


# Ops that only re-lay out a weight: a dequantised weight may reach its layer through them
# (a QDQ export's transposed MatMul weight: DequantizeLinear → Transpose → MatMul).
_LAYOUT_OPS = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast")


def _quantized(tensor) -> bool:
    """The tensor is a constant dequantised at run time (DequantizeLinear), directly or through
    layout ops: a quantized model's weight (not a QDQ model's activation, whose DequantizeLinear
    reads a QuantizeLinear)."""
    for _ in range(8):
        producers = getattr(tensor, "inputs", [])
        if len(producers) != 1:
            return False
        if producers[0].op in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return bool(producers[0].inputs) and G.resolve_constant(producers[0].inputs[0]) is not None
        if producers[0].op not in _LAYOUT_OPS or not producers[0].inputs:
            return False
        tensor = producers[0].inputs[0]
    return False


QUANTIZED_REASON = (
    "weight is dequantized at run time (DequantizeLinear): quantized layers are left as they are"
)


def _skip_for_weight(weight: G.ConstantWeight | None, tensor=None) -> str | None:
    if weight is None and tensor is not None and _quantized(tensor):
        return QUANTIZED_REASON
    if weight is None:
        return "weight is not a constant (computed at run time)"
    if weight.shared:
        return "weight is shared with another node; rewriting one user would not shrink the model"
    values = weight.values
    if "ConstantOfShape(" in weight.source:
        # Checked before the value scans below: the fill is a broadcast view, a scan would allocate it.
        fill = values.reshape(-1)[0] if values.size else 0
        return (
            f"weight is one value repeated (a ConstantOfShape fill, every value {fill:g}): nothing to "
            f"factorize, and its {weight.nbytes} stored bytes are fewer than any factors'; left dense"
        )
    if values.dtype.name == "bfloat16":
        return "bfloat16 weight: factors cannot be exported in bfloat16 yet; left dense"
    if values.dtype.kind != "f":
        return f"weight dtype {values.dtype} is not floating point"
    if values.size == 0:
        return f"weight has a zero-size dimension (shape {tuple(values.shape)}): nothing to factorize"
    # Checked before any SVD: LAPACK fails on NaN and may never return on ±Inf.
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        return f"weight holds {bad} NaN/Inf value{'s' if bad > 1 else ''}: left dense"
    if not np.any(values):
        return "weight is all zeros: nothing to factorize (the layer outputs only its bias)"
    return None


def _stored(weight: G.ConstantWeight | None) -> dict:
    if weight is None:
        return {}
    return {"weight_bytes": weight.nbytes or int(weight.values.nbytes), "stored_dtype": weight.stored_dtype}


def _quantized_matmul(node, weight_index: int) -> Layer:
    """A MatMul whose weight a DequantizeLinear produces: listed, never rewritten."""
    weight, x = node.inputs[weight_index], node.inputs[1 - weight_index]
    w_shape = tuple(G.shape_of(weight) or ())
    params = _count(w_shape)
    in_shape = G.shape_of(x)
    rows = _dims(in_shape[:-1]) if in_shape else 1
    return Layer(
        node.name,
        "MatMul",
        w_shape,
        params,
        2 * rows * params,
        in_shape,
        G.shape_of(node.outputs[0]),
        (("weight_side", "right" if weight_index == 1 else "left"),),
        1 - weight_index,
        skip_reason=QUANTIZED_REASON,
        input_name=x.name,
        output_name=node.outputs[0].name,
    )


def _count(shape) -> int:
    """Elements of a possibly symbolic shape (symbolic dims count as 1: a non-candidate's size)."""
    return int(prod(d if isinstance(d, int) and d >= 0 else 1 for d in shape)) if shape else 0


def _conv_layer(node) -> Layer:
    x, w_tensor, y = node.inputs[0], node.inputs[1], node.outputs[0]
    weight = G.resolve_constant(w_tensor)
    in_shape, out_shape = G.shape_of(x), G.shape_of(y)
    reason = _skip_for_weight(weight, w_tensor)
    w_shape = tuple(weight.values.shape) if weight is not None else tuple(G.shape_of(w_tensor) or ())
    group = int(node.attrs.get("group", 1))
    spatial_dims = max(len(w_shape) - 2, 0)
    attrs = {
        "group": group,
        "kernel_shape": tuple(node.attrs.get("kernel_shape", w_shape[2:])),
        "strides": tuple(node.attrs.get("strides", (1,) * spatial_dims)),
        "dilations": tuple(node.attrs.get("dilations", (1,) * spatial_dims)),
        "pads": tuple(node.attrs.get("pads", (0,) * (2 * spatial_dims))),
        "auto_pad": node.attrs.get("auto_pad", "NOTSET"),
    }
    transposed = node.op == "ConvTranspose"
    if transposed:
        for key in ("output_padding", "output_shape"):
            if key in node.attrs:
                attrs[key] = tuple(node.attrs[key])
    if reason is None and len(w_shape) < 3:
        reason = "malformed Conv weight"
    if reason is None and transposed and group > 1:
        reason = f"grouped ConvTranspose (group={group}): not factorized"
    if reason is None and group > 1 and w_shape[1] == 1:
        # Other grouped convs are candidates (per-group Tucker-2); methods needing group=1 refuse them.
        reason = "depthwise Conv (one input channel per group): nothing to factorize across channels"
    params = _count(w_shape)
    out_positions = _dims(out_shape[:1] + out_shape[2:]) if out_shape else 1
    in_positions = _dims(in_shape[:1] + in_shape[2:]) if in_shape else 1
    # Conv: each output position multiplies the whole (O, I/g, k) kernel; ConvTranspose: each input
    # position scatters the whole (I, O/g, k) kernel.
    flops = 2 * (in_positions if transposed else out_positions) * params
    has_bias = len(node.inputs) > 2 and G.is_present(node.inputs[2])
    return Layer(
        node.name,
        node.op,
        w_shape,
        params,
        flops,
        in_shape,
        out_shape,
        tuple(sorted(attrs.items())),
        0,
        has_bias,
        weight.source if weight else "",
        in_positions,
        out_positions,
        reason,
        x.name,
        y.name,
        True,
        weight.values if weight is not None and reason is None else None,
        (
            _bias_vector(node.inputs[2], 1.0, w_shape[1] * group if transposed else w_shape[0])
            if has_bias and reason is None
            else None
        ),
        **_stored(weight),
    )


def _gemm_layer(node) -> Layer:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    weight = G.resolve_constant(b)
    reason = _skip_for_weight(weight, b)
    if weight is None and G.resolve_constant(a) is not None:
        reason = "the constant is Gemm's first input (A): only a constant B is factorized"
    if reason is None and weight.values.ndim != 2:
        reason = "Gemm weight is not 2-D"
    effective = None
    if reason is None:
        # y = alpha·A'·B' + beta·C: fold transB and alpha into the (K, N) matrix that gets factorized.
        effective = (weight.values.T if trans_b else weight.values) * np.asarray(alpha, weight.values.dtype)
    w_shape = tuple(effective.shape) if effective is not None else tuple(G.shape_of(b) or ())
    in_shape = G.shape_of(a)
    rows = (in_shape[1] if trans_a else in_shape[0]) if in_shape else 1
    rows = rows if isinstance(rows, int) else 1
    params = _count(w_shape)
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    has_bias = len(node.inputs) > 2 and G.is_present(node.inputs[2])
    # C broadcasts to (M, N); it is a per-channel bias when at most its last axis is longer than 1.
    c_shape = G.shape_of(node.inputs[2]) if has_bias else ()
    per_channel = c_shape is not None and all(d == 1 for d in c_shape[:-1])
    return Layer(
        node.name,
        "Gemm",
        w_shape,
        params,
        2 * rows * params,
        in_shape,
        G.shape_of(y),
        tuple(sorted(attrs.items())),
        0,
        has_bias,
        weight.source if weight else "",
        rows,
        rows,
        reason,
        a.name,
        y.name,
        per_channel,
        effective,
        _bias_vector(node.inputs[2], beta, w_shape[1])
        if has_bias and per_channel and reason is None
        else None,
        **_stored(weight),
        input_axes=G.unflattened_axes(a, w_shape[0]) if reason is None and not trans_a else None,
    )


def _matmul_layer(node) -> Layer | None:
    left, right = node.inputs[0], node.inputs[1]
    w_right, w_left = G.resolve_constant(right), G.resolve_constant(left)
    if w_right is None and w_left is None:
        quantized = next((i for i, t in enumerate((left, right)) if _quantized(t)), None)
        if quantized is not None:
            return _quantized_matmul(node, quantized)
        return None  # activation × activation (attention): never a candidate, not even listed
    if w_right is not None and w_left is not None:
        return None  # constant × constant: the runtime folds it
    weight, data_index, side = (w_right, 0, "right") if w_right is not None else (w_left, 1, "left")
    x = node.inputs[data_index]
    in_shape = G.shape_of(x)
    reason = _skip_for_weight(weight)
    values = weight.values
    if reason is None and values.ndim != 2:
        reason = _stacked_weight_reason(tuple(values.shape), in_shape)
        if reason is None:
            values = values.reshape(values.shape[-2:])  # (1, …, 1, K, N): the (K, N) matrix itself
    return _matrix_product_layer(node, weight, values, data_index, side, reason)


def _matrix_product_layer(node, weight, values, data_index: int, side: str, reason, source_note=""):
    """The record of y = x·W (side "right") or W·x ("left") with W the (K, N) matrix `values`, read
    from a MatMul or an Einsum node; the methods emit MatMuls for it."""
    x = node.inputs[data_index]
    in_shape = G.shape_of(x)
    w_shape = tuple(values.shape)
    params = int(prod(w_shape))
    if in_shape:
        # right: x (..., M, K) @ W (K, N) → rows = prod(leading dims); left: W (M, K) @ x (..., K, N)
        rows = _dims(in_shape[:-1]) if side == "right" else _dims(in_shape[:-2] + in_shape[-1:])
    else:
        rows = 1
    return Layer(
        node.name,
        "MatMul",
        w_shape,
        params,
        2 * rows * params,
        in_shape,
        G.shape_of(node.outputs[0]),
        (("weight_side", side),),
        data_index,
        False,
        weight.source + source_note,
        rows,
        rows,
        reason,
        x.name,
        node.outputs[0].name,
        False,
        values if reason is None else None,
        **_stored(weight),
        input_axes=G.unflattened_axes(x, w_shape[0]) if reason is None and side == "right" else None,
    )


def _einsum_layer(node) -> Layer | None:
    """An Einsum with one constant operand. One that is x·W over x's last axis with W a matrix
    ("bij,jk->bik", "...j,kj->...k", operands in either order) is a MatMul layer with W as (K, N)
    — the methods emit MatMuls, which compute exactly that; any other is listed with a reason."""
    constants = [G.resolve_constant(t) if G.is_present(t) else None for t in node.inputs]
    weight_index = next((i for i, c in enumerate(constants) if c is not None), None)
    if weight_index is None or all(c is not None for c in constants):
        return None  # activations only (attention), or constants only (folded by the runtime)
    equation = str(node.attrs.get("equation", ""))
    weight = constants[weight_index]
    data_index = next(i for i, c in enumerate(constants) if c is None)
    layout = _einsum_as_matmul(equation, weight_index) if len(constants) == 2 else None
    reason = _skip_for_weight(weight)
    if reason is None and layout is None:
        reason = (
            f"Einsum {equation!r} is not a product x·W over x's last axis with one constant matrix W "
            "(as 'bij,jk->bik'): not factorized; left dense"
        )
    values = weight.values.T if reason is None and layout == "nk" else weight.values
    return _matrix_product_layer(
        node, weight, values, data_index, "right", reason, f"; Einsum {equation!r} read as x·W"
    )


def _einsum_axes(term: str) -> list[str]:
    """The axis labels of one Einsum term, an ellipsis counted as one label."""
    labels = term.replace("...", ".").strip()
    return ["..." if label == "." else label for label in labels]


def _einsum_as_matmul(equation: str, weight_index: int) -> str | None:
    """How `equation`, with its constant the operand `weight_index`, reads as x·W contracting x's
    last axis: "kn" when the constant is W (K, N), "nk" when it is stored transposed (N, K); None
    for any other contraction (a batched weight, a contraction over another axis, a trace, an
    implicit output)."""
    if "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    w_axes, x_axes = _einsum_axes(terms[weight_index]), _einsum_axes(terms[1 - weight_index])
    if len(w_axes) != 2 or len(set(w_axes)) != 2 or "..." in w_axes:
        return None
    if not x_axes or len(set(x_axes)) != len(x_axes) or x_axes[-1] not in w_axes:
        return None
    contracted = x_axes[-1]
    kept = w_axes[1] if w_axes[0] == contracted else w_axes[0]
    if kept in x_axes or _einsum_axes(output) != x_axes[:-1] + [kept]:
        return None
    return "kn" if w_axes[0] == contracted else "nk"


def _stacked_weight_reason(w_shape: tuple[int, ...], in_shape) -> str | None:
    """Why a MatMul constant that is not a matrix cannot be factorized as one; None for a
    (1, …, 1, K, N) weight beside an input of at least its rank, where MatMul's broadcasting makes
    the leading 1s no-ops: x (…, M, K) @ W (1, K, N) is x @ W[0], shape and all."""
    if len(w_shape) < 2:
        return (
            f"weight is a vector (shape {w_shape}): the MatMul contracts it away; only a matrix is factorized"
        )
    leading, matrix = w_shape[:-2], w_shape[-2:]
    if any(d != 1 for d in leading):
        count = prod(leading)
        return (
            f"weight {w_shape} is {count} separate {matrix} matrices (a batched MatMul over its leading "
            f"dims {leading}): only a single matrix is factorized; left dense"
        )
    if in_shape is None or len(in_shape) < len(w_shape):
        rank = "of unknown rank" if in_shape is None else f"of rank {len(in_shape)}"
        return (
            f"weight {w_shape} has more dims than its input ({rank}): the MatMul's output gains "
            f"leading axes of 1, which a {matrix} factorization would not; left dense"
        )
    return None


def at_data_shapes(layers: list[Layer], bound_layers: list[Layer]) -> list[Layer]:
    """`layers` with FLOPs and positions from the same layers analysed at the data's shapes
    (tnopt.layout.bind_dims), and those shapes as data_input/output_shape (methods' costs read
    spatial extents from them); the symbolic shapes stay, for emitted subgraphs that must take any batch."""
    import dataclasses

    bound = {layer.name: layer for layer in bound_layers}
    result = []
    for layer in layers:
        other = bound.get(layer.name)
        if other is None or other.op != layer.op:
            result.append(layer)
            continue
        changes = {
            "flops": other.flops,
            "in_positions": other.in_positions,
            "out_positions": other.out_positions,
        }
        changes.update(data_input_shape=other.input_shape, data_output_shape=other.output_shape)
        result.append(dataclasses.replace(layer, **changes))
    return result
