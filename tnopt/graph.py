"""The only module that names tensors or splices nodes (through onnx-graphsurgeon).

Everything above it speaks in layers and arrays; everything below it is ONNX protobuf. Rewrites go
through `Emitter`, which gives each emitted node and tensor the deterministic name
`{layer}/{method}/{role}` and records provenance that `export_model` writes into the nodes'
`metadata_props`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Ops through which a constant weight may reach a layer; each is folded when reading the weight.
_PASS_THROUGH = ("Identity", "Transpose", "Cast", "Mul", "MatMul", "Reshape", "Squeeze", "Unsqueeze")


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    _name_unnamed_nodes(graph)
    return graph


def _name_unnamed_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name: layers are addressed by node name in plans and reports."""
    seen: Counter[str] = Counter()
    for node in graph.nodes:
        seen[node.name] += 1
    taken = set(seen)
    counters: Counter[str] = Counter()
    for index, node in enumerate(graph.nodes):
        if node.name and seen[node.name] == 1:
            continue
        base = node.name or f"{node.op}_{index}"
        candidate = base
        while candidate in taken:
            counters[base] += 1
            candidate = f"{base}_{counters[base]}"
        taken.add(candidate)
        node.name = candidate


def export_model(graph: gs.Graph, like: onnx.ModelProto, provenance: dict[str, dict[str, str]] | None = None):
    """gs.Graph → ModelProto carrying `like`'s IR version, opsets, metadata and doc string."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    _keep_versions(model, like)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(like, attr))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    if provenance:
        for node in model.graph.node:
            tags = provenance.get(node.name)
            if tags:
                for key, value in tags.items():
                    entry = node.metadata_props.add()
                    entry.key, entry.value = key, str(value)
    return model


def _keep_versions(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Every model tnopt exports keeps the input's IR version and opset imports (graphsurgeon
    would write its own defaults, which onnxruntime may not read)."""
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)


def find_node(graph: gs.Graph, name: str) -> gs.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of all floating-point initializers and Constant-node tensors (the model's weights)."""
    total = 0
    float_types = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
    }
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors.extend(a.t for a in node.attribute if a.name == "value")
    for tensor in tensors:
        if tensor.data_type in float_types:
            total += int(np.prod(tensor.dims)) if tensor.dims else 1
    return total


def is_present(tensor) -> bool:
    """Optional ONNX inputs may be given as empty names."""
    return tensor is not None and bool(tensor.name)


def shape_of(tensor) -> tuple | None:
    """Static ints stay ints, symbolic dims become their name (or '?'); None when unknown."""
    if tensor is None or tensor.shape is None:
        return None
    return tuple(
        d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else "?") for d in tensor.shape
    )


@dataclass
class ConstantWeight:
    """A weight folded from the constant producers that feed a layer."""

    values: np.ndarray
    source: str  # how the weight reaches the node, e.g. "Transpose(initializer)"
    shared: bool  # another node also consumes the weight (rewriting would not free it)


def resolve_constant(tensor, depth: int = 0) -> ConstantWeight | None:
    """Fold `tensor` to an array when it is constant: an initializer, a Constant node, or one of
    those reached through Identity / Transpose / Cast / Mul / MatMul of constants / Reshape
    (weights of dequantized, exported-transposed or MPO-stored layers). Returns None for activations."""
    if depth > 8:
        return None
    shared = len(tensor.outputs) > 1
    if isinstance(tensor, gs.Constant):
        return ConstantWeight(np.asarray(tensor.values), "initializer", shared)
    if len(tensor.inputs) != 1:
        return None  # a graph input or an untraceable tensor
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        value = producer.attrs.get("value")
        if isinstance(value, gs.Constant):
            return ConstantWeight(np.asarray(value.values), "Constant", shared)
        for key in ("value_float", "value_floats"):
            if key in producer.attrs:
                return ConstantWeight(np.asarray(producer.attrs[key], dtype=np.float32), "Constant", shared)
        return None
    if producer.op not in _PASS_THROUGH:
        return None
    operands = [resolve_constant(t, depth + 1) if is_present(t) else None for t in producer.inputs]
    first = operands[0] if operands else None
    if first is None:
        return None
    values = first.values
    if producer.op == "Transpose":
        values = np.transpose(values, producer.attrs.get("perm"))
    elif producer.op == "Cast":
        values = values.astype(onnx.helper.tensor_dtype_to_np_dtype(producer.attrs["to"]))
    elif producer.op in ("Mul", "MatMul"):
        if len(operands) != 2 or operands[1] is None:
            return None
        # MatMul of constants: the rebuild subgraph of MPO storage mode, folded like the runtime does.
        values = values * operands[1].values if producer.op == "Mul" else values @ operands[1].values
    elif producer.op in ("Reshape", "Squeeze", "Unsqueeze"):
        target = _folded_shape(producer, values, operands)
        if target is None:
            return None
        values = values.reshape(target)
    chain_shared = shared or any(op is not None and op.shared for op in operands)
    return ConstantWeight(values, f"{producer.op}({first.source})", chain_shared)


def _folded_shape(node, values: np.ndarray, operands) -> tuple | None:
    out = node.outputs[0]
    if out.shape is not None and all(isinstance(d, int) for d in out.shape):
        return tuple(out.shape)
    if node.op == "Reshape" and len(operands) > 1 and operands[1] is not None:
        shape = [int(d) for d in operands[1].values]
        return tuple(values.shape[i] if d == 0 else d for i, d in enumerate(shape))
    return None


def emitted_tensor(layer_name: str, method: str, role: str) -> str:
    """Name of the tensor the Emitter gives the output of node `role` of a rewritten layer."""
    return f"{layer_name}/{method}/{role}_out"


@dataclass
class Emitter:
    """Builds the replacement of one node: deterministic names, provenance, one splice.

    Passes call `const` and `op`; the op made with `final=True` takes over the original node's
    output tensor, so consumers downstream never notice the swap.
    """

    graph: gs.Graph
    node: gs.Node
    method: str
    rank: str
    dtype: np.dtype
    provenance: dict[str, dict[str, str]] = field(default_factory=dict)

    data_index: int = 0  # which input of the node carries the activations
    bias_index: int | None = None  # which input carries the bias (Conv: 2, Gemm: C at 2)

    def __post_init__(self):
        self.prefix = f"{self.node.name}/{self.method}"
        self.data_input = self.node.inputs[self.data_index]
        bias = (
            self.node.inputs[self.bias_index]
            if (self.bias_index is not None and len(self.node.inputs) > self.bias_index)
            else None
        )
        # The original bias tensor is reused as is: it already has the right values and shape.
        self.bias = bias if is_present(bias) else None
        self._spliced = False

    def const(self, role: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{role}", np.ascontiguousarray(values))

    def op(
        self,
        op_type: str,
        role: str,
        inputs: list,
        attrs: dict | None = None,
        *,
        final: bool = False,
        dtype=None,
    ):
        """`dtype` overrides the layer's dtype for the output (int64 for Shape/Slice/Concat of shapes):
        the declared type is exported as value_info, and a wrong one makes onnxruntime refuse the model."""
        name = f"{self.prefix}/{role}"
        if final:
            outputs = list(self.node.outputs)
            self._detach_original()
        else:
            outputs = [
                gs.Variable(
                    emitted_tensor(self.node.name, self.method, role),
                    dtype=self.dtype if dtype is None else dtype,
                )
            ]
        new = gs.Node(op=op_type, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=outputs)
        self.graph.nodes.append(new)
        self.provenance[name] = {
            "tnopt.method": self.method,
            "tnopt.source_node": self.node.name,
            "tnopt.rank": self.rank,
        }
        return outputs[0]

    def _detach_original(self) -> None:
        if self._spliced:
            raise RuntimeError(f"{self.prefix}: two final nodes emitted")
        self._spliced = True
        self.node.outputs.clear()
        self.node.inputs.clear()
        self.graph.nodes.remove(self.node)


def isolate_layer(layer, like: onnx.ModelProto, input_shape: tuple[int, ...], dtype) -> onnx.ModelProto:
    """A one-node model computing `layer` alone (same op, attributes and weight; zero bias) on an
    input of concrete `input_shape`, for timing the dense node against its factorized subgraph.
    The node keeps the layer's name so the same rank plan applies to it."""
    x = gs.Variable("x", dtype=dtype, shape=list(input_shape))
    y = gs.Variable("y", dtype=dtype)
    weight = gs.Constant("W", np.ascontiguousarray(layer.weight))
    attrs: dict = {}
    if layer.op in ("Conv", "ConvTranspose"):
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in layer.attrs if k != "auto_pad"}
        if layer.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
            attrs["auto_pad"] = layer.attr("auto_pad")
            attrs.pop("pads", None)
        inputs = [x, weight]
        if layer.has_bias:
            # ConvTranspose weights are (I, O/group, k): its output channels are the second axis.
            out_channels = (
                layer.weight_shape[1] * layer.group if layer.op == "ConvTranspose" else layer.weight_shape[0]
            )
            inputs.append(gs.Constant("B", np.zeros(out_channels, layer.weight.dtype)))
    elif layer.op == "Gemm":
        # The analyzed weight already folds transB and alpha.
        attrs = {"transA": layer.attr("transA"), "beta": layer.attr("beta")}
        inputs = [x, weight]
        if layer.has_bias:
            inputs.append(gs.Constant("B", np.zeros(layer.weight_shape[1], layer.weight.dtype)))
    else:
        inputs = [weight, x] if layer.attr("weight_side") == "left" else [x, weight]
    node = gs.Node(layer.op, name=layer.name, attrs=attrs, inputs=inputs, outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=default_opset_of(like))
    model = gs.export_onnx(graph, do_type_check=False)
    _keep_versions(model, like)
    return model


def default_opset_of(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def truncate(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of `model` needed to compute `outputs` (which become its only outputs).

    onnxruntime runs every node whatever outputs are fetched, so reading an early tensor of a big
    model costs a full run unless the graph is cut first."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.outputs = [
        tensors[name].to_variable(dtype=tensors[name].dtype)
        if isinstance(tensors[name], gs.Constant)
        else tensors[name]
        for name in outputs
    ]
    for tensor in graph.outputs:
        if tensor.dtype is None:
            tensor.dtype = np.float32
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    cut = gs.export_onnx(graph, do_type_check=False)
    _keep_versions(cut, model)
    return cut


def output_producer(model: onnx.ModelProto, index: int = 0) -> str | None:
    """Op type of the node that writes graph output `index` (None for a pass-through input)."""
    name = model.graph.output[index].name
    for node in model.graph.node:
        if name in node.output:
            return node.op_type
    return None


def upstream_layers(model: onnx.ModelProto, names: list[str]) -> dict[str, set[str]]:
    """For each named node, the named nodes its inputs depend on (its ancestors among `names`)."""
    graph = import_graph(model)
    wanted = set(names)
    ancestors: dict[str, set[str]] = {}
    producer_of = {tensor.name: node for node in graph.nodes for tensor in node.outputs}
    graph.toposort()
    for node in graph.nodes:
        found: set[str] = set()
        for tensor in node.inputs:
            producer = producer_of.get(tensor.name)
            if producer is not None:
                found |= ancestors[producer.name]
                if producer.name in wanted:
                    found.add(producer.name)
        ancestors[node.name] = found
    return {name: ancestors.get(name, set()) for name in names}
