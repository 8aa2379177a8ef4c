"""Search stages 3 and 4: price the swept options, allocate under τ, verify plans on the whole model.

    priced_options(ctx, measured, objective, latency) → [budget.Option], key = (method, rank)
    search_tau(ctx, options, refine, grid_options)     → (best passing result | None, every result, curve)
    check_held_out(ctx, evaluation, final, best_pass)  → (drops on the evaluation split, miss reason)

A verified result is {"plan", "value", "drop", "margin", "saving", "passed"}: the whole model under
the allocation's plan after the refiners, measured on all calibration samples. With `ctx.cross_fit`
(tnopt/refine.py) each part of them runs under the plan as whitened and refitted on the other parts
(tnopt/fold_stats.py), so no fitted step is gated on its own samples; the result's plan is then
unrefined ("refined": False) and the search refits the plan it keeps on all samples.
"""

from __future__ import annotations

import numpy as np

from tnopt import budget as B
from tnopt.gain import grows_file
from tnopt.metrics import paired_standard_error
from tnopt.plan import Choice, Plan
from tnopt.sweep import SWEEP_STOP_DROP

# Relative weight error below which a rewrite counts as exact (float32 round-off of a planted rank).
LOSSLESS_ERROR = 1e-6
BISECTION_STEPS = 5
# When one pass over the calibration data costs more than this many FLOPs (the searched layers at
# the data's shapes × samples), the τ points are verified on a stratified subsample of
# VERIFY_SUBSAMPLE samples (with cross-fitted refits on it) and only the best plans that pass there
# on every sample, at most FULL_CHECKS of them. ResNet-50 at 224x224 on 512 samples: 4e12 per pass
# (~50 s on 2 cores); the reference models (3e10–8e10) keep every τ point on all samples.
VERIFY_SUBSAMPLE_ABOVE_FLOPS = 5e11
VERIFY_SUBSAMPLE = 64
FULL_CHECKS = 3


def priced_options(ctx, measured, objective, latency: dict | None) -> list[B.Option]:
    """Everything the allocation may choose; independent of the budget, so a larger budget can
    only gain. `latency`: the guard's timings (None: no guard)."""
    by_name = {layer.name: layer for layer in ctx.layers}
    options = []
    for (name, method, rank), entry in measured.items():
        if entry["drop"] > SWEEP_STOP_DROP:
            continue  # far too lossy alone to be part of any sensible plan
        if ctx.max_drop == 0 and entry["weight_error"] > LOSSLESS_ERROR:
            continue  # a zero budget admits only numerically exact rewrites (rank-deficient weights)
        if latency is not None and not faster(ctx.methods[method], latency, name, method, rank):
            continue
        if grows_file(by_name[name], ctx.methods[method].cost(by_name[name], rank).params):
            continue  # e.g. float factors of an int8 weight: fewer params, a bigger file
        saving = objective.saving(by_name[name], method, rank)
        options.append(B.Option(name, (method, rank), saving, max(float(entry["proxy"]), 0.0)))
    return options


def faster(impl, latency, name, method, rank) -> bool:
    """The latency guard: the verdict of tnopt/latency.py (faster, or undecided by timing with a
    large FLOPs cut)."""
    if getattr(impl, "folded_at_load", False):
        return True  # the runtime folds it back to the dense weight: same speed, smaller file
    verdict = getattr(latency, "verdicts", {}).get((name, method, rank))
    return verdict is not None and verdict.accepted


class _Verifier:
    def __init__(self, ctx, refine):
        self.ctx, self.refine = ctx, refine
        self.by_name = {layer.name: layer for layer in ctx.layers}
        self.evaluated: dict[tuple, dict] = {}
        self.curve: list[dict] = []
        self.best_saving = float("-inf")

    def evaluate(self, allocation: dict[str, B.Option]) -> dict:
        """The whole model under `allocation` (refined), measured on the calibration data."""
        ctx = self.ctx
        signature = tuple(sorted((n, o.key) for n, o in allocation.items()))
        if signature in self.evaluated:
            return self.evaluated[signature]
        plan = Plan(
            tuple(
                Choice(self.by_name[name], o.key[0], ctx.factors_for(self.by_name[name], *o.key))
                for name, o in allocation.items()
            )
        )
        refined, refitted = True, None
        if not len(plan):
            outputs = ctx.reference  # the original model: its outputs are the reference
        elif ctx.cross_fit:
            outputs, refitted = ctx.cross_fit.gated(ctx.runner, plan, ctx.calib.inputs)
            refined = False
        else:
            plan = self.refine(plan)
            outputs = ctx.runner.run(plan, ctx.calib.inputs)
        value = ctx.metric(ctx.reference, outputs, ctx.calib.labels)
        # The empty plan is the original model itself: exact, no uncertainty to charge.
        margin = (
            paired_standard_error(ctx.metric, ctx.reference, outputs, ctx.calib.labels) if allocation else 0.0
        )
        if ctx.drop_type == "relative" and ctx.baseline:
            margin /= abs(ctx.baseline)
        drop = ctx.drop_of(value, ctx.baseline)
        # Whatever the metric, a plan under which an output group or a classifier collapses is rejected.
        collapsed = ctx.metric.guard.check(ctx.reference, outputs)[0] if allocation else []
        result = {
            "allocation": allocation,
            "plan": plan,
            "value": value,
            "drop": drop,
            "margin": margin,
            "saving": B.total_saving(allocation),
            "passed": drop + margin <= ctx.max_drop and not collapsed,
            "collapsed": collapsed,
            "refined": refined,
        }
        if refitted is not None and result["passed"] and result["saving"] > self.best_saving:
            # The plan refitted on all samples, kept for the best passing plan only (it is what the
            # search saves; the others' would only hold memory).
            result["refitted"], self.best_saving = refitted, result["saving"]
            for other in self.evaluated.values():
                other.pop("refitted", None)
        self.evaluated[signature] = result
        return result

    def try_tau(self, options, tau, bar) -> dict:
        result = self.evaluate(B.allocate(options, tau))
        self.curve.append(curve_point(tau, result))
        bar.update(1)
        return result


def curve_point(tau, result: dict) -> dict:
    """One verified plan as the report's search curve shows it."""
    return {
        "tau": tau,
        "saving": result["saving"],
        "drop": result["drop"],
        "margin": result["margin"],
        "passed": result["passed"],
        "layers": len(result["allocation"]),
    }


def search_tau(ctx, options, refine, grid_options=None):
    """τ on the grid, then bisection between the best passing τ and the first failing one above it.
    `grid_options` (default `options`) span the grid: the search passes every option the sweep
    priced, before the latency guard, so that the τ points a run verifies do not move with the
    guard's timings (which follow machine load); the allocation still chooses among `options`.

    Where one pass over the calibration data is expensive (VERIFY_SUBSAMPLE_ABOVE_FLOPS) the τ
    points run on a stratified subsample and only the plans that pass there are verified on every
    sample (`_checked_on_all`)."""
    sub = verification_subsample(ctx)
    if sub is None:
        return _search_tau(ctx, options, refine, grid_options)
    _, on_sub, curve = _search_tau(sub, options, refine, grid_options)
    for point in curve:
        point["samples"] = len(sub.calib)
    return _checked_on_all(ctx, refine, options, on_sub, curve)


def verification_subsample(ctx):
    """A copy of `ctx` on VERIFY_SUBSAMPLE stratified calibration samples (its own cross-fitted
    refits on them), or None where a pass over all of them is cheap."""
    per_pass = sum(max(int(layer.flops), 0) for layer in ctx.layers) * len(ctx.calib)
    if per_pass <= VERIFY_SUBSAMPLE_ABOVE_FLOPS or len(ctx.calib) < 2 * VERIFY_SUBSAMPLE:
        return None
    import dataclasses

    from tnopt.predict import subsample_indices
    from tnopt.refine import cross_fitted_refiners

    index = subsample_indices(ctx.reference, VERIFY_SUBSAMPLE)
    calib = ctx.calib.subset(index, f"{ctx.calib.source}[stratified {len(index)}]")
    reference = [r[index] for r in ctx.reference]
    cross_fit = []
    if ctx.cross_fit:
        # The subsample keeps each sample's fold (its calibration index mod folds): the fold
        # factors' moments were summed by those folds.
        cross_fit = cross_fitted_refiners(
            None,
            ctx.runner,
            ctx.layers,
            calib,
            correct=ctx.cross_fit.corrector is not None,
            folds=ctx.cross_fit.folds,
            fold_factors=ctx.cross_fit.fold_factors,
            fold_of_sample=np.asarray(index) % ctx.cross_fit.folds,
        )
    return dataclasses.replace(
        ctx,
        calib=calib,
        reference=reference,
        baseline=ctx.metric(reference, reference, calib.labels),
        cross_fit=cross_fit,
    )


def _checked_on_all(ctx, refine, options, on_sub: dict, curve: list):
    """The plans that passed on the subsample, most saving first, verified on every calibration
    sample: a binary search down that list for the first that passes, at most FULL_CHECKS runs.
    The subsample's margin (its standard error, √(all/subsample) times the full one) makes a pass
    there a conservative guess of a pass on all."""
    verifier = _Verifier(ctx, refine)
    passing = sorted(
        (r for r in on_sub.values() if r["passed"] and r["allocation"]), key=lambda r: -r["saving"]
    )
    best = None
    low, high, checks = 0, len(passing) - 1, 0
    while low <= high and checks < FULL_CHECKS and not (verifier.evaluated and ctx.out_of_time()):
        index = low if checks == 0 else (low + high) // 2
        result = verifier.evaluate(passing[index]["allocation"])
        checks += 1
        curve.append(dict(curve_point(None, result), samples=len(ctx.calib)))
        if result["passed"]:
            best = result if best is None or result["saving"] > best["saving"] else best
            high = index - 1
        else:
            low = index + 1
    if best is None:
        empty = verifier.evaluate({})  # the original model: always within the budget
        best = empty if empty["passed"] else None
    return best, verifier.evaluated, curve


def _search_tau(ctx, options, refine, grid_options=None):
    verifier = _Verifier(ctx, refine)
    grid = B.tau_grid(options if grid_options is None else grid_options)
    bar = ctx.bar(len(grid) + BISECTION_STEPS, "verify")
    best, best_tau, first_fail_tau = None, None, None
    for tau in grid:
        if verifier.evaluated and ctx.out_of_time():
            break  # --time-limit: keep the best plan verified so far
        result = verifier.try_tau(options, tau, bar)
        if result["passed"]:
            if best is None or result["saving"] > best["saving"]:
                best, best_tau = result, tau
        elif tau > 0 and best is not None:
            # The first failure ends the grid. A larger τ allocates more and lower ranks, so its true
            # drop is no smaller; a pass measured there is the noise of a few flipped samples, and
            # keeping it is the winner's curse (ResNet-style at 1%, 512 samples: τ points measured
            # 0.78% ✗, 1.37% ✗, then 0.39% ✓ at 12 layers, which lost 1.22% on held-out data).
            first_fail_tau = tau
            break
    if best is not None and first_fail_tau is not None and first_fail_tau > best_tau:
        low, high = best_tau, first_fail_tau
        for _ in range(BISECTION_STEPS):
            if ctx.out_of_time():
                break
            mid = (low * high) ** 0.5 if low > 0 else high / 4
            result = verifier.try_tau(options, mid, bar)
            if result["passed"]:
                low = mid
                if result["saving"] > best["saving"]:
                    best = result
            else:
                high = mid
    bar.close()
    return best, verifier.evaluated, verifier.curve


# A plan saving less than this share of the candidate layers' objective is not worth a measured loss:
# PP-OCR rec-tiny's best passing plan saved 3,876 of 363M FLOPs (0.001%) for a 0.47-point CTC drop on
# the calibration data, and lost 1.23 points on held-out lines (budget missed, exit 3) — the budget
# spent on nothing. Such a plan gives way to the original model (exact, zero drop).
MIN_PLAN_SAVING = 0.01


def worth_its_loss(result: dict, total: float) -> bool:
    """Whether a verified plan saves enough (MIN_PLAN_SAVING of `total`) to pay for its drop."""
    return not result["allocation"] or result["drop"] <= 0 or result["saving"] >= MIN_PLAN_SAVING * total


def original_plan(ctx, refine) -> dict:
    """The original model as a verified plan (exact: always within the budget)."""
    return _Verifier(ctx, refine).evaluate({})


def negligible_reason(result: dict, total: float, objective: str) -> str:
    share = 100 * result["saving"] / total if total else 0.0
    return (
        f"the best passing plan saved {share:.3f}% of the layers' {objective} for a {result['drop']:.4f} "
        f"drop (under {100 * MIN_PLAN_SAVING:g}%: not worth any loss); the original is kept"
    )


def explain(
    ctx, final, options, measured, latency, latency_guard, decisions, evaluated=None, negligible=None
) -> None:
    """Each layer's reason: chosen, or why not. `evaluated`: the verified plans (allocation → result);
    `negligible`: the passing plan set aside as not worth its loss, with its reason."""
    chosen = {c.layer.name: c for c in final["plan"]}
    with_options = {o.layer for o in options}
    verified = list((evaluated or {}).values())
    for layer in ctx.layers:
        decision = decisions[layer.name]
        if negligible is not None and layer.name in negligible[0]["allocation"]:
            decision["reason"] = negligible[1]
        elif layer.name in chosen:
            decision["reason"] = "chosen by the budgeted search"
            after = latency.get((layer.name, chosen[layer.name].method, chosen[layer.name].factors.rank))
            if after is not None:
                decision["latency_after_ms"] = after * 1e3
        elif layer.name not in with_options:
            decision["reason"] = _why_no_option(ctx, layer, measured, latency, latency_guard)
        else:
            own = [o for o in options if o.layer == layer.name]
            decision["reason"] = _why_not_chosen(ctx, layer.name, own, verified)


def _why_not_chosen(ctx, name: str, own: list, verified: list[dict]) -> str:
    """Why a layer with options within the budget is not in the saved plan. "Beside more profitable
    layers" is only true where a passing plan rewrote it and a larger one without it won; where every
    plan that rewrote it failed on the whole model (MTCNN R-Net: each layer alone within 1%, the one
    plan with a layer 1.5% cross-fitted, nothing saved) the reason must say so."""
    if own and all(o.saving <= 0 for o in own):
        kinds = ", ".join(
            sorted({f"{o.key[0]}:{ctx.methods[o.key[0]].rank_label(o.key[1])}" for o in own})[:3]
        )
        return f"its options within the budget ({kinds}) save nothing of the objective; kept dense"
    with_it = [r for r in verified if name in r["allocation"]]
    if any(r["passed"] for r in with_it):
        return "rewriting it did not fit the budget beside more profitable layers"
    if with_it:
        best = min(with_it, key=lambda r: (bool(r["collapsed"]), r["drop"] + r["margin"]))
        count = len(best["allocation"])
        why = (
            f"collapsed ({best['collapsed'][0]})"
            if best["collapsed"]
            else f"drop {best['drop']:.4f} ± {best['margin']:.4f} > {ctx.max_drop:g}"
        )
        return (
            f"within the budget alone, but every verified plan that rewrote it failed on the whole model "
            f"(the closest: {count} layer{'s' if count > 1 else ''}, {why})"
        )
    return (
        "within the budget alone, but no verified plan rewrote it (the search stopped at a failing plan "
        "of other layers, or at --time-limit)"
    )


def _why_no_option(ctx, layer, measured, latency, latency_guard) -> str:
    entries = [v for k, v in measured.items() if k[0] == layer.name]
    if not entries and ctx.out_of_time():
        return "not measured: --time-limit ran out before the sweep reached it; kept dense"
    if not entries:
        return "no candidate rank is cheaper than the dense layer"
    best = min(v["drop"] for v in entries)
    if best > ctx.max_drop:
        return f"every rank alone exceeds the budget (smallest drop {best:.4f})"
    if latency_guard and latency:
        return (
            "no rank within budget runs faster than the dense node on this runtime "
            "(timed slower, or undecided without a large FLOPs cut; see latency_verdicts)"
        )
    return "no admissible option"


def check_held_out(ctx, evaluation, final, best_pass) -> tuple[dict, str | None]:
    """The final plan on the evaluation split: (drops for the report, why the budget was missed or None)."""
    metric = ctx.metric
    reference = ctx.runner.runtime.run(ctx.runner.original, evaluation.inputs)
    outputs = ctx.runner.run_exported(final["plan"], evaluation.inputs)
    measurable = metric.name != "top1" or evaluation.labels is not None
    baseline = metric(reference, reference, evaluation.labels) if measurable else None
    drop = ctx.drop_of(metric(reference, outputs, evaluation.labels), baseline) if measurable else None
    collapsed = metric.guard.check(reference, outputs)[0] if len(final["plan"]) else []
    # The pipeline validates the saved model on the same split: it reuses these (one plan, one export).
    ctx.evaluation_outputs = (final["plan"], reference, outputs)
    held_out = {
        "drop_calibration": final["drop"],
        "margin_calibration": final["margin"],
        "drop_evaluation": drop,
        "baseline_evaluation": baseline,
        "collapsed_evaluation": collapsed,
    }
    miss = None
    if best_pass is None:
        miss = (
            f"no plan meets a {metric.name} drop ≤ {ctx.max_drop:g} on the calibration data "
            f"(smallest drop found {final['drop']:.4f})"
        )
    elif drop is not None and drop > ctx.max_drop + 1e-12:
        miss = (
            f"{metric.name} drop on the evaluation data {drop:.4f} exceeds the budget {ctx.max_drop:g} "
            f"(calibration drop {final['drop']:.4f} ± {final['margin']:.4f})"
        )
    elif collapsed:
        miss = f"on the evaluation data the plan collapsed: {'; '.join(collapsed)}"
    return held_out, miss
