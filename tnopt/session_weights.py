"""A session's weights handed to onnxruntime as arrays, not serialized with its graph.

    model ──► skeleton (graph + small tensors; each large initializer a header marked external)
          └─► {name: array}  (the large initializers' bytes, viewed, never re-encoded)
    onnxruntime.InferenceSession(skeleton bytes, options.add_external_initializers(names, values))

Why: a session of a ModelProto used to cost protobuf work over every weight byte three times — the
size check (`ByteSize`), the encoding (`SerializeToString`) and onnxruntime's decoding — before any
graph work. ResNet-50 (100 MB of weights) paid ~0.3 s for each of the first two alone under load,
on every exported plan (~150 in its 512-crop scale row). onnxruntime reads initializers whose
TensorProto is marked external from the arrays given to it instead, and computes the same outputs
(bit for bit: the same bytes reach the same kernels). The arrays must outlive the session:
`weightless_payload`'s caller keeps them on it.

Only top-level initializers with `raw_data` of a plain numeric type are moved out; tensors in
subgraphs, Constant nodes, typed-field or already external data stay where they are.
"""

from __future__ import annotations

import numpy as np
import onnx

# Initializers smaller than this stay in the graph (nothing to save, and a header costs a few bytes).
STAGED_MIN_BYTES = 1024
# Where a moved initializer claims to live; onnxruntime takes it from the given arrays and never
# opens it.
STAGED_LOCATION = "tnopt-session-weights.bin"
_NUMPY_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT64: np.uint64,
    onnx.TensorProto.BOOL: np.bool_,
}


def _movable(tensor: onnx.TensorProto) -> bool:
    return (
        tensor.data_type in _NUMPY_DTYPES
        and tensor.data_location != onnx.TensorProto.EXTERNAL
        and len(tensor.raw_data) >= STAGED_MIN_BYTES
    )


def weightless_payload(model: onnx.ModelProto) -> tuple[bytes, dict[str, np.ndarray]] | None:
    """(the serialized skeleton, {initializer name: its array}) with the large initializers moved out
    of the message; None when there is nothing to move (serialize the model as it is). The model is
    not modified."""
    graph = model.graph
    if not any(_movable(t) for t in graph.initializer):
        return None
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip=("graph",))
    _copy_fields(graph, skeleton.graph, skip=("initializer",))
    values: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if not _movable(tensor):
            skeleton.graph.initializer.add().CopyFrom(tensor)
            continue
        header = skeleton.graph.initializer.add()
        header.name, header.data_type = tensor.name, tensor.data_type
        header.dims.extend(tensor.dims)
        header.data_location = onnx.TensorProto.EXTERNAL
        entry = header.external_data.add()
        entry.key, entry.value = "location", STAGED_LOCATION
        # One copy of the bytes out of the message (protobuf hands out a new bytes object), no
        # encoding; little-endian as ONNX's raw_data is.
        dtype = np.dtype(_NUMPY_DTYPES[tensor.data_type]).newbyteorder("<")
        values[tensor.name] = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return skeleton.SerializeToString(), values


def _copy_fields(source, target, skip=()) -> None:
    """Every set field of `source` into the empty message `target`, except those named in `skip`."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        # protobuf >= 6 has `is_repeated` (7 dropped `label`); older ones only `label`.
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
