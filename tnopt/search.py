"""Budgeted rank search with onnxruntime in the loop.

1. Method screen (math only): with several methods per layer, keep the two whose factors lose the
   least weight at equal parameter counts.
2. Sensitivity sweep: every candidate layer alone at every candidate (method, rank), measured in
   ORT on the calibration data: the hard metric's drop and a smooth proxy (squared relative L2 of
   the outputs). Ranks go from high to low and stop once a layer alone loses SWEEP_STOP_DROP.
3. Latency guard / objective (tnopt.latency): a rewrite the runtime does not run faster is dropped.
4. Allocation (budget.allocate) under a proxy budget τ; τ is searched on a geometric grid and
   refined by bisection against the hard metric of the *whole* compressed model (after the
   sequential correction when on), which must stay within the budget minus one standard error of
   its own measurement. The best plan that passes is kept; when none does, the one with the
   smallest drop is returned and the budget is reported missed.
5. The final plan is measured on the evaluation split, which the search never saw.

Every measurement is cached on disk (tnopt.cache) by model, data, metric and factor mode. Plans
run on one switchboard session (tnopt.switchboard) where the methods allow it and it was timed
faster than a graph export and a session per plan.
"""

from __future__ import annotations

import hashlib
import sys
import time

from tnopt import budget as B
from tnopt.cache import SensitivityCache
from tnopt.graph import output_producer
from tnopt.latency import measure_latency
from tnopt.metrics import choose_metric, paired_standard_error, rel_l2
from tnopt.passes import METHODS
from tnopt.rewrite import Choice, apply_plan
from tnopt.switchboard import Switchboard, board_if_faster

MAX_SWEEP_SAMPLES = 512
# A layer's sweep stops at lower ranks once it alone loses this much of the metric: lower ranks only
# lose more. Independent of the budget, so one sweep (and its cache) serves every budget.
SWEEP_STOP_DROP = 0.10
# A rewrite must be at least this much faster than the dense node to pass the latency guard.
LATENCY_MARGIN = 0.97
# Relative weight error below which a rewrite counts as exact (float32 round-off of a planted rank).
LOSSLESS_ERROR = 1e-6
BISECTION_STEPS = 5
# With several methods per layer (--method auto) only the best few by a math-only pre-screen are swept.
MAX_METHODS_PER_LAYER = 2
SCREEN_FRACTIONS = (0.5, 0.25, 0.125)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def run_search(original, layers, candidates, **options):
    """Returns (choices, decisions) and fills report.budget / report.search / report.budget_met."""
    return Search(original, layers, candidates, **options).run()


class Search:
    def __init__(
        self,
        original,
        layers,
        candidates,
        *,
        calib,
        evaluation,
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
        factorize,
        correct=None,
        factor_mode: str = "weight",
    ):
        self.original, self.layers, self.candidates = original, layers, dict(candidates)
        self.by_name = {layer.name: layer for layer in layers}
        self.calib, self.evaluation, self.runtime = calib, evaluation, runtime
        self.objective, self.progress, self.latency_guard = objective, progress, latency_guard
        self.report, self.say, self.factorize, self.correct = report, say, factorize, correct
        self.max_drop, self.drop_type = B.parse_budget(budget)
        self.sweep_data = calib.head(MAX_SWEEP_SAMPLES)
        self.reference = runtime.run(original, calib.inputs)
        self.sweep_reference = [r[: len(self.sweep_data)] for r in self.reference]
        self.metric = choose_metric(
            metric, calib.labels, calib.synthetic, self.reference, output_producer(original)
        )
        self.baseline = self.metric(self.reference, self.reference, calib.labels)
        self.sweep_baseline = self.metric(self.sweep_reference, self.sweep_reference, self.sweep_data.labels)
        model_hash = hashlib.sha256(original.SerializeToString()).hexdigest()[:16]
        self.cache = SensitivityCache(
            cache_dir, f"{model_hash}-{calib.fingerprint()}-{self.metric.name}-{factor_mode}-s{seed}"
        )
        self.factors_memo: dict = {}
        self.decisions: dict[str, dict] = {layer.name: {"sensitivity": {}} for layer in layers}
        self.measured: dict[tuple, dict] = {}
        self.latency: dict = {}
        self.evaluated: dict[tuple, dict] = {}
        self.curve: list[dict] = []
        self.board: Switchboard | None = None
        self.runs = {"switchboard": 0, "exported": 0}

    # -- helpers ----------------------------------------------------------------------------------
    def factors_for(self, layer, method, rank):
        key = (layer.name, method, rank)
        if key not in self.factors_memo:
            self.factors_memo[key] = self.factorize(layer, method, rank)
        return self.factors_memo[key]

    def drop_of(self, value, baseline) -> float:
        return self.metric.drop(value, baseline, self.drop_type)

    # -- the stages ---------------------------------------------------------------------------------
    def run(self):
        started = time.perf_counter()
        self.report.budget = {
            "max_drop": self.max_drop,
            "drop_type": self.drop_type,
            "metric": self.metric.name,
            "objective": self.objective,
            "baseline_calibration": self.baseline,
            "calibration_samples": len(self.calib),
            "sweep_samples": len(self.sweep_data),
        }
        self.screen()
        self.build_board()
        self.sweep()
        if self.latency_guard or self.objective == "latency":
            self.measure_latency()
        options = self.options()
        best_pass = self.search_tau(options)
        final = best_pass or min(self.evaluated.values(), key=lambda r: (r["drop"], -r["saving"]))
        self.explain(final, options)
        miss = self.check_held_out(final, best_pass)
        dense_total = {
            "params": sum(layer.params for layer in self.layers),
            "flops": sum(layer.flops for layer in self.layers),
            "latency": sum(self.latency.get((layer.name, None, None), 0.0) for layer in self.layers),
        }[self.objective]
        self.report.search = {
            "curve": self.curve,
            "objective_total": dense_total,
            "sweep_measurements": len(self.measured),
            "sweep_cache_hits": self.sweep_hits,
            "cache_file": str(self.cache.path) if self.cache.path else None,
            "options": len(options),
            "verifications": len(self.evaluated),
            # How the plans ran: on the one switchboard session, or exported with a session each.
            "plan_runs": dict(self.runs),
            "search_s": time.perf_counter() - started,
            "miss_reason": miss or "",
        }
        if miss:
            self.say(f"budget not met: {miss}")
        return final["choices"], self.decisions

    def screen(self) -> None:
        for layer in self.layers:
            methods = self.candidates[layer.name]
            key = f"screen|{layer.name}|{','.join(methods)}"
            # The screen fits every method; a rerun takes its verdict from the cache instead.
            self.candidates[layer.name] = self.cache.entries.get(key) or screen_methods(
                layer, methods, self.factors_for
            )
            self.cache.put(key, self.candidates[layer.name])

    def build_board(self) -> None:
        """One session for every plan: each candidate (layer, method) at its widest rank."""
        widest = []
        for layer in self.layers:
            for method in self.candidates[layer.name]:
                ranks = METHODS[method].candidate_ranks(layer)
                if not METHODS[method].zero_paddable or not ranks:
                    continue
                rank = max(ranks, key=lambda r: METHODS[method].cost(layer, r).params)
                factors = self.factors_for(layer, method, rank)
                if not factors.notes.get("refused"):
                    widest.append(Choice(layer, method, factors))
        hidden = self.correct.hidden_tensors(widest) if self.correct is not None else []
        self.board, timings = board_if_faster(
            self.original, widest, self.runtime, self.sweep_data.inputs, hidden
        )
        if timings:
            self.report.timings["plan_run_switchboard_s"] = timings["switchboard"]
            self.report.timings["plan_run_exported_s"] = timings["exported"]
        if self.correct is not None:
            self.correct.board = self.board

    def outputs_under(self, choices: list[Choice], inputs) -> list:
        """The model's outputs with `choices` applied: on the board when it can express them."""
        if self.board is not None:
            outputs = self.board.run(choices, inputs)
            if outputs is not None:
                self.runs["switchboard"] += 1
                return outputs
        self.runs["exported"] += 1
        model, _ = apply_plan(self.original, choices)
        return self.runtime.run(model, inputs)

    def sweep(self) -> None:
        total = sum(
            len(METHODS[m].candidate_ranks(layer))
            for layer in self.layers
            for m in self.candidates[layer.name]
        )
        bar = _progress(total, "sensitivity", self.progress)
        for layer in self.layers:
            for method in self.candidates[layer.name]:
                ranks = sorted(
                    METHODS[method].candidate_ranks(layer),
                    key=lambda r: -METHODS[method].cost(layer, r).params,
                )
                for rank in ranks:
                    entry = self.measure_alone(layer, method, rank)
                    bar.update(1)
                    if entry["drop"] > SWEEP_STOP_DROP and not entry.get("refused"):
                        break  # lower ranks of this method only lose more
        bar.close()
        self.cache.save()
        self.sweep_hits = self.cache.hits
        self.say(
            f"sensitivity: {len(self.measured)} measurements, {self.sweep_hits} from cache"
            + (f" ({self.cache.path})" if self.cache.path else "")
        )

    def measure_alone(self, layer, method, rank) -> dict:
        label = METHODS[method].rank_label(rank)
        key = f"{layer.name}|{method}|{label}"
        entry = self.cache.get(key)
        if entry is None:
            factors = self.factors_for(layer, method, rank)
            if factors.notes.get("refused"):  # e.g. a degenerate CP fit: never emitted
                entry = {
                    "drop": float("inf"),
                    "proxy": float("inf"),
                    "weight_error": factors.rel_error,
                    "refused": factors.notes["refused"],
                }
            else:
                outputs = self.outputs_under([Choice(layer, method, factors)], self.sweep_data.inputs)
                value = self.metric(self.sweep_reference, outputs, self.sweep_data.labels)
                entry = {
                    "drop": self.drop_of(value, self.sweep_baseline),
                    "proxy": rel_l2(self.sweep_reference, outputs) ** 2,
                    "weight_error": factors.rel_error,
                }
            self.cache.put(key, entry)
        self.measured[(layer.name, method, rank)] = entry
        self.decisions[layer.name]["sensitivity"][f"{method}:{label}"] = entry["drop"]
        return entry

    def measure_latency(self) -> None:
        timed = {}
        for (name, method, rank), entry in self.measured.items():
            if entry["drop"] <= SWEEP_STOP_DROP:
                timed.setdefault(name, []).append((method, rank))
        bar = _progress(len(self.layers) + sum(map(len, timed.values())), "latency", self.progress)
        self.latency = measure_latency(
            self.original,
            self.layers,
            timed,
            self.runtime,
            self.cache,
            self.factors_for,
            self.sweep_data.inputs,
            bar,
        )
        bar.close()
        self.cache.save()
        for layer in self.layers:
            self.decisions[layer.name]["latency_before_ms"] = self.latency[(layer.name, None, None)] * 1e3

    def options(self) -> list[B.Option]:
        """Everything the allocation may choose; independent of the budget, so a larger budget can
        only gain."""
        options = []
        self.option_choice = {}
        for (name, method, rank), entry in self.measured.items():
            layer = self.by_name[name]
            if entry["drop"] > SWEEP_STOP_DROP:
                continue  # far too lossy alone to be part of any sensible plan
            if self.max_drop == 0 and entry["weight_error"] > LOSSLESS_ERROR:
                continue  # a zero budget admits only numerically exact rewrites (rank-deficient weights)
            if self.latency_guard and not self.faster(name, method, rank):
                continue
            cost = METHODS[method].cost(layer, rank)
            if self.objective == "params":
                saving = layer.params - cost.params
            elif self.objective == "latency":
                saving = self.latency[(name, None, None)] - self.latency[(name, method, rank)]
            else:
                saving = layer.flops - cost.flops
            key = f"{method}|{METHODS[method].rank_label(rank)}"
            self.option_choice[(name, key)] = (method, rank)
            options.append(B.Option(name, key, float(saving), max(float(entry["proxy"]), 0.0)))
        return options

    def faster(self, name, method, rank) -> bool:
        if getattr(METHODS[method], "folded_at_load", False):
            return True  # the runtime folds it back to the dense weight: same speed, smaller file
        dense, rewritten = self.latency.get((name, None, None)), self.latency.get((name, method, rank))
        return dense is not None and rewritten is not None and rewritten <= LATENCY_MARGIN * dense

    def evaluate(self, plan: dict[str, B.Option]) -> dict:
        """The whole model under `plan` (corrected when on), measured on the calibration data."""
        signature = tuple(sorted((n, o.key) for n, o in plan.items()))
        if signature in self.evaluated:
            return self.evaluated[signature]
        choices = []
        for name, option in plan.items():
            method, rank = self.option_choice[(name, option.key)]
            choices.append(
                Choice(self.by_name[name], method, self.factors_for(self.by_name[name], method, rank))
            )
        if self.correct is not None and choices:
            choices = self.correct(choices)
        outputs = self.outputs_under(choices, self.calib.inputs)
        value = self.metric(self.reference, outputs, self.calib.labels)
        # The empty plan is the original model itself: exact, no uncertainty to charge.
        margin = (
            paired_standard_error(self.metric.name, self.reference, outputs, self.calib.labels)
            if plan
            else 0.0
        )
        if self.drop_type == "relative" and self.baseline:
            margin /= abs(self.baseline)
        drop = self.drop_of(value, self.baseline)
        result = {
            "plan": plan,
            "choices": choices,
            "value": value,
            "drop": drop,
            "margin": margin,
            "saving": B.total_saving(plan),
            "passed": drop + margin <= self.max_drop,
        }
        self.evaluated[signature] = result
        return result

    def search_tau(self, options) -> dict | None:
        grid = B.tau_grid(options)
        bar = _progress(len(grid) + BISECTION_STEPS, "verify", self.progress)
        best, best_tau, first_fail_tau = None, None, None
        for tau in grid:
            result = self.try_tau(options, tau, bar)
            if result["passed"]:
                if best is None or result["saving"] > best["saving"]:
                    best, best_tau = result, tau
            elif tau > 0 and first_fail_tau is None and best is not None:
                first_fail_tau = tau
        if best is not None and first_fail_tau is not None and first_fail_tau > best_tau:
            low, high = best_tau, first_fail_tau
            for _ in range(BISECTION_STEPS):
                mid = (low * high) ** 0.5 if low > 0 else high / 4
                result = self.try_tau(options, mid, bar)
                if result["passed"]:
                    low = mid
                    if result["saving"] > best["saving"]:
                        best = result
                else:
                    high = mid
        bar.close()
        return best

    def try_tau(self, options, tau, bar) -> dict:
        result = self.evaluate(B.allocate(options, tau))
        self.curve.append(
            {
                "tau": tau,
                "saving": result["saving"],
                "drop": result["drop"],
                "margin": result["margin"],
                "passed": result["passed"],
                "layers": len(result["plan"]),
            }
        )
        bar.update(1)
        return result

    def explain(self, final, options) -> None:
        chosen = {c.layer.name: c for c in final["choices"]}
        with_options = {o.layer for o in options}
        for layer in self.layers:
            decision = self.decisions[layer.name]
            if layer.name in chosen:
                decision["reason"] = "chosen by the budgeted search"
                after = self.latency.get(
                    (layer.name, chosen[layer.name].method, chosen[layer.name].factors.rank)
                )
                if after is not None:
                    decision["latency_after_ms"] = after * 1e3
            elif layer.name not in with_options:
                decision["reason"] = self.why_no_option(layer)
            else:
                decision["reason"] = "rewriting it did not fit the budget beside more profitable layers"

    def why_no_option(self, layer) -> str:
        entries = [v for k, v in self.measured.items() if k[0] == layer.name]
        if not entries:
            return "no candidate rank is cheaper than the dense layer"
        best = min(v["drop"] for v in entries)
        if best > self.max_drop:
            return f"every rank alone exceeds the budget (smallest drop {best:.4f})"
        if self.latency_guard and self.latency:
            return "no rank within budget runs faster than the dense node on this runtime"
        return "no admissible option"

    def check_held_out(self, final, best_pass) -> str | None:
        """The final plan on the evaluation split; returns why the budget was missed, or None."""
        metric, evaluation = self.metric, self.evaluation
        model, _ = apply_plan(self.original, final["choices"])
        reference = self.runtime.run(self.original, evaluation.inputs)
        outputs = self.runtime.run(model, evaluation.inputs)
        measurable = metric.name != "top1" or evaluation.labels is not None
        baseline = metric(reference, reference, evaluation.labels) if measurable else None
        drop = self.drop_of(metric(reference, outputs, evaluation.labels), baseline) if measurable else None
        self.report.budget.update(
            {
                "drop_calibration": final["drop"],
                "margin_calibration": final["margin"],
                "drop_evaluation": drop,
                "baseline_evaluation": baseline,
            }
        )
        miss = None
        if best_pass is None:
            miss = (
                f"no plan meets a {metric.name} drop ≤ {self.max_drop:g} on the calibration data "
                f"(smallest drop found {final['drop']:.4f})"
            )
        elif drop is not None and drop > self.max_drop + 1e-12:
            miss = (
                f"{metric.name} drop on the evaluation data {drop:.4f} exceeds the budget {self.max_drop:g} "
                f"(calibration drop {final['drop']:.4f} ± {final['margin']:.4f})"
            )
        self.report.budget_met = miss is None
        return miss


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
