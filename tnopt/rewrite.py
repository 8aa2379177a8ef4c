"""Apply a rank plan: for each chosen layer, build its factors' subgraph and splice it in.

The caller's model is copied (graphsurgeon imports a fresh graph), never mutated; the graph is
cleaned and topologically sorted once, after all splices.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from tnopt import graph as G
from tnopt.analyze import Layer
from tnopt.passes import METHODS, Factors


@dataclass(frozen=True)
class Choice:
    """One layer's rewrite: which method, at which rank, with which (already computed) factors."""

    layer: Layer
    method: str
    factors: Factors

    @property
    def rank_label(self) -> str:
        return METHODS[self.method].rank_label(self.factors.rank)


def apply_plan(model: onnx.ModelProto, choices: list[Choice]) -> tuple[onnx.ModelProto, bool]:
    """Returns (new model, modified). An empty plan returns a copy of the model, unmodified."""
    if not choices:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, False
    graph = G.import_graph(model)
    provenance: dict[str, dict[str, str]] = {}
    for choice in choices:
        layer, method = choice.layer, METHODS[choice.method]
        node = G.find_node(graph, layer.name)
        emit = G.Emitter(
            graph,
            node,
            method.name,
            choice.rank_label,
            choice.factors.arrays[next(iter(choice.factors.arrays))].dtype,
            provenance,
            data_index=layer.data_index,
            bias_index=2 if layer.op in ("Conv", "ConvTranspose", "Gemm") else None,
        )
        method.build(emit, layer, choice.factors)
    return G.export_model(graph, model, provenance), True
