"""One onnxruntime session for every plan the search measures.

    y_l = g_l·dense_l(x) + Σ_m g_{l,m}·path_{l,m}(x; F_{l,m})        every gate g is an input, 0 or 1

          ┌─ original node ────────────────────────── Mul(g_l) ──────┐
    x_l ──┼─ {l}/{m} subgraph, factors F_{l,m} as inputs ─ Mul(g_{l,m}) ─ Sum ─→ y_l (the layer's output)
          └─ … one subgraph per candidate method of the layer ─ Mul ──┘

Every candidate layer keeps its original node; beside it, each candidate method's subgraph is
built once at the widest rank the search may choose, with its float constants turned into graph
inputs. A plan is a feed: the chosen path's gate is 1 and the rest 0, and a rank-r factorization is
fed zero-padded to the widest shape (methods declare `zero_paddable` when the padded rows and
columns add exact zeros). So the session computes what `apply_plan` would export, without a graph
export and a session per plan. The price is that every run computes every layer's dense node and
widest paths: it pays for big models on little data (MiniLM, 32 sentences: 0.71 s per plan against
1.20 s exported) and loses on small conv nets (ResNet-style, 512 images: 1.72 s against 0.64 s), so
the search times both once and keeps the faster. A plan the board cannot express (a method that
does not pad, a factor wider than the board) returns None and the caller exports it.

Paths whose correction may refit an intercept always carry their own bias input: the original
bias (Layer.bias) is fed until the correction replaces it.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tnopt import graph as G
from tnopt.passes import METHODS, Factors
from tnopt.rewrite import Choice, apply_plan

# A board bigger than this is not built (protobuf's 2 GiB limit, and memory): plans are exported.
MAX_BOARD_BYTES = 1_500_000_000


class Path:
    """One (layer, method) subgraph on the board: its inputs and how to fill them from factors."""

    def __init__(self, layer, method: str, inputs: dict[str, tuple], fixed: dict[str, np.ndarray], own_bias):
        self.layer, self.method = layer, method
        self.inputs = inputs  # name → (shape, dtype) of each float constant made an input
        self.fixed = fixed  # name → value of each constant that stays constant (shapes, axes)
        self.own_bias = own_bias  # the per-channel bias fed while no refit replaced it, or None
        self.gate = f"{layer.name}/{method}/switch/gate"
        self.zeros = {name: np.zeros(shape, dtype) for name, (shape, dtype) in inputs.items()}

    def feed(self, factors: Factors) -> dict[str, np.ndarray] | None:
        """The inputs that realise `factors`, zero-padded to the board's width; None when they do
        not fit (a wider factor, another structure)."""
        arrays = dict(factors.arrays)
        if self.own_bias is not None:
            arrays.setdefault("bias", self.own_bias)
        emitted = emitted_constants(self.layer, self.method, Factors(arrays, factors.rank, 0.0, {}))
        floats = {k: v for k, v in emitted.items() if k in self.inputs}
        if set(floats) != set(self.inputs) or len(emitted) != len(floats) + len(self.fixed):
            return None
        for name, value in self.fixed.items():
            if name not in emitted or not np.array_equal(emitted[name], value):
                return None
        feed = {}
        for name, value in floats.items():
            shape, dtype = self.inputs[name]
            if value.ndim != len(shape) or any(a > b for a, b in zip(value.shape, shape)):
                return None
            if value.shape == tuple(shape):
                feed[name] = np.ascontiguousarray(value, dtype)
            elif not METHODS[self.method].zero_paddable:
                return None  # its narrower factors are not the wide ones with zeros cut off
            else:
                padded = np.zeros(shape, dtype)
                padded[tuple(slice(0, d) for d in value.shape)] = value
                feed[name] = padded
        return feed


class Switchboard:
    def __init__(self, original: onnx.ModelProto, widest: list[Choice], runtime, extra_outputs=()):
        """`widest`: one Choice per (layer, method) at the widest rank the search will feed, for
        methods that are `zero_paddable`. `extra_outputs`: intermediate tensors to capture."""
        self.runtime = runtime
        self.output_names = [o.name for o in original.graph.output]
        graph = G.import_graph(original)
        self.paths: dict[tuple[str, str], Path] = {}
        self.dense_gates: dict[str, str] = {}
        by_layer: dict[str, list[Choice]] = {}
        for choice in widest:
            by_layer.setdefault(choice.layer.name, []).append(choice)
        for name, choices in by_layer.items():
            self._wire_layer(graph, choices)
        tensors = graph.tensors()
        self.extra_outputs = [n for n in extra_outputs if n in tensors]
        for name in self.extra_outputs:
            graph.outputs.append(tensors[name])
        self.model = G.export_model(graph, original)
        self._session = None
        self.default_feed = {gate: _scalar(1.0, dtype) for gate, dtype in self.dense_gates.values()}
        for path in self.paths.values():
            self.default_feed.update(path.zeros)
            self.default_feed[path.gate] = _scalar(0.0, path.layer.weight.dtype)

    def _wire_layer(self, graph: gs.Graph, choices: list[Choice]) -> None:
        layer = choices[0].layer
        dtype = layer.weight.dtype
        node = G.find_node(graph, layer.name)
        output = node.outputs[0]
        dense_out = gs.Variable(f"{layer.name}/switch/dense_out", dtype=dtype)
        node.outputs.clear()
        node.outputs.append(dense_out)
        dense_gate = gs.Variable(f"{layer.name}/switch/gate", dtype=dtype, shape=[1])
        graph.inputs.append(dense_gate)
        self.dense_gates[layer.name] = (dense_gate.name, dtype)
        terms = [_gated(graph, dense_out, dense_gate, f"{layer.name}/switch/dense")]
        for choice in choices:
            own_bias = _own_bias(choice)
            if own_bias is False:
                continue  # its refit would replace a bias computed at run time: exported instead
            arrays = dict(choice.factors.arrays)
            if own_bias is not None:
                arrays["bias"] = own_bias
            path_out = gs.Variable(f"{layer.name}/{choice.method}/switch/out", dtype=dtype)
            # A stand-in for the original node that the method's final op replaces; the original
            # stays to compute the dense term.
            stand_in = gs.Node(
                layer.op, layer.name, dict(node.attrs), inputs=list(node.inputs), outputs=[path_out]
            )
            graph.nodes.append(stand_in)
            _build(graph, stand_in, layer, choice.method, Factors(arrays, choice.factors.rank, 0.0, {}))
            inputs, fixed = _lift_constants(graph, f"{layer.name}/{choice.method}/")
            path = Path(layer, choice.method, inputs, fixed, own_bias)
            gate = gs.Variable(path.gate, dtype=dtype, shape=[1])
            graph.inputs.append(gate)
            terms.append(_gated(graph, path_out, gate, f"{layer.name}/{choice.method}/switch"))
            self.paths[(layer.name, choice.method)] = path
        graph.nodes.append(gs.Node("Sum", f"{layer.name}/switch/sum", inputs=terms, outputs=[output]))

    # -- running plans ------------------------------------------------------------------------------
    @property
    def session(self):
        if self._session is None:
            self._session = self.runtime.session(self.model)
        return self._session

    def feed_for(self, choices: list[Choice]) -> dict[str, np.ndarray] | None:
        feed = dict(self.default_feed)
        for choice in choices:
            path = self.paths.get((choice.layer.name, choice.method))
            values = path.feed(choice.factors) if path is not None else None
            if values is None:
                return None
            feed.update(values)
            feed[path.gate] = _scalar(1.0, choice.layer.weight.dtype)
            gate, dtype = self.dense_gates[choice.layer.name]
            feed[gate] = _scalar(0.0, dtype)
        return feed

    def run(self, choices: list[Choice], inputs: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        """The model's outputs under `choices`, or None when the board cannot express them."""
        feed = self.feed_for(choices)
        if feed is None:
            return None
        return self.runtime.run(self.session, inputs, self.output_names, constants=feed)

    def iter_capture(self, choices: list[Choice], names: list[str], inputs: dict[str, np.ndarray]):
        """(rows, {name: value}) per batch of `inputs` under `choices`; None when not expressible."""
        feed = self.feed_for(choices)
        if feed is None:
            return None
        batches = self.runtime.iter_batches(self.session, inputs, list(names), constants=feed)
        return ((rows, dict(zip(names, values))) for rows, values in batches)


def board_if_faster(
    original: onnx.ModelProto, widest: list[Choice], runtime, inputs, extra_outputs=()
) -> tuple[Switchboard | None, dict[str, float]]:
    """A board for `widest` when a plan runs faster on it than exported, else None; and the two
    timings (empty when no board could be built: no paths, or too big)."""
    extra = sum(a.nbytes for c in widest for a in c.factors.arrays.values())
    if not widest or original.ByteSize() + extra > MAX_BOARD_BYTES:
        return None, {}
    board = Switchboard(original, widest, runtime, extra_outputs)
    timings = time_plan_runs(board, original, widest[0], runtime, inputs)
    return (board if timings["switchboard"] < timings["exported"] else None), timings


def time_plan_runs(board: Switchboard, original, choice: Choice, runtime, inputs) -> dict[str, float]:
    """Seconds for one plan both ways on `inputs`. The board computes every layer's dense node and
    widest paths on each run, so it only pays where an export and a session cost more than that
    extra work: big models on little data (MiniLM on 32 sentences: 0.71 s against 1.20 s), not a
    small conv net on 512 images (ResNet-style: 1.72 s against 0.64 s)."""
    board.run([], inputs)  # opens its session once
    start = time.perf_counter()
    board.run([choice], inputs)
    on_board = time.perf_counter() - start
    start = time.perf_counter()
    runtime.run(apply_plan(original, [choice])[0], inputs)
    return {"switchboard": on_board, "exported": time.perf_counter() - start}


def emitted_constants(layer, method: str, factors: Factors) -> dict[str, np.ndarray]:
    """The constants `method` emits for `factors`, by name: built on a one-node scratch graph
    (no export, no session), so the board can feed exactly what apply_plan would write."""
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
    _build(graph, node, layer, method, factors)
    prefix = f"{layer.name}/{method}/"
    return {
        tensor.name: np.asarray(tensor.values)
        for tensor in graph.tensors().values()
        if isinstance(tensor, gs.Constant) and tensor.name.startswith(prefix)
    }


def _build(graph, node, layer, method: str, factors: Factors) -> None:
    emit = G.Emitter(
        graph,
        node,
        method,
        METHODS[method].rank_label(factors.rank),
        factors.arrays[next(iter(factors.arrays))].dtype,
        {},
        data_index=layer.data_index,
        bias_index=2 if layer.op in ("Conv", "ConvTranspose", "Gemm") else None,
    )
    METHODS[method].build(emit, layer, factors)


def _own_bias(choice: Choice):
    """The bias a path carries as its own input (fed the original until a refit replaces it):
    None when the method never refits an intercept here, False when the original is not constant."""
    spec = METHODS[choice.method].refit_spec(choice.layer)
    if spec is None or not spec.intercept:
        return None
    layer = choice.layer
    if layer.has_bias and layer.bias is None:
        return False
    if layer.bias is not None:
        return layer.bias
    return np.zeros(layer.out_channels, layer.weight.dtype)


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


def _scalar(value: float, dtype) -> np.ndarray:
    return np.array([value], dtype)
