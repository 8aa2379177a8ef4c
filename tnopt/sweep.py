"""Search stages 1 and 2: the method screen (math only) and the sensitivity sweep (ORT).

    screen(ctx, layers, candidates)            → {layer: methods kept for the sweep}
    widest_paths(ctx, layers, candidates)      → one Choice per (layer, method) at its widest rank
    sweep(ctx, layers, candidates, decisions)  → ({(layer, method, rank): measurement}, cache hits)

A measurement is {"drop", "proxy", "weight_error"} (+ "refused": the method's reason) of the model
with that one layer rewritten, on the first MAX_SWEEP_SAMPLES calibration samples.
"""

from __future__ import annotations

from tnopt.metric_choice import smooth_proxy
from tnopt.passes import Refusal
from tnopt.plan import Choice

MAX_SWEEP_SAMPLES = 512
# A layer's sweep stops at lower ranks once it alone loses this much of the metric: lower ranks only
# lose more. Independent of the budget, so one sweep (and its cache) serves every budget.
SWEEP_STOP_DROP = 0.10
# With several methods per layer (--method auto) only the best few by a math-only pre-screen are swept.
MAX_METHODS_PER_LAYER = 2
SCREEN_FRACTIONS = (0.5, 0.25, 0.125)


def screen(ctx, layers, candidates: dict[str, list[str]]) -> dict[str, list[str]]:
    kept = dict(candidates)
    for layer in layers:
        if ctx.out_of_time():
            break  # --time-limit: the rest keep every method; the sweep stops at once after this
        methods = kept[layer.name]
        key = f"screen|{layer.name}|{','.join(methods)}"
        # The screen fits every method; a rerun takes its verdict from the cache instead.
        kept[layer.name] = ctx.cache.entries.get(key) or screen_methods(
            layer, methods, ctx.estimate_for, ctx.methods
        )
        ctx.cache.put(key, kept[layer.name])
    return kept


def widest_paths(ctx, layers, candidates) -> list[Choice]:
    """Each zero-paddable candidate (layer, method) at its widest rank: the runner's board. Each
    is a fit (CP-ALS of every ResNet-50 conv: minutes); once --time-limit has run out the rest are
    left off, and the search builds no board (its sweep stops at once)."""
    widest = []
    for layer in layers:
        if ctx.out_of_time():
            break
        for method in candidates[layer.name]:
            impl = ctx.methods[method]
            ranks = impl.candidate_ranks(layer)
            if not impl.zero_paddable or not ranks:
                continue
            rank = max(ranks, key=lambda r: impl.cost(layer, r).params)
            # The board reads the widest subgraph's shapes; plans feed their own factors.
            factors = ctx.estimate_for(layer, method, rank)
            if not isinstance(factors, Refusal):
                widest.append(Choice(layer, method, factors))
    return widest


def sweep(ctx, layers, candidates, decisions) -> tuple[dict, int]:
    total = sum(
        len(ctx.methods[m].candidate_ranks(layer)) for layer in layers for m in candidates[layer.name]
    )
    bar = ctx.bar(total, "sensitivity")
    measured: dict[tuple, dict] = {}
    for layer in layers:
        for method in candidates[layer.name]:
            impl = ctx.methods[method]
            ranks = sorted(impl.candidate_ranks(layer), key=lambda r: -impl.cost(layer, r).params)
            for rank in ranks:
                if ctx.out_of_time():
                    break  # --time-limit: the search goes no further than what it has measured
                entry = measure_alone(ctx, layer, method, rank)
                measured[(layer.name, method, rank)] = entry
                decisions[layer.name]["sensitivity"][f"{method}:{impl.rank_label(rank)}"] = entry["drop"]
                bar.update(1)
                if entry["drop"] > SWEEP_STOP_DROP and not entry.get("refused"):
                    break  # lower ranks of this method only lose more
    bar.close()
    ctx.cache.save()
    return measured, ctx.cache.hits


def measure_alone(ctx, layer, method, rank) -> dict:
    key = f"{layer.name}|{method}|{ctx.methods[method].rank_label(rank)}"
    entry = ctx.cache.get(key)
    if entry is None:
        factors = ctx.factors_for(layer, method, rank)
        if isinstance(factors, Refusal):  # e.g. a degenerate CP fit: never emitted
            entry = {
                "drop": float("inf"),
                "proxy": float("inf"),
                "weight_error": factors.rel_error,
                "refused": factors.reason,
            }
        else:
            data = ctx.sweep_data
            outputs = ctx.runner.run([Choice(layer, method, factors)], data.inputs)
            value = ctx.metric(ctx.sweep_reference, outputs, data.labels)
            entry = {
                "drop": ctx.drop_of(value, ctx.sweep_baseline),
                "proxy": smooth_proxy(ctx.metric, ctx.sweep_reference, outputs),
                "weight_error": factors.rel_error,
            }
        ctx.cache.put(key, entry)
    return entry


def screen_methods(layer, methods: list[str], factors_for, table) -> list[str]:
    """Keep at most MAX_METHODS_PER_LAYER methods for the ORT sweep: those whose factors have the
    lowest weight error at equal parameter count most often (a cheap, math-only pre-screen; the
    sweep then measures the survivors for real). Each method is probed at the parameter budgets
    of SCREEN_FRACTIONS of the dense layer."""
    if len(methods) <= MAX_METHODS_PER_LAYER:
        return methods
    wins = {m: 0 for m in methods}
    for fraction in SCREEN_FRACTIONS:
        target = fraction * layer.params
        errors = {}
        for method in methods:
            impl = table[method]
            affordable = [r for r in impl.candidate_ranks(layer) if impl.cost(layer, r).params <= target]
            if affordable:
                rank = max(affordable, key=lambda r: impl.cost(layer, r).params)
                factors = factors_for(layer, method, rank)
                if not isinstance(factors, Refusal):
                    errors[method] = factors.rel_error
        if errors:
            wins[min(errors, key=errors.get)] += 1
    ranked = sorted(methods, key=lambda m: (-wins[m], methods.index(m)))
    return ranked[:MAX_METHODS_PER_LAYER]
