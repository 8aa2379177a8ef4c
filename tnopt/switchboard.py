"""One onnxruntime session for every plan the search measures: the runner's (tnopt/runner.py) board.

    y_l = g_l·dense_l(x) + Σ_m g_{l,m}·path_{l,m}(x; F_{l,m})        every gate g is an input, 0 or 1

Every candidate layer keeps its original node; beside it, each candidate method's subgraph is
built once at the widest rank the search may choose, with its float constants turned into graph
inputs (the graph is built by tnopt.splice.build_board). A plan is a feed: the chosen path's gate
is 1 and the rest 0, and a rank-r factorization is fed zero-padded to the widest shape (methods
declare `zero_paddable` when the padded rows and columns add exact zeros). So the session computes
what an export of the plan would, without a graph export and a session per plan. The price is that
every run computes every layer's dense node and widest paths: it pays for big models on little data
(MiniLM, 32 sentences: 0.71 s per plan against 1.20 s exported) and loses on small conv nets
(ResNet-style, 512 images: 1.72 s against 0.64 s), so the runner times both once and keeps the
faster. A plan the board cannot express (a method that does not pad, a factor wider than the board)
gets None here and the runner exports it.

Paths whose correction may refit an intercept always carry their own bias input: the original
bias (Layer.bias) is fed until the correction replaces it.
"""

from __future__ import annotations

import numpy as np
import onnx

from tnopt.passes import Factors
from tnopt.splice import BoardPath, build_board, emitted_constants


class Switchboard:
    def __init__(self, original: onnx.ModelProto, widest, runtime, extra_outputs=(), methods=None):
        """`widest`: one Choice per (layer, method) at the widest rank the runner will feed, for
        methods that are `zero_paddable`. `extra_outputs`: intermediate tensors to capture.
        `methods`: the run's method table (name → Method; default the registry)."""
        from tnopt.passes import METHODS

        self.runtime, self.methods = runtime, methods or METHODS
        self.output_names = [o.name for o in original.graph.output]
        own_bias = {(c.layer.name, c.method): _own_bias(c, self.methods) for c in widest}
        board = build_board(original, widest, self.methods, own_bias, extra_outputs)
        self.model, self.extra_outputs = board.model, board.extra_outputs
        self.paths = {key: _Feeder(path, own_bias[key], self.methods) for key, path in board.paths.items()}
        self.dense_gates = board.dense_gates
        self._session = None
        self.default_feed = {gate: _scalar(1.0, dtype) for gate, dtype in self.dense_gates.values()}
        for path in self.paths.values():
            self.default_feed.update(path.zeros)
            self.default_feed[path.gate] = _scalar(0.0, path.layer.weight.dtype)

    @property
    def session(self):
        if self._session is None:
            self._session = self.runtime.session(self.model, own=True)
        return self._session

    def release(self) -> None:
        """Close the session (its weights, pre-packed kernels and arena); the next run reopens it.
        A board kept only for runs on few samples is idle most of the search: ResNet-50's, opened
        to be timed, held ~0.7 GB through the search without running a plan."""
        self._session = None

    def feed_for(self, choices) -> dict[str, np.ndarray] | None:
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

    def run(self, choices, inputs) -> list[np.ndarray] | None:
        """The model's outputs under `choices`, or None when the board cannot express them."""
        feed = self.feed_for(choices)
        if feed is None:
            return None
        return self.runtime.run(self.session, inputs, self.output_names, constants=feed)

    def iter_outputs(self, choices, names, inputs):
        """(rows, [values of `names`]) per batch of `inputs` under `choices`; None when not expressible."""
        feed = self.feed_for(choices)
        if feed is None:
            return None
        return self.runtime.iter_batches(self.session, inputs, list(names), constants=feed)

    def iter_capture(self, choices, names, inputs):
        """(rows, {name: value}) per batch of `inputs` under `choices`; None when not expressible."""
        batches = self.iter_outputs(choices, names, inputs)
        if batches is None:
            return None
        return ((rows, dict(zip(names, values))) for rows, values in batches)


class _Feeder:
    """Fills one board path's inputs from factors."""

    def __init__(self, path: BoardPath, own_bias, methods):
        self.layer, self.method, self.gate = path.layer, path.method, path.gate
        self.inputs, self.fixed, self.own_bias = path.inputs, path.fixed, own_bias
        self.methods = methods
        self.zeros = {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.inputs.items()}

    def feed(self, factors: Factors) -> dict[str, np.ndarray] | None:
        """The inputs that realise `factors`, zero-padded to the board's width; None when they do
        not fit (a wider factor, another structure)."""
        arrays = dict(factors.arrays)
        if self.own_bias is not None:
            arrays.setdefault("bias", self.own_bias)
        method = self.methods[self.method]
        emitted = emitted_constants(self.layer, method, Factors(arrays, factors.rank, 0.0, {}))
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
            elif not method.zero_paddable:
                return None  # its narrower factors are not the wide ones with zeros cut off
            else:
                padded = np.zeros(shape, dtype)
                padded[tuple(slice(0, d) for d in value.shape)] = value
                feed[name] = padded
        return feed


def _own_bias(choice, methods):
    """The bias a path carries as its own input (fed the original until a refit replaces it):
    None when the method never refits an intercept here, False when the original is not constant."""
    spec = methods[choice.method].refit_spec(choice.layer)
    if spec is None or not spec.intercept:
        return None
    layer = choice.layer
    if layer.has_bias and layer.bias is None:
        return False
    if layer.bias is not None:
        return layer.bias
    return np.zeros(layer.out_channels, layer.weight.dtype)


def _scalar(value: float, dtype) -> np.ndarray:
    return np.array([value], dtype)
