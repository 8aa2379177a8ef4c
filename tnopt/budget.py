"""Turn per-layer measurements into a rank plan under a budget. Pure: no onnx, no runtime.

Each layer offers options (method, rank) with a `saving` of the objective (FLOPs, params or
seconds removed) and a `proxy` loss — the squared relative L2 distance of the model's outputs to
the original's when that layer alone is rewritten, which is smooth and close to additive over
layers. `allocate` solves the multiple-choice knapsack "max Σ saving s.t. Σ proxy ≤ τ" greedily on
each layer's convex hull (the classic Lagrangian relaxation); the search bisects τ against the
hard metric measured on the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    layer: str
    key: object  # what it stands for, e.g. the search's (method, rank); hashable
    saving: float
    proxy: float


def _hull(options: list[Option]) -> list[Option]:
    """Options on the upper-left convex hull of (proxy, saving), starting at 'keep' = (0, 0).

    An option below the hull is never the best use of its proxy, whatever τ is.
    """
    useful = sorted((o for o in options if o.saving > 0), key=lambda o: (o.proxy, -o.saving))
    hull: list[Option] = []
    last_saving = 0.0
    for option in useful:
        if option.saving <= last_saving:
            continue  # costs more proxy for no more saving
        while hull:
            prev_saving = hull[-2].saving if len(hull) > 1 else 0.0
            prev_proxy = hull[-2].proxy if len(hull) > 1 else 0.0
            top = hull[-1]
            # Drop `top` if it lies on or below the segment prev → option (non-convex step).
            if (top.saving - prev_saving) * (option.proxy - prev_proxy) <= (option.saving - prev_saving) * (
                top.proxy - prev_proxy
            ):
                hull.pop()
            else:
                break
        hull.append(option)
        last_saving = option.saving
    return hull


def allocate(options: list[Option], tau: float) -> dict[str, Option]:
    """Choose at most one option per layer, maximising total saving with Σ proxy ≤ tau.

    Two solvers, the better plan wins: the Lagrangian hull walk (+ fill), and an exact dynamic
    programme over the proxy axis cut into BINS steps (each proxy rounded *up*, so its plans are
    always feasible). The DP is exact up to that rounding; the walk covers what rounding loses.
    """
    walk = _hull_walk(options, tau)
    table = _knapsack(options, tau)
    return table if total_saving(table) > total_saving(walk) else walk


BINS = 2000


def _knapsack(options: list[Option], tau: float) -> dict[str, Option]:
    free = [o for o in options if o.proxy <= 0 and o.saving > 0]
    if tau <= 0:
        return _best_free(free)
    layers = sorted({o.layer for o in options})
    best = np.zeros(BINS + 1)  # best[b]: max saving using at most b proxy steps
    picks = []  # per layer: for each b, index of the option taken (-1 = keep dense)
    for layer in layers:
        mine = [o for o in options if o.layer == layer and o.saving > 0]
        weights = [int(np.ceil(o.proxy / tau * BINS - 1e-9)) if o.proxy > 0 else 0 for o in mine]
        new, pick = best.copy(), np.full(BINS + 1, -1)
        for index, (option, weight) in enumerate(zip(mine, weights)):
            if weight > BINS:
                continue
            candidate = np.full(BINS + 1, -np.inf)
            candidate[weight:] = best[: BINS + 1 - weight] + option.saving
            better = candidate > new
            new[better], pick[better] = candidate[better], index
        picks.append((mine, weights, pick))
        best = new
    chosen, b = {}, BINS
    for layer, (mine, weights, pick) in zip(reversed(layers), reversed(picks)):
        index = pick[b]
        if index >= 0:
            chosen[layer] = mine[index]
            b -= weights[index]
    return chosen


def _best_free(free: list[Option]) -> dict[str, Option]:
    chosen: dict[str, Option] = {}
    for option in free:
        if option.saving > chosen.get(option.layer, Option("", "", 0.0, 0.0)).saving:
            chosen[option.layer] = option
    return chosen


def _hull_walk(options: list[Option], tau: float) -> dict[str, Option]:
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
    return _fill(options, chosen, tau - used)


def _fill(options: list[Option], chosen: dict[str, Option], slack: float) -> dict[str, Option]:
    """Spend the proxy budget the hull walk left over on any option (hull or not) that adds saving.

    The hull walk is the Lagrangian solution; near τ it can stop short of a small option that a
    concave stretch of the hull hid (the classic gap of the relaxation). Filling closes most of it.
    """
    while True:
        best, best_gain = None, 0.0
        for option in options:
            current = chosen.get(option.layer)
            gain = option.saving - (current.saving if current else 0.0)
            extra = option.proxy - (current.proxy if current else 0.0)
            if gain > best_gain and extra <= slack + 1e-15:
                best, best_gain = option, gain
        if best is None:
            return chosen
        current = chosen.get(best.layer)
        slack -= best.proxy - (current.proxy if current else 0.0)
        chosen[best.layer] = best


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


# A bare number this large is ambiguous: 1 could mean one point (1%) or the whole scale (100%).
AMBIGUOUS_BARE_BUDGET = 0.1
DROP_TYPES = ("absolute", "relative")


def parse_budget(budget) -> tuple[float, str]:
    """(max_drop, drop_type) from 0.01, '1%', '1pp' (all one point), or {'max_drop': …, 'drop_type': …}.

    '%' and a bare fraction follow the drop type; 'pp' (percentage points) is always absolute. A bare
    number ≥ 0.1 has no obvious unit and is refused, as are negative, non-finite and ≥ 100% budgets
    (every model meets those). Raises TnoptError with one line naming both spellings."""
    from tnopt.errors import TnoptError

    drop_type = "absolute"
    if isinstance(budget, dict):
        unknown = sorted(set(budget) - {"max_drop", "drop_type"})
        if unknown or "max_drop" not in budget:
            raise TnoptError(
                f"budget dict needs 'max_drop' (and optionally 'drop_type'), got keys {sorted(budget)}"
            )
        drop_type = budget.get("drop_type") or "absolute"
        budget = budget["max_drop"]
    if drop_type not in DROP_TYPES:
        raise TnoptError(f"--drop-type {drop_type!r}: choose absolute or relative")
    text = str(budget).strip()
    unit = ""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)) and not hasattr(budget, "item"):
        raise TnoptError(f"--budget {text!r} is not a number: write 1% (one point), 1pp or 0.01")
    number = text.lower()
    for suffix in ("pp", "%"):
        if number.endswith(suffix):
            unit, number = suffix, number[: -len(suffix)].strip()
            break
    try:
        value = float(number)
    except ValueError:
        raise TnoptError(f"--budget {text!r} is not a number: write 1% (one point), 1pp or 0.01") from None
    if not math.isfinite(value):
        raise TnoptError(f"--budget {text!r} is not a finite number: write 1% (one point), 1pp or 0.01")
    if value < 0:
        raise TnoptError(f"--budget {text!r} is negative: a budget is the drop allowed, ≥ 0")
    if not unit and value >= AMBIGUOUS_BARE_BUDGET:
        what = f"{value:g} point{'' if value == 1 else 's'}" if drop_type == "absolute" else f"{value:g}%"
        raise TnoptError(
            f"--budget {text} has no unit: write {value:g}% (or {value:g}pp) for a drop of {what}, "
            f"or {value / 100:g} as a fraction"
        )
    if unit == "pp" and drop_type == "relative":
        raise TnoptError(
            f"--budget {text}: 'pp' is an absolute drop; with --drop-type relative write {number}%"
        )
    max_drop = value / 100 if unit else value
    if max_drop >= 1:
        raise TnoptError(f"--budget {text} allows a drop of 100% or more: every model meets it")
    return max_drop, drop_type
