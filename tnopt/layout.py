"""The model's inputs as the data really fills them: symbolic dims bound from the calibration data
(so FLOPs/MACs and activation sizes are counted at real shapes, per sample), and a dynamic-batch
copy of a model whose batch dim is fixed (a batch-1 export), used only where it is proven to give
the same outputs as running the original one sample at a time.

Graph code only: what to compare and by how much is decided by the caller's numbers.
"""

from __future__ import annotations

from math import prod

import numpy as np
import onnx

from tnopt.data import Feeds, input_specs

DYNAMIC_BATCH = "tnopt_batch"


def data_shapes(model: onnx.ModelProto, feeds: Feeds) -> dict[str, tuple[int, ...]]:
    """Each input's shape for ONE sample in the model's layout (batch axis = 1; constants as given)."""
    shapes = {}
    for spec in input_specs(model):
        if spec.name not in feeds:
            continue
        value, axis = feeds[spec.name], feeds.axes[spec.name]
        if axis is None:
            shapes[spec.name] = tuple(value.shape)
        else:
            rest = list(value.shape[1:])
            shapes[spec.name] = tuple(rest[:axis] + [1] + rest[axis:])
    return shapes


def bind_dims(model: onnx.ModelProto, feeds: Feeds) -> onnx.ModelProto:
    """A copy with every input's symbolic dims set from one sample of `feeds`, shapes re-inferred.
    Falls back to the model itself when inference fails (FLOPs then count symbolic dims as 1)."""
    return bind_shapes(model, data_shapes(model, feeds))


def bind_shapes(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """A copy whose inputs named in `shapes` have those static dims, shapes re-inferred; the model
    itself when inference fails."""
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    for value in bound.graph.input:
        if value.name in shapes and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    del bound.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(bound, data_prop=True)
    except Exception:  # inference is a convenience; a >2 GiB proto or an odd op keeps the old counts
        return model


def activation_bytes(bound: onnx.ModelProto) -> int:
    """Bytes of every tensor a bound model computes for one sample (an upper bound on what one
    sample needs: onnxruntime reuses buffers), from its inferred shapes."""
    total = 0
    for value in list(bound.graph.value_info) + list(bound.graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        except Exception:
            itemsize = 4
        total += prod(dims) * itemsize
    return total


def largest_tensor_bytes(model: onnx.ModelProto) -> int | None:
    """Bytes of the largest data tensor (graph inputs, computed tensors, outputs; not weights) of a
    model whose input shapes are all static, from its inferred shapes; None when inference fails
    or leaves a computed tensor's size unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a convenience: the caller then knows nothing
        return None
    constants = {i.name for i in inferred.graph.initializer}
    values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    computed = {name for node in inferred.graph.node for name in node.output if name}
    if computed - {v.name for v in values}:
        return None  # a tensor whose shape inference could not tell
    largest = 0
    for value in values:
        if value.name in constants or not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        if not tensor.HasField("shape") or not all(d.HasField("dim_value") for d in tensor.shape.dim):
            return None
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        except Exception:
            itemsize = 4
        largest = max(largest, prod(d.dim_value for d in tensor.shape.dim) * itemsize)
    return largest


def fixed_batch_size(model: onnx.ModelProto, feeds: Feeds) -> int | None:
    """The static size of the batch axis of the batched inputs, when the model fixes it."""
    by_name = {v.name: v for v in model.graph.input}
    for name in feeds.batched:
        dims = by_name[name].type.tensor_type.shape.dim
        axis = feeds.axes[name]
        if axis < len(dims) and dims[axis].HasField("dim_value"):
            return dims[axis].dim_value
    return None


def dynamic_batch_copy(model: onnx.ModelProto, feeds: Feeds, fixed: int) -> onnx.ModelProto:
    """A copy whose batched inputs (and the outputs whose axis 0 has the fixed size) take any batch.
    Whether it computes the same thing is for the caller to test: a Reshape to a constant shape that
    folded the batch in would now mix samples or fail."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in feeds.batched:
            dim = value.type.tensor_type.shape.dim[feeds.axes[value.name]]
            dim.Clear()
            dim.dim_param = DYNAMIC_BATCH
    for value in copy.graph.output:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].Clear()
            dims[0].dim_param = DYNAMIC_BATCH
    del copy.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(copy, data_prop=True)
    except Exception:
        return copy


def restore_interface(compressed: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """The compressed model with the original's input/output types (its fixed batch dim) again."""
    inputs = {v.name: v for v in original.graph.input}
    outputs = {v.name: v for v in original.graph.output}
    for value in compressed.graph.input:
        if value.name in inputs:
            value.CopyFrom(inputs[value.name])
    for value in compressed.graph.output:
        if value.name in outputs:
            value.CopyFrom(outputs[value.name])
    del compressed.graph.value_info[:]  # inferred for the dynamic batch: stale now
    return compressed
