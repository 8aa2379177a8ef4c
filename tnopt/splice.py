"""Graph surgery of plans: the only module besides tnopt/graph.py that builds nodes.

- `splice_plan`: each chosen layer's node replaced by its method's factor subgraph (through
  `Emitter`, which names every node and tensor `{layer}/{method}/{role}` and records provenance);
  the graph is cleaned and sorted once, after all splices; the caller's model is never mutated.
- `build_board`: the switchboard's graph (tnopt/switchboard.py feeds it): every candidate layer keeps
  its dense node and gets one gated path per candidate method beside it, factors lifted to inputs:

          ┌─ original node ────────────────────────── Mul(g_l) ──────┐
    x_l ──┼─ {l}/{m} subgraph, factors F_{l,m} as inputs ─ Mul(g_{l,m}) ─ Sum ─→ y_l (the layer's output)
          └─ … one subgraph per candidate method of the layer ─ Mul ──┘

- `lift_factors`: a plan's export with its factors as graph inputs, so new factor values of the
  same structure run without a new export; `emitted_constants`: what a method emits for given
  factors, built on a one-node scratch graph; `isolate_layer`: one layer alone, for timing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tnopt import graph as G


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
        self.bias = bias if G.is_present(bias) else None
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
                    G.emitted_tensor(self.node.name, self.method, role),
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
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=G.default_opset_of(like))
    model = gs.export_onnx(graph, do_type_check=False)
    G.keep_versions(model, like)
    return model


def _emitter(graph, node, layer, method, factors, provenance) -> Emitter:
    return Emitter(
        graph,
        node,
        method.name,
        method.rank_label(factors.rank),
        factors.arrays[next(iter(factors.arrays))].dtype,
        provenance,
        data_index=layer.data_index,
        bias_index=2 if layer.op in ("Conv", "ConvTranspose", "Gemm") else None,
    )


def splice_plan(model: onnx.ModelProto, choices, methods) -> onnx.ModelProto:
    """`model` with every choice's layer replaced by its factor subgraph (`methods`: name → Method)."""
    graph = G.import_graph(model)
    provenance: dict[str, dict[str, str]] = {}
    for choice in choices:
        method = methods[choice.method]
        node = G.find_node(graph, choice.layer.name)
        method.build(
            _emitter(graph, node, choice.layer, method, choice.factors, provenance),
            choice.layer,
            choice.factors,
        )
    return G.export_model(graph, model, provenance)


def lift_factors(model: onnx.ModelProto, choices, methods):
    """`splice_plan` with every float constant the methods emit turned into a graph input.
    Returns (model, {input name: (shape, dtype)})."""
    graph = G.import_graph(model)
    lifted: dict[str, tuple] = {}
    for choice in choices:
        method = methods[choice.method]
        node = G.find_node(graph, choice.layer.name)
        method.build(
            _emitter(graph, node, choice.layer, method, choice.factors, {}), choice.layer, choice.factors
        )
        inputs, _ = _lift_constants(graph, f"{choice.layer.name}/{choice.method}/")
        lifted.update(inputs)
    return G.export_model(graph, model), lifted


@dataclass
class BoardPath:
    """One (layer, method) subgraph on the board: its gate and the constants made inputs."""

    layer: object
    method: str
    gate: str
    inputs: dict = field(default_factory=dict)  # name → (shape, dtype) of each float constant made an input
    fixed: dict = field(default_factory=dict)  # name → value of each constant that stays (shapes, axes)


@dataclass
class BoardGraph:
    model: onnx.ModelProto
    paths: dict  # (layer name, method) → BoardPath
    dense_gates: dict  # layer name → (gate input name, dtype)
    extra_outputs: list


def build_board(original: onnx.ModelProto, widest, methods, own_bias: dict, extra_outputs=()) -> BoardGraph:
    """The switchboard's graph for `widest` (one Choice per (layer, method) at the widest rank).
    `own_bias[(layer, method)]`: the bias a path carries as its own input (None: none; a path whose
    value is False is left off the board). `extra_outputs`: intermediate tensors made outputs."""
    graph = G.import_graph(original)
    board = BoardGraph(None, {}, {}, [])
    by_layer: dict[str, list] = {}
    for choice in widest:
        by_layer.setdefault(choice.layer.name, []).append(choice)
    for choices in by_layer.values():
        _wire_layer(graph, board, choices, methods, own_bias)
    tensors = graph.tensors()
    board.extra_outputs = [n for n in extra_outputs if n in tensors]
    for name in board.extra_outputs:
        graph.outputs.append(tensors[name])
    board.model = G.export_model(graph, original)
    return board


def _wire_layer(graph: gs.Graph, board: BoardGraph, choices, methods, own_bias) -> None:
    layer = choices[0].layer
    dtype = layer.weight.dtype
    node = G.find_node(graph, layer.name)
    output = node.outputs[0]
    dense_out = gs.Variable(f"{layer.name}/switch/dense_out", dtype=dtype)
    node.outputs.clear()
    node.outputs.append(dense_out)
    dense_gate = gs.Variable(f"{layer.name}/switch/gate", dtype=dtype, shape=[1])
    graph.inputs.append(dense_gate)
    board.dense_gates[layer.name] = (dense_gate.name, dtype)
    terms = [_gated(graph, dense_out, dense_gate, f"{layer.name}/switch/dense")]
    for choice in choices:
        bias = own_bias.get((layer.name, choice.method))
        if bias is False:
            continue  # its refit would replace a bias computed at run time: exported instead
        arrays = dict(choice.factors.arrays)
        if bias is not None:
            arrays["bias"] = bias
        path_out = gs.Variable(f"{layer.name}/{choice.method}/switch/out", dtype=dtype)
        # A stand-in for the original node that the method's final op replaces; the original
        # stays to compute the dense term.
        stand_in = gs.Node(
            layer.op, layer.name, dict(node.attrs), inputs=list(node.inputs), outputs=[path_out]
        )
        graph.nodes.append(stand_in)
        method = methods[choice.method]
        factors = type(choice.factors)(arrays, choice.factors.rank, 0.0, {})
        method.build(_emitter(graph, stand_in, layer, method, factors, {}), layer, factors)
        inputs, fixed = _lift_constants(graph, f"{layer.name}/{choice.method}/")
        path = BoardPath(layer, choice.method, f"{layer.name}/{choice.method}/switch/gate", inputs, fixed)
        gate = gs.Variable(path.gate, dtype=dtype, shape=[1])
        graph.inputs.append(gate)
        terms.append(_gated(graph, path_out, gate, f"{layer.name}/{choice.method}/switch"))
        board.paths[(layer.name, choice.method)] = path
    graph.nodes.append(gs.Node("Sum", f"{layer.name}/switch/sum", inputs=terms, outputs=[output]))


def emitted_constants(layer, method, factors) -> dict[str, np.ndarray]:
    """The constants `method` emits for `factors`, by name: built on a one-node scratch graph
    (no export, no session), so the board can feed exactly what an export would write."""
    inputs = []
    for index in range(max(layer.data_index, 1) + 1):
        inputs.append(
            gs.Variable("x", dtype=layer.weight.dtype)
            if index == layer.data_index
            else gs.Constant("W", np.zeros((1,), layer.weight.dtype))
        )
    if layer.has_bias:
        inputs.append(gs.Constant("B", np.zeros((1,), layer.weight.dtype)))
    node = gs.Node(layer.op, layer.name, dict(layer.attrs), inputs=inputs, outputs=[gs.Variable("y")])
    graph = gs.Graph(nodes=[node], inputs=[inputs[layer.data_index]], outputs=node.outputs)
    method.build(_emitter(graph, node, layer, method, factors, {}), layer, factors)
    prefix = f"{layer.name}/{method.name}/"
    return {
        tensor.name: np.asarray(tensor.values)
        for tensor in graph.tensors().values()
        if isinstance(tensor, gs.Constant) and tensor.name.startswith(prefix)
    }


def _lift_constants(graph: gs.Graph, prefix: str):
    """Turn the float constants named `prefix…` into graph inputs; return (inputs, fixed)."""
    inputs, fixed = {}, {}
    for tensor in list(graph.tensors().values()):
        if not (isinstance(tensor, gs.Constant) and tensor.name.startswith(prefix)):
            continue
        values = np.asarray(tensor.values)
        if values.dtype.kind != "f":
            fixed[tensor.name] = values
            continue
        variable = gs.Variable(tensor.name, dtype=values.dtype, shape=list(values.shape))
        for consumer in list(tensor.outputs):
            for index, operand in enumerate(consumer.inputs):
                if operand is tensor:
                    consumer.inputs[index] = variable
        graph.inputs.append(variable)
        inputs[tensor.name] = (values.shape, values.dtype)
    return inputs, fixed


def _gated(graph: gs.Graph, value, gate, prefix: str):
    out = gs.Variable(f"{prefix}/gated", dtype=value.dtype)
    graph.nodes.append(gs.Node("Mul", f"{prefix}/gate_mul", inputs=[value, gate], outputs=[out]))
    return out
