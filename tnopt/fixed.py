"""Fixed rank rules: one method per layer (the first selected that accepts it, or the caller's), at
a rank from `ranks` (given per layer), `energy` (kept singular-value energy) or `rank_ratio`
(fraction of full rank; 0.5 when no rule is given). No runtime: the plan is pure arithmetic and fits.
"""

from __future__ import annotations

from tnopt.errors import TnoptError
from tnopt.gain import no_gain_reason
from tnopt.passes import Refusal
from tnopt.plan import Choice, Plan


def fixed_rank_plan(layers, candidates, config, table, factor_fn) -> tuple[Plan, dict]:
    """(plan, decisions: layer → {"reason"} for every layer left dense)."""
    config.check_rank_rule()
    rank_ratio, energy, ranks = config.rank_ratio, config.energy, config.ranks
    if rank_ratio is None and energy is None and ranks is None:
        rank_ratio = 0.5
    choices, decisions = [], {}
    for layer in layers:
        method_name = candidates[layer.name][0]
        if ranks is not None:
            if layer.name not in ranks:
                decisions[layer.name] = {"reason": "no rank given for this layer"}
                continue
            rank = ranks[layer.name]
            if isinstance(rank, tuple) and rank and isinstance(rank[0], str):
                method_name, rank = rank  # (method, rank): this layer's method chosen by the caller
                if method_name not in candidates[layer.name]:
                    raise TnoptError(f"{layer.name}: method {method_name} does not accept this layer")
        method = table[method_name]
        if energy is not None:
            rank = method.rank_from_energy(layer, energy)
        elif rank_ratio is not None:
            rank = method.rank_from_ratio(layer, rank_ratio)
        cost = method.cost(layer, rank)
        label = method.rank_label(rank)
        no_gain = (
            None if config.allow_growth else no_gain_reason(layer, method, label, cost, config.objective)
        )
        if no_gain:
            decisions[layer.name] = {"reason": no_gain}
            continue
        factors = factor_fn(layer, method_name, rank)
        if isinstance(factors, Refusal):
            decisions[layer.name] = {"reason": f"{method_name}: {factors.reason}"}
            continue
        choices.append(Choice(layer, method_name, factors))
    return Plan(tuple(choices)), decisions
