"""What the budgeted search maximises: one cost function object per `--objective`.

    saving(layer, method, rank) = cost(dense layer) − cost(rewritten layer)

`flops` and `params` read the methods' cost models (math only); `latency` reads the seconds the
latency stage measured in onnxruntime, so it exists only after that stage ran.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModelObjective:
    """FLOPs or parameters from each method's cost model."""

    name: str  # "flops" | "params"
    methods: dict

    def saving(self, layer, method: str, rank) -> float:
        cost = self.methods[method].cost(layer, rank)
        return float(getattr(layer, self.name) - getattr(cost, self.name))

    def dense_total(self, layers) -> float:
        return sum(getattr(layer, self.name) for layer in layers)


@dataclass(frozen=True)
class LatencyObjective:
    """Seconds removed, from the latency table {(layer, None, None): dense s, (layer, m, r): s}."""

    latency: dict
    name: str = "latency"

    def saving(self, layer, method: str, rank) -> float:
        return float(self.latency[(layer.name, None, None)] - self.latency[(layer.name, method, rank)])

    def dense_total(self, layers) -> float:
        return sum(self.latency.get((layer.name, None, None), 0.0) for layer in layers)


def make_objective(name: str, methods: dict, latency: dict | None = None):
    if name == "latency":
        return LatencyObjective(latency or {})
    return CostModelObjective(name, methods)


def needs_latency(name: str) -> bool:
    return name == "latency"
