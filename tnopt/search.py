"""Budgeted rank search with onnxruntime in the loop, as stages with explicit inputs and outputs:

1. screen (tnopt/sweep.py, math only): with several methods per layer, keep the two whose
   factors lose the least weight at equal parameter counts.              → methods per layer
2. sweep (tnopt/sweep.py): every candidate layer alone at every candidate (method, rank), measured
   in ORT on the calibration data: the hard metric's drop and a smooth proxy (squared relative L2
   of the outputs). Ranks go from high to low and stop once a layer alone loses SWEEP_STOP_DROP.
   With `--sensitivity predicted` (tnopt/predict.py) the same entries come from each candidate's
   local output error in closed form (tnopt/local_error.py), mapped to proxy and drop per layer by a
   few whole-model runs on a stratified subsample near the allocation frontier.
   The latency stage (tnopt/latency.py) times what the guard or the objective needs.
                                                                          → measurements
3. allocate (tnopt/verify.py, budget.allocate): options priced by the objective (a cost function
   object, tnopt/objective.py) under a proxy budget τ.                     → options, plans
4. verify (tnopt/verify.py): τ on a geometric grid, refined by bisection against the hard metric of
   the *whole* compressed model (after the refiners, e.g. the sequential correction), which must
   stay within the budget minus one standard error of its own measurement. The best plan that passes
   is kept; when none does, the one with the smallest drop is returned and the budget is reported
   missed. The final plan is then measured on the evaluation split, which the search never saw.
                                                                          → SearchResult

Every measurement is cached on disk (tnopt.cache) by model, data, metric and factor mode. Plans run
through the run's PlanRunner (tnopt/runner.py), which picks board or export. The pipeline fills the
report from the `SearchResult`; nothing here writes into it.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field

from tnopt import budget as B
from tnopt.cache import SensitivityCache
from tnopt.graph import output_producer
from tnopt.memo import FactorsMemo
from tnopt.metric_choice import announce, resolution_warning
from tnopt.metrics import choose_metric
from tnopt.objective import make_objective, needs_latency
from tnopt.plan import Choice, Plan
from tnopt.sweep import MAX_SWEEP_SAMPLES, screen, sweep, widest_paths
from tnopt.verify import (
    check_held_out,
    explain,
    negligible_reason,
    original_plan,
    priced_options,
    search_tau,
    worth_its_loss,
)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


@dataclass
class SearchResult:
    """What the search found and how: the pipeline turns it into the report."""

    plan: Plan
    decisions: dict  # layer → {"sensitivity": {label: drop}, "reason", "latency_*_ms"}
    budget: dict  # the budget, the metric, the drops and margins on calibration and evaluation
    budget_met: bool
    search: dict  # curve, measurement counts, cache use, plan runs, miss reason
    timings: dict = field(default_factory=dict)
    # (plan, original outputs, outputs of the exported plan) on the evaluation split: the held-out
    # check's runs, which the pipeline's validation of the same plan reuses.
    evaluation_outputs: tuple | None = None


# Bytes of the estimates kept as fits (SearchContext.estimates_memo): a layer's ranks in a row.
MAX_ESTIMATE_MEMO_BYTES = 128 * 2**20


@dataclass
class SearchContext:
    """What every stage reads: the runner, the metric and its references, data, cache, factors."""

    runner: object
    layers: list
    metric: object
    calib: object
    sweep_data: object
    reference: list
    sweep_reference: list
    baseline: float
    sweep_baseline: float
    max_drop: float
    drop_type: str
    cache: SensitivityCache
    factorize: object
    progress: bool = False
    factors_memo: dict = field(default_factory=dict)
    # Estimates that are the fit (a truncation method's), least recently read dropped first beyond
    # MAX_ESTIMATE_MEMO_BYTES: the predicted sweep reads every rank of every layer once, and kept
    # as fits they held the whole model's factorizations at every rank (ResNet-50: 0.5 GB and
    # growing). A dropped one is redone from the memoised SVD where read again.
    estimates_memo: FactorsMemo = field(default_factory=lambda: FactorsMemo(lambda: MAX_ESTIMATE_MEMO_BYTES))
    # (layer, method, rank) → the method's cheap estimate (tnopt.passes Method.estimate): same shapes,
    # error near the fit's. None: every read is a fit (the measured sweep fits every rank it runs).
    estimate: object = None
    # How many fits (`factorize` calls) and estimates this search made: the predicted sweep's work.
    fits: int = 0
    estimates: int = 0
    # Layer name → calibration moments (tnopt.profile.LayerStats): what the predicted sweep reads.
    stats: dict = field(default_factory=dict)
    # What the predicted sweep did (subsample size, measured and predicted entries); empty otherwise.
    prediction: dict = field(default_factory=dict)
    # perf_counter() time after which the search stops (--time-limit); None: none.
    deadline: float | None = None
    # The verification's cross-fitted gate (tnopt/refine.py CrossFit); falsy: none.
    cross_fit: object = field(default_factory=list)
    # (plan, original outputs, outputs under the exported plan) on the evaluation split, once measured.
    evaluation_outputs: tuple | None = None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    @property
    def methods(self) -> dict:
        return self.runner.methods

    def factors_for(self, layer, method, rank):
        """The method's fitted factors (memoised): what a measured, verified or saved plan runs."""
        key = (layer.name, method, rank)
        if key not in self.factors_memo:
            fitted = self.estimates_memo.take(key)  # an estimate that is the fit
            if fitted is None:
                fitted = self.factorize(layer, method, rank)
                self.fits += 1
            self.factors_memo[key] = fitted
        return self.factors_memo[key]

    @property
    def estimates_memo_bytes(self) -> int:
        return self.estimates_memo.bytes

    def estimate_for(self, layer, method, rank):
        """Factors to read errors and shapes from: the fit when there is one already, else the
        method's estimate. An estimate that is not the fit (notes["estimate"]) is not kept: it is
        cheap to redo and would hold every rank's arrays; one that is (a truncation method's) is
        memoised as the fit."""
        key = (layer.name, method, rank)
        if self.estimate is None or key in self.factors_memo:
            return self.factors_for(layer, method, rank)
        if key in self.estimates_memo:
            return self.estimates_memo.recent(key)
        factors = self.estimate(layer, method, rank)
        self.estimates += 1
        if not getattr(factors, "notes", {}).get("estimate"):
            self.estimates_memo.put(key, factors)
        return factors

    def drop_of(self, value, baseline) -> float:
        return self.metric.drop(value, baseline, self.drop_type)

    def bar(self, total: int, desc: str):
        return progress_bar(total, desc, self.progress)


class Search:
    def __init__(
        self,
        config,
        runner,
        layers,
        candidates,
        calib,
        evaluation,
        *,
        factorize,
        estimate=None,
        refiners,
        factor_mode,
        say,
        stats=None,
        deadline=None,
        cross_fit=(),
        reference=None,
    ):
        """`config`: the RunConfig; `runner`: the run's PlanRunner; `candidates`: layer → methods
        that accept it; `refiners`: `refine(plan) -> plan` steps applied to every verified plan;
        `deadline`: the perf_counter() time at which the search stops (--time-limit), or None;
        `cross_fit`: the gate's cross-fitted refits (tnopt/refine.py `CrossFit`); `reference`: the
        original model's outputs on `calib` when already computed (tnopt/reference_tap.py)."""
        self.config, self.runner, self.say = config, runner, say
        self.layers, self.candidates = layers, dict(candidates)
        self.evaluation, self.refiners = evaluation, list(refiners)
        original = runner.original
        max_drop, drop_type = B.parse_budget(config.budget)
        sweep_data = calib.head(MAX_SWEEP_SAMPLES)
        if reference is None:
            reference = runner.runtime.run(original, calib.inputs)
        sweep_reference = [r[: len(sweep_data)] for r in reference]
        metric = choose_metric(
            config.metric, calib.labels, calib.synthetic, reference, output_producer(original), model=original
        )
        for line in announce(metric):
            say(line)
        too_coarse = resolution_warning(metric.name, len(calib), max_drop, drop_type)
        if too_coarse:
            if isinstance(getattr(metric, "warnings", None), list):
                metric.warnings.append(too_coarse)  # into the report's metric_warnings
            say(f"warning: {too_coarse}")
        cache_key = ""
        if config.cache_dir:
            # Only a cache file needs the key: hashing the model's and the data's bytes cost ResNet-50
            # ~1 s (100 MB serialized, 308 MB of crops) in a --no-cache run that never read it.
            model_hash = hashlib.sha256(original.SerializeToString()).hexdigest()[:16]
            metric_key = getattr(metric, "cache_key", metric.name)
            cache_key = f"{model_hash}-{calib.fingerprint()}-{metric_key}-{factor_mode}-s{config.seed}"
        cache = SensitivityCache(config.cache_dir, cache_key)
        self.ctx = SearchContext(
            runner=runner,
            layers=layers,
            metric=metric,
            calib=calib,
            sweep_data=sweep_data,
            reference=reference,
            sweep_reference=sweep_reference,
            baseline=metric(reference, reference, calib.labels),
            sweep_baseline=metric(sweep_reference, sweep_reference, sweep_data.labels),
            max_drop=max_drop,
            drop_type=drop_type,
            cache=cache,
            factorize=factorize,
            # Estimates stand in for fits only where the sweep does not run every rank anyway.
            estimate=estimate if config.sensitivity == "predicted" else None,
            progress=config.progress,
            stats=dict(stats or {}),
            deadline=deadline,
            cross_fit=cross_fit or [],
        )

    def refine(self, plan: Plan) -> Plan:
        for refiner in self.refiners:
            plan = refiner(plan)
        return plan

    def run(self) -> SearchResult:
        started = time.perf_counter()
        ctx, config = self.ctx, self.config
        latency_guard = True if config.latency_guard is None else config.latency_guard
        budget = {
            "max_drop": ctx.max_drop,
            "drop_type": ctx.drop_type,
            "metric": ctx.metric.name,
            "metric_reason": ctx.metric.reason,
            "metric_warnings": list(ctx.metric.warnings),
            "objective": config.objective,
            "baseline_calibration": ctx.baseline,
            "calibration_samples": len(ctx.calib),
            "sweep_samples": len(ctx.sweep_data),
        }
        steps = _StepClock(self.runner)
        # --time-limit may run out before the search begins (the statistics pass stops at a batch
        # boundary) or in the screen and the widest-rank fits (at a layer boundary).
        stopped_in = "statistics" if ctx.out_of_time() else None
        candidates = screen(ctx, self.layers, self.candidates)
        widest = widest_paths(ctx, self.layers, candidates)
        if not stopped_in and ctx.out_of_time():
            stopped_in = "screen"
        # Refiners that read intermediate tensors (the correction's hidden activations) get them on the board.
        hidden = [n for r in self.refiners if hasattr(r, "hidden_tensors") for n in r.hidden_tensors(widest)]
        if hasattr(ctx.cross_fit, "hidden_tensors"):  # inputs the gate's fold refits read
            hidden += [n for n in ctx.cross_fit.hidden_tensors(widest) if n not in hidden]
        if not stopped_in:  # a board costs a session and a timing; a stopped search runs no plan on it
            self.runner.prepare(widest, ctx.sweep_data.inputs, hidden)
        decisions = {layer.name: {"sensitivity": {}} for layer in self.layers}
        steps.mark("screen+board")
        if config.sensitivity == "predicted":
            from tnopt.predict import predicted_sweep

            measured, hits = predicted_sweep(ctx, self.layers, candidates, decisions)
        else:
            measured, hits = sweep(ctx, self.layers, candidates, decisions)
        predicted = ctx.prediction.get("predicted", 0)
        prediction = ctx.prediction
        predicted = prediction.get("predicted", 0)
        counted = (
            f"{len(measured)} measurements"
            if not prediction
            else f"{len(measured)} entries ({predicted} predicted from local errors, "
            f"{prediction['measured_on_subsample']} measured on {prediction['subsample']} samples)"
        )
        self.say(
            f"sensitivity: {counted}, {hits} from cache" + (f" ({ctx.cache.path})" if ctx.cache.path else "")
        )
        steps.mark("sensitivity")
        stopped_in = stopped_in or ("sweep" if ctx.out_of_time() else None)
        latency = {}
        if not stopped_in and (latency_guard or needs_latency(config.objective)):
            latency = self.measure_latency(measured, decisions)
            stopped_in = "latency" if ctx.out_of_time() else None
        steps.mark("latency")
        objective = make_objective(config.objective, ctx.methods, latency)
        options = priced_options(ctx, measured, objective, latency if latency_guard else None)
        unguarded = priced_options(ctx, measured, objective, None) if latency_guard else options
        best_pass, evaluated, curve = None, {}, []
        if not stopped_in:
            best_pass, evaluated, curve = search_tau(ctx, options, self.refine, unguarded)
            stopped_in = "verify" if ctx.out_of_time() else None
        negligible = None
        total = objective.dense_total(self.layers)
        if best_pass is not None and not worth_its_loss(best_pass, total):
            negligible = (best_pass, negligible_reason(best_pass, total, config.objective))
            self.say(f"note: {negligible[1]}")
            best_pass = original_plan(ctx, self.refine)
        final = (
            best_pass
            or (
                min(evaluated.values(), key=lambda r: (bool(r["collapsed"]), r["drop"], -r["saving"]))
                if evaluated
                else None
            )
            or UNVERIFIED_EMPTY_PLAN
        )
        if not final.get("refined", True):
            # Verified cross-fitted; what is saved is refitted on all calibration samples.
            refitted = final.get("refitted") or self.refine(final["plan"])
            final = dict(final, plan=refitted, refined=True)
            best_pass = final if best_pass is not None else None
        steps.mark("verify")
        explain(ctx, final, options, measured, latency, latency_guard, decisions, evaluated, negligible)
        held_out, miss = check_held_out(ctx, self.evaluation, final, best_pass)
        steps.mark("held-out")
        time_limit = {"limit_s": config.time_limit, "reached": bool(stopped_in), "stopped_in": stopped_in}
        if stopped_in:
            if best_pass is None or not len(best_pass["plan"]):
                miss = (
                    f"the time limit of {config.time_limit:g} s ran out in the {stopped_in} stage before "
                    "any plan with a rewrite was verified within the budget; saved the original layers"
                )
            self.say(
                f"time limit of {config.time_limit:g} s reached in the {stopped_in} stage: "
                + (
                    f"saved the best plan verified so far ({len(final['plan'])} layers rewritten)"
                    if best_pass is not None and len(best_pass["plan"])
                    else "no plan with a rewrite was verified within the budget"
                )
            )
        budget.update(held_out)
        search = {
            "curve": curve,
            "objective_total": objective.dense_total(self.layers),
            "sweep_measurements": len(measured) - predicted,
            "sensitivity": config.sensitivity,
            "sensitivity_reason": getattr(config, "sensitivity_reason", ""),
            "prediction": dict(ctx.prediction),
            "sweep_cache_hits": hits,
            "cache_file": str(ctx.cache.path) if ctx.cache.path else None,
            "options": len(options),
            "verifications": len(evaluated),
            # How the plans ran: on the one switchboard session, or exported with a session each.
            "plan_runs": dict(self.runner.runs),
            "search_s": time.perf_counter() - started,
            # Wall time and ORT sample-forwards of each step of the search (the bench's pass-equivalents).
            "steps": steps.steps,
            "time_limit": time_limit,
            # What the gate's fitted steps (the refits) were fitted on: never the samples they are scored on.
            "gate": (
                f"cross-fitted: each of {len(ctx.cross_fit)} parts of the {len(ctx.calib)} calibration "
                f"samples scored under a plan fitted on the other parts: {ctx.cross_fit.describe()}"
                if ctx.cross_fit
                else "no fitted refits"
                if not self.refiners
                else "refits fitted on the gate's samples (too few samples to split)"
            ),
            "miss_reason": miss or "",
            "negligible_plan": negligible[1] if negligible else "",
        }
        if miss:
            self.say(f"budget not met: {miss}")
        timings = {}
        if self.runner.timings:
            timings["plan_run_switchboard_s"] = self.runner.timings["switchboard"]
            timings["plan_run_exported_s"] = self.runner.timings["exported"]
            # What decided how plans ran (tnopt/runner.py prepare): the board for every run where
            # it wins below more samples than were prepared, for runs on few samples otherwise.
            timings["plan_run_board_wins_below_samples"] = self.runner.few_samples
            timings["plan_run_prepared_samples"] = self.runner.prepared_samples
        return SearchResult(
            final["plan"], decisions, budget, miss is None, search, timings, ctx.evaluation_outputs
        )

    def measure_latency(self, measured, decisions) -> dict:
        from tnopt.latency import MAX_FLOP_RATIO, measure_latency
        from tnopt.sweep import SWEEP_STOP_DROP

        ctx = self.ctx
        timed = {}
        for (name, method, rank), entry in measured.items():
            if entry["drop"] <= SWEEP_STOP_DROP:
                timed.setdefault(name, []).append((method, rank))
        bar = ctx.bar(len(self.layers) + sum(map(len, timed.values())), "latency")
        latency = measure_latency(
            self.runner,
            self.layers,
            timed,
            ctx.cache,
            ctx.estimate_for,  # timing reads the subgraph's shapes, not its values
            ctx.sweep_data.inputs,
            bar,
            stop=ctx.out_of_time,
            batch=self.config.latency_batch or 1,
            saving=None
            if needs_latency(self.config.objective)
            else make_objective(self.config.objective, ctx.methods).saving,
            # Saving values may cost FLOPs (README: the params objective accepts growth): there the
            # guard only vetoes what runs slower.
            flop_cut=None if self.config.objective == "params" else MAX_FLOP_RATIO,
        )
        bar.close()
        ctx.cache.save()
        for layer in self.layers:
            dense = latency.get((layer.name, None, None))
            decisions[layer.name]["latency_before_ms"] = None if dense is None else dense * 1e3
            decisions[layer.name]["latency_verdicts"] = {}
        for (name, method, rank), verdict in latency.verdicts.items():
            label = f"{method}:{ctx.methods[method].rank_label(rank)}"
            decisions[name]["latency_verdicts"][label] = verdict.describe()
        return latency


class _StepClock:
    def __init__(self, runner):
        self.runtime = getattr(runner, "runtime", None)
        self.steps: dict[str, dict] = {}
        self.last = (time.perf_counter(), self._forwards())

    def _forwards(self) -> int:
        return int(getattr(self.runtime, "sample_forwards", 0) or 0)

    def mark(self, name: str) -> None:
        now, forwards = time.perf_counter(), self._forwards()
        self.steps[name] = {
            "wall_s": round(now - self.last[0], 3),
            "sample_forwards": forwards - self.last[1],
        }
        self.last = (now, forwards)


# What a search returns when the time limit came before any plan was verified: the original model.
UNVERIFIED_EMPTY_PLAN = {
    "allocation": {},
    "plan": Plan(()),
    "value": None,
    "drop": 0.0,
    "margin": 0.0,
    "saving": 0.0,
    "passed": False,
    "collapsed": [],
}

__all__ = ["Choice", "Plan", "Search", "SearchContext", "SearchResult"]
