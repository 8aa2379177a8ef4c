"""With tnopt/splice.py, the only module that names tensors or builds nodes (through onnx-graphsurgeon).

Everything above it speaks in layers and arrays; everything below it is ONNX protobuf. Rewrites go
through `tnopt.splice.Emitter`, which gives each emitted node and tensor the deterministic name
`{layer}/{method}/{role}` and records provenance that `export_model` writes into the nodes'
`metadata_props`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import prod

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

# graphsurgeon logs its warnings to stdout (e.g. "Could not convert: UNDEFINED" for a sequence-typed
# value), where `tnopt inspect --json` writes its JSON and the CLI its tables: only errors, please.
G_LOGGER.severity = G_LOGGER.ERROR

# Ops through which a constant weight may reach a layer; each is folded when reading the weight.
_PASS_THROUGH = ("Identity", "Transpose", "Cast", "Mul", "MatMul", "Reshape", "Squeeze", "Unsqueeze")


# A node attribute holding a body graph (If branches, Loop and Scan bodies).
Subgraph = gs.Graph
# A local function's node attribute that refers to an attribute of the calling node.
AttributeRef = gs.Node.AttributeRef


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    _name_unnamed_nodes(graph)
    return graph


def _name_unnamed_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name: layers are addressed by node name in plans and reports."""
    for node, name in zip(graph.nodes, unique_node_names([(n.name, n.op) for n in graph.nodes])):
        node.name = name


def unique_node_names(nodes: list[tuple[str, str]]) -> list[str]:
    """The names tnopt addresses the nodes (name, op type) of a graph by, in order: each unique
    name kept, an empty or repeated one replaced by `{name or op}_{index}` (made unique)."""
    seen: Counter[str] = Counter(name for name, _ in nodes)
    taken = set(seen)
    counters: Counter[str] = Counter()
    names = []
    for index, (name, op) in enumerate(nodes):
        if name and seen[name] == 1:
            names.append(name)
            continue
        base = name or f"{op}_{index}"
        candidate = base
        while candidate in taken:
            counters[base] += 1
            candidate = f"{base}_{counters[base]}"
        taken.add(candidate)
        names.append(candidate)
    return names


def export_model(graph: gs.Graph, like: onnx.ModelProto, provenance: dict[str, dict[str, str]] | None = None):
    """gs.Graph → ModelProto carrying `like`'s IR version, opsets, metadata and doc string."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    _keep_overridable_defaults(model, like)
    _keep_outer_constants_outside(model.graph, model.graph.node, like.graph.node)
    keep_versions(model, like)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(like, attr))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    # graphsurgeon keeps neither the graph's metadata_props (IR 10) nor the doc strings and
    # metadata_props of its inputs, outputs and value_info (torch's dynamo exporter writes them).
    del model.graph.metadata_props[:]
    model.graph.metadata_props.extend(like.graph.metadata_props)
    described = {
        v.name: v
        for v in [*like.graph.value_info, *like.graph.input, *like.graph.output]
        if v.doc_string or v.metadata_props
    }
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        original = described.get(value.name)
        if original is not None:
            value.doc_string = original.doc_string
            del value.metadata_props[:]
            value.metadata_props.extend(original.metadata_props)
    _keep_node_annotations(model.graph.node, like.graph.node)
    functions = {(f.domain, f.name): f for f in like.functions}
    for function in model.functions:
        if (function.domain, function.name) in functions:
            _keep_node_annotations(function.node, functions[(function.domain, function.name)].node)
    if provenance:
        for node in model.graph.node:
            tags = provenance.get(node.name)
            if tags:
                for key, value in tags.items():
                    entry = node.metadata_props.add()
                    entry.key, entry.value = key, str(value)
    return model


def _keep_outer_constants_outside(top: onnx.GraphProto, nodes, like_nodes) -> None:
    """graphsurgeon copies each outer-scope constant an If/Loop/Scan body reads into that body's
    initializers: a weight read at the top level and in a body was stored twice, and a body's copy of
    an overridable default would shadow what the caller feeds. Each body of an unchanged node keeps
    only the initializers it had; the others go back to (or stay in) the top-level graph."""
    originals = {(node.op_type, tuple(node.output)): node for node in like_nodes}
    outer = {t.name for t in top.initializer}
    for node in nodes:
        original = originals.get((node.op_type, tuple(node.output)))
        if original is None:
            continue
        bodies = {a.name: a.g for a in original.attribute if a.type == onnx.AttributeProto.GRAPH}
        for attribute in node.attribute:
            if attribute.type != onnx.AttributeProto.GRAPH or attribute.name not in bodies:
                continue
            body, own = attribute.g, {t.name for t in bodies[attribute.name].initializer}
            moved = [t for t in body.initializer if t.name not in own]
            kept = [t for t in body.initializer if t.name in own]
            del body.initializer[:]
            body.initializer.extend(kept)
            for tensor in moved:
                if tensor.name not in outer:
                    top.initializer.append(tensor)
                    outer.add(tensor.name)
            _keep_outer_constants_outside(top, body.node, bodies[attribute.name].node)


def _keep_node_annotations(nodes, like_nodes) -> None:
    """graphsurgeon drops every node's doc_string and metadata_props (torch's dynamo exporter
    writes its module paths there). Copy them back onto each node that survives unchanged — same op
    and outputs as a node of `like` — and into the subgraphs of its If/Loop/Scan attributes."""
    originals = {(node.op_type, tuple(node.output)): node for node in like_nodes}
    for node in nodes:
        original = originals.get((node.op_type, tuple(node.output)))
        if original is None or any(p.key == "tnopt.source_node" for p in node.metadata_props):
            continue
        node.doc_string = original.doc_string
        if not node.metadata_props:
            node.metadata_props.extend(original.metadata_props)
        bodies = {a.name: a for a in original.attribute if a.type == onnx.AttributeProto.GRAPH}
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH and attribute.name in bodies:
                _keep_node_annotations(attribute.g.node, bodies[attribute.name].g.node)


def keep_versions(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Every model tnopt exports keeps the input's IR version and opset imports (graphsurgeon
    would write its own defaults, which onnxruntime may not read)."""
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    _keep_graph_inputs(model, like)


def declare_outputs(model: onnx.ModelProto, declared: list[onnx.ValueInfoProto]) -> None:
    """Give `model`'s graph outputs the types they were declared with (by name): shape inference
    fills in dims an exporter left unknown, and a written model keeps its input's interface."""
    by_name = {value.name: value for value in declared}
    for value in model.graph.output:
        if value.name in by_name:
            value.CopyFrom(by_name[value.name])


def overridable_initializers(model: onnx.ModelProto) -> frozenset[str]:
    """Initializers that are also graph inputs: defaults a caller may override at run time.

    Empty when *every* initializer is listed as an input — IR 3's rule, kept by older exporters
    (PyTorch's keep_initializers_as_inputs) at any IR: there the listing is a convention, not an
    invitation to override, and the weights are constants."""
    initializers = {t.name for t in model.graph.initializer}
    listed = frozenset(i.name for i in model.graph.input if i.name in initializers)
    if model.ir_version < 4 or listed == initializers:
        return frozenset()
    return listed


def _keep_overridable_defaults(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """A graph input with a default (an overridable initializer) is part of the interface even where
    no node reads it: graphsurgeon's cleanup dropped its initializer, and a caller feeding it was
    refused. Its initializer comes back; `_keep_graph_inputs` then lists it in its place."""
    kept, overridable = {t.name for t in model.graph.initializer}, overridable_initializers(like)
    for tensor in like.graph.initializer:
        if tensor.name in overridable and tensor.name not in kept:
            model.graph.initializer.append(tensor)


def _keep_graph_inputs(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """graphsurgeon drops initializers from the graph inputs. Put back, in the input's order, every
    input `like` had whose initializer survives (an overridable default stays overridable), and under
    IR 3 — where every initializer must also be a graph input — list the new initializers too."""
    present = {i.name: i for i in model.graph.input}
    initializers = {t.name: t for t in model.graph.initializer}
    restored = []
    for value in like.graph.input:
        if value.name in present:
            restored.append(present[value.name])
        elif value.name in initializers:
            restored.append(value)
    listed = {v.name for v in restored}
    extra = [i for i in model.graph.input if i.name not in listed]
    if like.ir_version < 4:
        for name, tensor in initializers.items():
            if name not in listed:
                extra.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    restored = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in restored + extra]
    del model.graph.input[:]
    model.graph.input.extend(restored)


def rewritten_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name → method of every rewrite tnopt emitted into `model` (from the provenance tags);
    empty for a model tnopt did not touch."""
    found: dict[str, str] = {}
    for node in model.graph.node:
        tags = {entry.key: entry.value for entry in node.metadata_props}
        if "tnopt.source_node" in tags:
            found.setdefault(tags["tnopt.source_node"], tags.get("tnopt.method", "?"))
    return found


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


def unflattened_axes(tensor, size: int) -> tuple[int, ...] | None:
    """The axes a Flatten/Reshape folded into the last axis (`size` long) of `tensor`, e.g. (C, H, W)
    for a Gemm input Flatten(N, C, H, W); None when its producer is neither, or the shapes are not
    static, or the folded axes do not multiply to `size`."""
    producers = getattr(tensor, "inputs", [])
    if len(producers) != 1 or producers[0].op not in ("Flatten", "Reshape"):
        return None
    node = producers[0]
    before, after = shape_of(node.inputs[0]), shape_of(tensor)
    if not before or not after or len(after) != 2:
        return None
    axis = int(node.attrs.get("axis", 1)) if node.op == "Flatten" else 1
    axis = axis + len(before) if axis < 0 else axis
    folded = tuple(before[axis:])
    if not 0 < axis < len(before) or len(folded) < 2 or not all(isinstance(d, int) and d > 0 for d in folded):
        return None
    return folded if prod(folded) == size else None


@dataclass
class ConstantWeight:
    """A weight folded from the constant producers that feed a layer."""

    values: np.ndarray
    source: str  # how the weight reaches the node, e.g. "Transpose(initializer)"
    shared: bool  # another node also consumes the weight (rewriting would not free it)
    # Bytes the weight's constants take in the file (an int8 weight dequantised by Cast → Mul
    # takes 1 byte per value plus its scales, though `values` is float32).
    nbytes: int = 0
    stored_dtype: str = ""


def resolve_constant(tensor, depth: int = 0) -> ConstantWeight | None:
    """Fold `tensor` to an array when it is constant: an initializer, a Constant node, or one of
    those reached through Identity / Transpose / Cast / Mul / MatMul of constants / Reshape
    (weights of dequantized, exported-transposed or MPO-stored layers). Returns None for activations."""
    if depth > 8:
        return None
    shared = len(tensor.outputs) > 1
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        return ConstantWeight(values, "initializer", shared, int(values.nbytes), str(values.dtype))
    if len(tensor.inputs) != 1:
        return None  # a graph input or an untraceable tensor
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        value = producer.attrs.get("value")
        if isinstance(value, gs.Constant):
            values = np.asarray(value.values)
            return ConstantWeight(values, "Constant", shared, int(values.nbytes), str(values.dtype))
        for key in ("value_float", "value_floats"):
            if key in producer.attrs:
                values = np.asarray(producer.attrs[key], dtype=np.float32)
                return ConstantWeight(values, "Constant", shared, int(values.nbytes), "float32")
        return None
    if producer.op == "ConstantOfShape":
        return _constant_fill(producer, shared, depth)
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
    stored = sum(op.nbytes for op in operands if op is not None)
    return ConstantWeight(values, f"{producer.op}({first.source})", chain_shared, stored, first.stored_dtype)


def _constant_fill(node, shared: bool, depth: int) -> ConstantWeight | None:
    """ConstantOfShape of a constant shape: one value repeated (the weights of the onnx wheel's
    "light" test models are stored so). A broadcast view: no memory for the repeated values."""
    shape = resolve_constant(node.inputs[0], depth + 1) if node.inputs else None
    if shape is None:
        return None
    fill = node.attrs.get("value")
    value = (
        np.asarray(fill.values).reshape(-1)[:1] if isinstance(fill, gs.Constant) else np.zeros(1, np.float32)
    )
    dims = tuple(int(d) for d in np.asarray(shape.values).reshape(-1))
    values = np.broadcast_to(value.reshape(()), dims)
    return ConstantWeight(
        values, f"ConstantOfShape({shape.source})", shared, shape.nbytes + int(value.nbytes), str(value.dtype)
    )


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
    keep_versions(cut, model)
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


def probe_model() -> onnx.ModelProto:
    """A one-Relu model: what the runtime opens to learn whether a provider really works."""
    from onnx import TensorProto, helper

    return helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 13)],
        ir_version=8,
    )
