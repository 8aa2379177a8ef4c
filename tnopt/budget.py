"""Turn per-layer measurements into a rank plan under a budget. Pure: no onnx, no runtime.

Each layer offers options (method, rank) with a `saving` of the objective (FLOPs, params or
seconds removed) and a `proxy` loss — the squared relative L2 distance of the model's outputs to
the original's when that layer alone is rewritten, which is smooth and close to additive over
layers. `allocate` solves the multiple-choice knapsack "max Σ saving s.t. Σ proxy ≤ τ" greedily on
each layer's convex hull (the classic Lagrangian relaxation); the search bisects τ against the
hard metric measured on the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    layer: str
    key: str  # "method:rank" — the choice it stands for
    saving: float
    proxy: float


def _hull(options: list[Option]) -> list[Option]:
    """Options on the upper-left convex hull of (proxy, saving), starting at 'keep' = (0, 0).

    An option below the hull is never the best use of its proxy, whatever τ is.
    """
    useful = sorted((o for o in options if o.saving > 0), key=lambda o: (o.proxy, -o.saving))
    hull: list[Option] = []
    last_saving, last_proxy = 0.0, 0.0
    for option in useful:
        if option.saving <= last_saving:
            continue  # costs more proxy for no more saving
        while hull:
            prev_saving = hull[-2].saving if len(hull) > 1 else 0.0
            prev_proxy = hull[-2].proxy if len(hull) > 1 else 0.0
            top = hull[-1]
            # Drop `top` if it lies on or below the segment prev → option (non-convex step).
            if (top.saving - prev_saving) * (option.proxy - prev_proxy) <= \
                    (option.saving - prev_saving) * (top.proxy - prev_proxy):
                hull.pop()
            else:
                break
        hull.append(option)
        last_saving, last_proxy = option.saving, option.proxy
    return hull


def allocate(options: list[Option], tau: float) -> dict[str, Option]:
    """Choose at most one option per layer, maximising total saving with Σ proxy ≤ tau."""
    steps = []  # (slope, layer, index on that layer's hull)
    hulls: dict[str, list[Option]] = {}
    for layer in sorted({o.layer for o in options}):
        hull = _hull([o for o in options if o.layer == layer])
        hulls[layer] = hull
        prev_saving, prev_proxy = 0.0, 0.0
        for index, option in enumerate(hull):
            d_proxy = option.proxy - prev_proxy
            slope = float("inf") if d_proxy <= 0 else (option.saving - prev_saving) / d_proxy
            steps.append((slope, layer, index))
            prev_saving, prev_proxy = option.saving, option.proxy
    # Convexity makes each layer's slopes decreasing, so taking steps by slope keeps them in order.
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    chosen: dict[str, Option] = {}
    used = 0.0
    for _, layer, index in steps:
        current = chosen.get(layer)
        expected_index = 0 if current is None else hulls[layer].index(current) + 1
        if index != expected_index:
            continue  # an earlier step of this layer did not fit, so later ones cannot follow
        option = hulls[layer][index]
        extra = option.proxy - (current.proxy if current else 0.0)
        if used + extra > tau:
            continue
        chosen[layer] = option
        used += extra
    return chosen


def total_saving(plan: dict[str, Option]) -> float:
    return sum(o.saving for o in plan.values())


def tau_grid(options: list[Option], points: int = 10) -> list[float]:
    """Geometric grid of proxy budgets from the smallest non-zero proxy to the sum of the largest."""
    positives = sorted(o.proxy for o in options if o.proxy > 0)
    if not positives:
        return [0.0]
    per_layer_max: dict[str, float] = {}
    for o in options:
        per_layer_max[o.layer] = max(per_layer_max.get(o.layer, 0.0), o.proxy)
    low, high = positives[0], sum(per_layer_max.values())
    if high <= low:
        return [0.0, high]
    ratio = (high / low) ** (1 / max(points - 1, 1))
    return [0.0] + [low * ratio**i for i in range(points)]
