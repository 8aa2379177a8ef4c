"""Budgeted rank search with onnxruntime in the loop.

1. Sensitivity sweep: every candidate layer alone at every candidate (method, rank), measured in
   ORT on the calibration data: the hard metric's drop and a smooth proxy (squared relative L2 of
   the outputs). Ranks are swept from high to low and stop once a layer alone is far over budget.
   Results are cached on disk by (model hash, data hash, metric, factor mode, layer, method, rank).
2. Latency guard / objective: each option is timed against the dense node in ORT at the shape the
   layer really sees; a rewrite the runtime does not run faster is dropped.
3. Allocation (budget.allocate) under a proxy budget τ; τ is searched on a geometric grid and
   refined by bisection against the hard metric of the *whole* compressed model, which must stay
   within the budget minus one standard error of its own measurement. The best model that passes
   is kept; when none does, the one with the smallest drop is returned and the budget is missed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from tnopt import budget as B
from tnopt.data import Dataset
from tnopt.errors import DataError, TnoptError
from tnopt.graph import isolate_layer, output_producer
from tnopt.metrics import METRICS, Metric, paired_standard_error, rel_l2, user_metric
from tnopt.passes import METHODS
from tnopt.rewrite import Choice, apply_plan

MAX_SWEEP_SAMPLES = 512
# A layer's sweep stops at lower ranks once it alone loses this much of the metric: lower ranks only
# lose more. Independent of the budget, so one sweep (and its cache) serves every budget.
SWEEP_STOP_DROP = 0.10
# A rewrite must be at least this much faster than the dense node to pass the latency guard.
LATENCY_MARGIN = 0.97
TIMING_BATCH = 32
# Relative weight error below which a rewrite counts as exact (float32 round-off of a planted rank).
LOSSLESS_ERROR = 1e-6
BISECTION_STEPS = 5
# With several methods per layer (--method auto) only the best few by a math-only pre-screen are swept.
MAX_METHODS_PER_LAYER = 2
SCREEN_FRACTIONS = (0.5, 0.25, 0.125)


def parse_budget(budget) -> tuple[float, str]:
    if isinstance(budget, dict):
        return float(budget["max_drop"]), budget.get("drop_type", "absolute")
    if isinstance(budget, str):
        text = budget.strip()
        return (float(text[:-1]) / 100 if text.endswith("%") else float(text)), "absolute"
    return float(budget), "absolute"


# Ops that end a classifier head: logits or probabilities, where top-1 agreement means something.
CLASSIFIER_HEADS = ("Gemm", "MatMul", "Add", "Softmax", "LogSoftmax", "Sigmoid")


def choose_metric(metric, calib: Dataset, reference_outputs, model=None) -> Metric:
    if callable(metric) and not isinstance(metric, Metric):
        return user_metric(metric)
    if isinstance(metric, Metric):
        return metric
    if metric is None:
        if calib.labels is not None:
            return METRICS["top1"]
        first = reference_outputs[0]
        # An embedding (MiniLM's mean pool ends in Div) is 2-D too; its argmax means nothing.
        head = output_producer(model) if model is not None else "Gemm"
        classifier = first.ndim == 2 and first.shape[1] >= 2 and head in CLASSIFIER_HEADS
        return METRICS["agreement" if classifier else "cosine"]
    if metric not in METRICS:
        raise TnoptError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    chosen = METRICS[metric]
    if chosen.needs_labels and calib.labels is None:
        raise DataError(f"--metric {metric} needs labels: add a 'labels' array to the data file")
    if calib.synthetic and chosen.name == "top1":
        raise DataError("top1 cannot be measured on random inputs; pass --data with labels")
    return chosen


class SensitivityCache:
    """JSON file of measurements for one (model, data, metric, factor mode); survives reruns."""

    def __init__(self, directory: str | None, key: str):
        self.path = Path(directory) / f"{key}.json" if directory else None
        self.entries: dict = {}
        self.hits = self.misses = 0
        if self.path and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a corrupt cache is only a lost speed-up

    def get(self, key: str):
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        self.entries[key] = value

    def save(self) -> None:
        if not self.path:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            tmp.replace(self.path)
        except OSError:
            pass  # read-only cache directory: the run itself is unaffected


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def run_search(
    original,
    layers,
    candidates,
    *,
    calib: Dataset,
    evaluation: Dataset,
    budget,
    metric,
    objective,
    runtime,
    cache_dir,
    seed,
    progress,
    latency_guard,
    report,
    say,
    factorize=None,
    correct=None,
    factor_mode: str = "weight",
):
    """Returns (choices, decisions) and fills report.budget / report.search / report.budget_met."""
    from tnopt.pipeline import factorize as default_factorize

    factorize = factorize or default_factorize
    started = time.perf_counter()
    max_drop, drop_type = parse_budget(budget)
    sweep_data = calib.head(MAX_SWEEP_SAMPLES)
    reference = runtime.run(original, calib.inputs)
    sweep_reference = [r[: len(sweep_data)] for r in reference]
    metric = choose_metric(metric, calib, reference, original)
    baseline = metric(reference, reference, calib.labels)
    sweep_baseline = metric(sweep_reference, sweep_reference, sweep_data.labels)
    model_hash = hashlib.sha256(original.SerializeToString()).hexdigest()[:16]
    cache = SensitivityCache(
        cache_dir, f"{model_hash}-{calib.fingerprint()}-{metric.name}-{factor_mode}-s{seed}"
    )
    report.budget = {
        "max_drop": max_drop,
        "drop_type": drop_type,
        "metric": metric.name,
        "objective": objective,
        "baseline_calibration": baseline,
        "calibration_samples": len(calib),
        "sweep_samples": len(sweep_data),
    }
    lossless_only = max_drop == 0
    factors_memo: dict = {}

    def factors_for(layer, method, rank):
        key = (layer.name, method, rank)
        if key not in factors_memo:
            factors_memo[key] = factorize(layer, method, rank)
        return factors_memo[key]

    def drop_of(value, base):
        return metric.drop(value, base, drop_type)

    # 1. sensitivity sweep --------------------------------------------------------------------------
    screened = {}
    for layer in layers:
        key = f"screen|{layer.name}|{','.join(candidates[layer.name])}"
        # The pre-screen fits every method; a rerun takes its verdict from the cache instead.
        screened[layer.name] = cache.entries.get(key) or screen_methods(
            layer, candidates[layer.name], factors_for
        )
        cache.put(key, screened[layer.name])
    candidates = screened
    plans = {
        layer.name: [(m, r) for m in candidates[layer.name] for r in METHODS[m].candidate_ranks(layer)]
        for layer in layers
    }
    decisions: dict[str, dict] = {layer.name: {"sensitivity": {}} for layer in layers}
    measured: dict[tuple, dict] = {}
    bar = _progress(sum(len(p) for p in plans.values()), "sensitivity", progress)
    for layer in layers:
        for method in candidates[layer.name]:
            # High rank first: once a rank is far over budget, lower ranks of this method are skipped.
            for rank in sorted(
                METHODS[method].candidate_ranks(layer), key=lambda r: -METHODS[method].cost(layer, r).params
            ):
                label = METHODS[method].rank_label(rank)
                key = f"{layer.name}|{method}|{label}"
                entry = cache.get(key)
                if entry is None:
                    factors = factors_for(layer, method, rank)
                    if factors.notes.get("refused"):  # e.g. a degenerate CP fit: never emitted
                        entry = {
                            "drop": float("inf"),
                            "proxy": float("inf"),
                            "weight_error": factors.rel_error,
                            "refused": factors.notes["refused"],
                        }
                        cache.put(key, entry)
                        measured[(layer.name, method, rank)] = entry
                        bar.update(1)
                        continue
                    model, _ = apply_plan(original, [Choice(layer, method, factors)])
                    outputs = runtime.run(model, sweep_data.inputs)
                    value = metric(sweep_reference, outputs, sweep_data.labels)
                    entry = {
                        "drop": drop_of(value, sweep_baseline),
                        "proxy": rel_l2(sweep_reference, outputs) ** 2,
                        "weight_error": factors.rel_error,
                    }
                    cache.put(key, entry)
                measured[(layer.name, method, rank)] = entry
                decisions[layer.name]["sensitivity"][f"{method}:{label}"] = entry["drop"]
                bar.update(1)
                if entry["drop"] > SWEEP_STOP_DROP and not entry.get("refused"):
                    break
    bar.close()
    cache.save()
    sweep_hits = cache.hits
    say(
        f"sensitivity: {len(measured)} measurements, {sweep_hits} from cache"
        + (f" ({cache.path})" if cache.path else "")
    )

    # 2. latency: guard and objective ---------------------------------------------------------------
    latency = {}
    if latency_guard or objective == "latency":
        latency = _measure_latency(
            original, layers, measured, runtime, cache, factors_for, progress, decisions, sweep_data.inputs
        )
        cache.save()

    # 3. options for the allocation (independent of the budget, so a larger budget can only gain) ----
    options: list[B.Option] = []
    by_name = {layer.name: layer for layer in layers}
    for (name, method, rank), entry in measured.items():
        layer = by_name[name]
        if entry["drop"] > SWEEP_STOP_DROP:
            continue  # far too lossy alone to be part of any sensible plan
        if lossless_only and entry["weight_error"] > LOSSLESS_ERROR:
            continue  # a zero budget admits only numerically exact rewrites (rank-deficient weights)
        if latency:
            dense_s, rewritten_s = latency.get((name, None, None)), latency.get((name, method, rank))
            folded = getattr(METHODS[method], "folded_at_load", False)  # runs the dense weight: same speed
            if (
                latency_guard
                and not folded
                and (dense_s is None or rewritten_s is None or rewritten_s > LATENCY_MARGIN * dense_s)
            ):
                continue
        cost = METHODS[method].cost(layer, rank)
        if objective == "params":
            saving = layer.params - cost.params
        elif objective == "latency":
            saving = latency[(name, None, None)] - latency[(name, method, rank)]
        else:
            saving = layer.flops - cost.flops
        options.append(
            B.Option(
                name,
                f"{method}|{METHODS[method].rank_label(rank)}",
                float(saving),
                max(float(entry["proxy"]), 0.0),
            )
        )
    option_choice = {}
    for name, method, rank in measured:
        option_choice[(name, f"{method}|{METHODS[method].rank_label(rank)}")] = (method, rank)

    # 4. τ search against the whole model's hard metric ---------------------------------------------
    evaluated: dict[tuple, dict] = {}

    def evaluate(plan: dict[str, B.Option]) -> dict:
        signature = tuple(sorted((n, o.key) for n, o in plan.items()))
        if signature in evaluated:
            return evaluated[signature]
        choices = []
        for name, option in plan.items():
            method, rank = option_choice[(name, option.key)]
            choices.append(Choice(by_name[name], method, factors_for(by_name[name], method, rank)))
        if correct is not None and choices:
            choices = correct(choices)
        model, _ = apply_plan(original, choices)
        outputs = runtime.run(model, calib.inputs)
        value = metric(reference, outputs, calib.labels)
        margin = paired_standard_error(metric.name, reference, outputs, calib.labels)
        if drop_type == "relative" and baseline:
            margin /= abs(baseline)
        drop = drop_of(value, baseline)
        result = {
            "plan": plan,
            "choices": choices,
            "value": value,
            "drop": drop,
            "margin": margin,
            "saving": B.total_saving(plan),
            "passed": drop + margin <= max_drop,
        }
        evaluated[signature] = result
        return result

    grid = B.tau_grid(options)
    bar = _progress(len(grid) + BISECTION_STEPS, "verify", progress)
    curve = []
    best_pass, last_fail_tau, best_pass_tau = None, None, None
    for tau in grid:
        result = evaluate(B.allocate(options, tau))
        curve.append(_curve_point(tau, result))
        bar.update(1)
        if result["passed"]:
            if best_pass is None or result["saving"] > best_pass["saving"]:
                best_pass, best_pass_tau = result, tau
        elif tau > 0 and last_fail_tau is None and best_pass is not None:
            last_fail_tau = tau
    if best_pass is not None and last_fail_tau is not None and last_fail_tau > best_pass_tau:
        low, high = best_pass_tau, last_fail_tau
        for _ in range(BISECTION_STEPS):
            mid = (low * high) ** 0.5 if low > 0 else high / 4
            result = evaluate(B.allocate(options, mid))
            curve.append(_curve_point(mid, result))
            bar.update(1)
            if result["passed"]:
                low = mid
                if result["saving"] > best_pass["saving"]:
                    best_pass = result
            else:
                high = mid
    bar.close()
    final = best_pass or min(evaluated.values(), key=lambda r: (r["drop"], -r["saving"]))

    # 5. decisions, and the check on held-out data ---------------------------------------------------
    chosen = {c.layer.name: c for c in final["choices"]}
    for layer in layers:
        decision = decisions[layer.name]
        if layer.name in chosen:
            decision["reason"] = "chosen by the budgeted search"
            after = latency.get((layer.name, chosen[layer.name].method, chosen[layer.name].factors.rank))
            if after is not None:
                decision["latency_after_ms"] = after * 1e3
        elif not any(o.layer == layer.name for o in options):
            decision["reason"] = _why_no_option(layer, measured, latency, latency_guard, max_drop)
        else:
            decision["reason"] = "rewriting it did not fit the budget beside more profitable layers"
    eval_model, _ = apply_plan(original, final["choices"])
    eval_reference = runtime.run(original, evaluation.inputs)
    eval_outputs = runtime.run(eval_model, evaluation.inputs)
    eval_baseline = (
        metric(eval_reference, eval_reference, evaluation.labels)
        if metric.name != "top1" or evaluation.labels is not None
        else None
    )
    eval_drop = None
    if eval_baseline is not None:
        eval_value = metric(eval_reference, eval_outputs, evaluation.labels)
        eval_drop = drop_of(eval_value, eval_baseline)
    report.budget.update(
        {
            "drop_calibration": final["drop"],
            "margin_calibration": final["margin"],
            "drop_evaluation": eval_drop,
            "baseline_evaluation": eval_baseline,
        }
    )
    miss = None
    if best_pass is None:
        miss = (
            f"no plan meets a {metric.name} drop ≤ {max_drop:g} on the calibration data "
            f"(smallest drop found {final['drop']:.4f})"
        )
    elif eval_drop is not None and eval_drop > max_drop + 1e-12:
        miss = (
            f"{metric.name} drop on the evaluation data {eval_drop:.4f} exceeds the budget {max_drop:g} "
            f"(calibration drop {final['drop']:.4f} ± {final['margin']:.4f})"
        )
    report.budget_met = miss is None
    dense_total = {
        "params": sum(layer.params for layer in layers),
        "flops": sum(layer.flops for layer in layers),
        "latency": sum(latency.get((layer.name, None, None), 0.0) for layer in layers),
    }[objective]
    report.search = {
        "curve": curve,
        "objective_total": dense_total,
        "sweep_measurements": len(measured),
        "sweep_cache_hits": sweep_hits,
        "cache_file": str(cache.path) if cache.path else None,
        "options": len(options),
        "verifications": len(evaluated),
        "search_s": time.perf_counter() - started,
        "miss_reason": miss or "",
    }
    if miss:
        say(f"budget not met: {miss}")
    return final["choices"], decisions


def screen_methods(layer, methods: list[str], factors_for) -> list[str]:
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
            affordable = [
                r
                for r in METHODS[method].candidate_ranks(layer)
                if METHODS[method].cost(layer, r).params <= target
            ]
            if affordable:
                rank = max(affordable, key=lambda r: METHODS[method].cost(layer, r).params)
                factors = factors_for(layer, method, rank)
                if not factors.notes.get("refused"):
                    errors[method] = factors.rel_error
        if errors:
            wins[min(errors, key=errors.get)] += 1
    ranked = sorted(methods, key=lambda m: (-wins[m], methods.index(m)))
    return ranked[:MAX_METHODS_PER_LAYER]


def _curve_point(tau, result) -> dict:
    return {
        "tau": tau,
        "saving": result["saving"],
        "drop": result["drop"],
        "margin": result["margin"],
        "passed": result["passed"],
        "layers": len(result["plan"]),
    }


def _why_no_option(layer, measured, latency, latency_guard, max_drop) -> str:
    entries = [(k, v) for k, v in measured.items() if k[0] == layer.name]
    if not entries:
        return "no candidate rank is cheaper than the dense layer"
    best = min(v["drop"] for _, v in entries)
    if best > max_drop:
        return f"every rank alone exceeds the budget (smallest drop {best:.4f})"
    if latency_guard and latency:
        return "no rank within budget runs faster than the dense node on this runtime"
    return "no admissible option"


def _measure_latency(
    original, layers, measured, runtime, cache, factors_for, progress, decisions, sample_inputs
) -> dict:
    """Seconds per run of each layer alone, dense and factorized, at the shape it really sees
    (captured from one batch of TIMING_BATCH real samples)."""
    first = {k: v[:TIMING_BATCH] for k, v in sample_inputs.items()}
    shapes = {
        name: value.shape
        for name, value in runtime.capture(
            original, sorted({layer.input_name for layer in layers}), first
        ).items()
    }
    result = {}
    todo = [
        (layer, k)
        for layer in layers
        for k in measured
        if k[0] == layer.name and measured[k]["drop"] <= SWEEP_STOP_DROP
    ]
    bar = _progress(len(todo) + len(layers), "latency", progress)
    for layer in layers:
        shape = shapes[layer.input_name]
        dtype = layer.weight.dtype
        dense = isolate_layer(layer, original, shape, dtype)
        feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(dtype)}
        shape_key = "x".join(map(str, shape))
        key = f"lat|{runtime.provider_name}|{layer.name}|dense|{shape_key}"
        dense_s = cache.get(key) or runtime.latency(dense, feed)
        cache.put(key, dense_s)
        result[(layer.name, None, None)] = dense_s
        decisions[layer.name]["latency_before_ms"] = dense_s * 1e3
        bar.update(1)
        for _, (name, method, rank) in [t for t in todo if t[0] is layer]:
            label = METHODS[method].rank_label(rank)
            key = f"lat|{runtime.provider_name}|{name}|{method}|{label}|{shape_key}"
            seconds = cache.get(key)
            if seconds is None:
                rewritten, _ = apply_plan(dense, [Choice(layer, method, factors_for(layer, method, rank))])
                seconds = runtime.latency(rewritten, feed)
                cache.put(key, seconds)
            result[(name, method, rank)] = seconds
            bar.update(1)
    bar.close()
    return result
