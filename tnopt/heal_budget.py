"""The budget knows about healing: plans are judged after they were healed.

A plan searched under budget × looseness (4 first: healing exists to let the search cut deeper than
the budget alone allows) is healed (`tnopt.heal.heal`), then gated on the held-out split; looseness
grows (×4 at most) while healed plans pass, then one step refines between the last pass and the first
failure (down to ×1, the plain budget, when nothing looser passes); each step aims where the last
healed drop says the budget lies, so no trial is spent on a looseness that healing cannot reach.
A plan already within budget before healing is not healed. Also the pipeline's two entry points:
heal a fixed-rank plan, heal inside a budgeted search.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from tnopt.errors import TnoptError
from tnopt.heal import HealConfig, heal
from tnopt.plan import Plan


def clone_config(config: HealConfig, **changes) -> HealConfig:
    values = asdict(config)
    values.update(changes)
    return HealConfig(**values)


# A next looseness less than this factor from one already judged is not worth a trial (a search and a
# healing run): its plan would differ in a layer or two.
MIN_STEP = 1.15


@dataclass
class Trial:
    """One plan of the heal-aware budget: searched under budget × looseness, healed, gated."""

    looseness: float
    saving: float
    drop_before: float  # held-out, before healing
    drop_after: float  # held-out, after healing
    margin: float  # standard error of drop_after
    passed: bool
    heal: dict
    seconds: float
    plan: Plan = field(default_factory=Plan, repr=False)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "plan"}


def budgeted_heal(
    search_at,
    heal_plan,
    gate,
    saving,
    max_drop: float,
    say=lambda m: None,
    start: float = 4.0,
    max_looseness: float = 16.0,
    refine_steps: int = 1,
    floor: float = 1.0,
    time_budget_s: float | None = None,
    clock=time.perf_counter,
):
    """The largest-saving plan that still meets the budget after healing.

    `search_at(f)` → choices searched under the budget × f (a looser proxy budget lets the search
    cut deeper, trusting healing to recover); `heal_plan(choices)` → (choices, HealResult);
    `gate(choices)` → (drop, margin) on held-out calibration data neither the search's correction
    nor healing saw; `saving(choices)` → the objective's saving. Looseness starts at `start` and
    grows (×4 at most, up to `max_looseness`) while healed plans pass, then takes one step between the
    last pass (or `floor`) and the first failure; when nothing passed, `floor` (the plain budget) is
    tried, and when it passed only after healing, one step is taken from it toward the failure.
    Each step goes to the geometric midpoint or, where the last trial's healed drop says that is
    out of reach (drops taken as proportional to the looseness), to the looseness that would just
    pass; a step of less than `MIN_STEP` is not taken (a trial costs a search and a healing run).
    A plan that already passes unhealed is not healed (its saving would not change).
    With `time_budget_s`, no trial starts that would end past it by the slowest trial so far,
    except that one passing plan is always looked for (the floor, when nothing passed).
    Returns (best passing trial or the smallest-drop one, all trials)."""
    trials: list[Trial] = []
    began = clock()

    def time_left() -> bool:
        if time_budget_s is None or not trials:
            return True
        return clock() - began + max(t.seconds for t in trials) <= time_budget_s

    def run(factor: float) -> Trial:
        started = clock()
        plan = search_at(factor)
        drop_before, margin = gate(plan)
        if len(plan) and drop_before + margin > max_drop:
            healed, result = heal_plan(plan)
            drop_after, margin = gate(healed)
        else:  # already within budget unhealed (or empty): healing would not change the saving
            healed, result, drop_after = plan, None, drop_before
        trial = Trial(
            factor,
            saving(healed),
            drop_before,
            drop_after,
            margin,
            drop_after + margin <= max_drop,
            result.to_dict() if result else {},
            clock() - started,
            healed,
        )
        if result is not None:
            drops = f"drop {drop_before:.4f} -> {drop_after:.4f} healed"
        else:  # "0.0000 -> 0.0000 healed" read as a heal of a plan that was never trained
            why = "nothing rewritten" if not len(plan) else "within budget"
            drops = f"drop {drop_before:.4f}, not healed ({why})"
        say(
            f"heal budget: looseness {factor:g}: {drops} (± {margin:.4f}), "
            f"{'pass' if trial.passed else 'fail'}, saving {trial.saving:,.0f}"
        )
        trials.append(trial)
        return trial

    def reachable(trial: Trial) -> float:
        """The looseness at which a plan like `trial`'s would just pass after healing: drops grow
        about in proportion to the proxy budget, and healing removes about the same share of them.
        Unbounded when the trial was not healed (nothing is known about what healing removes)."""
        if not trial.heal:
            return math.inf
        target = max(max_drop - trial.margin, 0.5 * max_drop)
        return trial.looseness * target / max(trial.drop_after, 1e-12)

    low, high, factor = None, None, start
    while True:
        trial = run(factor)
        if not trial.passed:
            high = factor
            break
        low = factor
        # Grow ×4 at most, less where the healed drop says the budget is near.
        grown = min(factor * min(4.0, reachable(trial) / factor), max_looseness)
        if grown < factor * MIN_STEP or not time_left():
            break
        factor = grown
    for _ in range(refine_steps):
        base = low if low is not None else floor
        if high is None or high / base < 1.5 or (low is not None and not time_left()):
            break
        failed = next(t for t in reversed(trials) if t.looseness == high)
        # The geometric midpoint, or nearer the base where the failed trial says healing falls short.
        factor = min(math.sqrt(base * high), reachable(failed))
        if factor < base * MIN_STEP:
            break  # nothing between the base and the failure is likely to pass: skip to the floor
        if run(factor).passed:
            low = factor
        else:
            high = factor
    if low is None and all(t.looseness > floor for t in trials):
        plain = run(floor)
        # Healed and passing with room left: one step toward the failure, as far as that room reaches.
        if plain.passed and plain.heal and high is not None and time_left():
            factor = min(math.sqrt(floor * high), reachable(plain))
            if factor >= floor * MIN_STEP:
                run(factor)
    passing = [t for t in trials if t.passed]
    best = max(passing, key=lambda t: t.saving) if passing else min(trials, key=lambda t: t.drop_after)
    return best, trials


__all__ = ["Trial", "budgeted_heal", "clone_config", "config_from", "heal_fixed_plan", "heal_budgeted_plan"]


# --- the pipeline's entry points ---------------------------------------------------------------------


def config_from(heal, seed: int = 0) -> HealConfig | None:
    """None (no healing), True (default steps), a step count, or a HealConfig."""
    if heal is None or heal is False:
        return None
    if isinstance(heal, HealConfig):
        return heal
    if heal is True:
        return HealConfig(seed=seed)
    steps = int(heal)
    if steps < 1:
        raise TnoptError(f"--heal STEPS must be ≥ 1, got {heal}")
    return HealConfig(steps=steps, seed=seed)


def _gate(runner, data, metric_choice, drop_type: str):
    """A function plan → (metric drop, its standard error) on `data`, and the metric used."""
    from tnopt.graph import output_producer
    from tnopt.metrics import choose_metric, paired_standard_error

    reference = runner.run(Plan(), data.inputs)
    metric = choose_metric(
        metric_choice, data.labels, data.synthetic, reference, output_producer(runner.original)
    )
    measurable = metric.name != "top1" or data.labels is not None
    baseline = metric(reference, reference, data.labels) if measurable else None

    def gate(plan) -> tuple[float | None, float]:
        if not measurable:
            return None, 0.0
        outputs = runner.run(plan, data.inputs)
        value = metric(reference, outputs, data.labels)
        margin = paired_standard_error(metric, reference, outputs, data.labels) if len(plan) else 0.0
        if drop_type == "relative" and baseline:
            margin /= abs(baseline)
        return metric.drop(value, baseline, drop_type), margin

    return gate, metric


def heal_fixed_plan(runner, run_config, plan, train, holdout, report, say):
    """Fixed ranks: heal the plan; the report gets the held-out drop before and after."""
    config = run_config.heal_config
    gate, used = _gate(runner, holdout, run_config.metric, "absolute")
    started = time.perf_counter()
    before, _ = gate(plan)
    healed, result = heal(runner, plan, train, holdout, config, say, metric=used)
    after, margin = gate(healed)
    report.heal = {
        "config": asdict(config),
        "metric": used.name,
        "holdout": holdout.source,
        "plans": [
            {
                "looseness": None,
                "drop_before": before,
                "drop_after": after,
                "margin": margin,
                "seconds": time.perf_counter() - started,
                "heal": result.to_dict(),
            }
        ],
        "seconds": time.perf_counter() - started,
    }
    if before is not None:
        say(f"heal: held-out {used.name} drop {before:.4f} -> {after:.4f} in {result.seconds:.1f} s")
    if result.path == "graph" and result.best_step == 0:
        # Otherwise "drop 0.2152 -> 0.2152" reads as training that changed nothing.
        say(
            f"heal: no checkpoint of the {result.steps} steps beat the unhealed factors on the selection "
            "split; the unhealed factors are kept (more steps, --heal N, may get further)"
        )
    return healed


def heal_budgeted_plan(
    runner, run_config, search_at, train, holdout, evaluation, report, say, deadline: float | None = None
):
    """Budgeted search that judges plans after healing (see `budgeted_heal`): `search_at(budget)`
    runs the search under another budget and returns its SearchResult. Fills report.budget,
    report.search (the chosen plan's search) and report.heal (every plan tried). `deadline`
    (`--time-limit`, a perf_counter time): no trial starts that would end past it, and healing
    stops there with its best checkpoint so far."""
    from tnopt import budget as B

    config = run_config.heal_config
    started = time.perf_counter()
    time_budget_s = config.time_budget_s
    if deadline is not None:
        left = max(deadline - started, 0.0)
        time_budget_s = left if time_budget_s is None else min(time_budget_s, left)
    max_drop, drop_type = B.parse_budget(run_config.budget)
    gate, used = _gate(runner, holdout, run_config.metric, drop_type)
    searched: dict[float, object] = {}
    eval_gate, _ = _gate(runner, evaluation, used.name, drop_type)
    # Each tried plan's drop on the evaluation data before and after healing (reported only: nothing
    # is chosen by it), so the report shows whether the gate's verdict carries over to that data.
    on_evaluation: dict[float, dict] = {}

    def search_plan(factor: float) -> Plan:
        # Spelled as a percentage and capped below 100%: a bare fraction ≥ 0.1 is refused as ambiguous
        # (2% × 16 = 0.32), a drop of 100% or more as one every model meets.
        loose = min(max_drop * factor, 0.99)
        searched[factor] = search_at({"max_drop": f"{loose * 100:.12g}%", "drop_type": drop_type})
        on_evaluation[factor] = {"drop_evaluation_before": eval_gate(searched[factor].plan)[0]}
        return searched[factor].plan

    def heal_plan(plan):
        healed, result = heal(runner, plan, train, holdout, config, say, metric=used, deadline=deadline)
        factor = next(reversed(on_evaluation))
        on_evaluation[factor]["drop_evaluation_after"] = eval_gate(healed)[0]
        return healed, result

    by_params = run_config.objective == "params"

    def saving(plan) -> float:
        total = 0
        for c in plan:
            cost = runner.methods[c.method].cost(c.layer, c.factors.rank)
            total += (c.layer.params - cost.params) if by_params else (c.layer.flops - cost.flops)
        return float(total)

    best, trials = budgeted_heal(
        search_plan, heal_plan, gate, saving, max_drop, say, time_budget_s=time_budget_s
    )
    result = searched[best.looseness]
    report.search = dict(result.search)
    report.timings.update(result.timings)
    eval_drop, _ = eval_gate(best.plan)
    report.budget = dict(result.budget)
    report.budget.update(
        {
            "max_drop": max_drop,
            "proxy_max_drop": max_drop * best.looseness,
            "drop_holdout_healed": best.drop_after,
            "margin_holdout_healed": best.margin,
            "drop_evaluation": eval_drop,
        }
    )
    miss = None
    if not best.passed:
        miss = (
            f"no healed plan meets a {used.name} drop ≤ {max_drop:g} on the held-out calibration data "
            f"(smallest {best.drop_after:.4f} ± {best.margin:.4f})"
        )
    elif eval_drop is not None and eval_drop > max_drop + 1e-12:
        miss = f"{used.name} drop on the evaluation data {eval_drop:.4f} exceeds the budget {max_drop:g}"
    report.search["miss_reason"] = miss or ""
    report.budget_met = miss is None
    if miss:
        say(f"budget not met: {miss}")
    report.heal = {
        "config": asdict(config),
        "metric": used.name,
        "holdout": holdout.source,
        "chosen_looseness": best.looseness,
        "plans": [{**t.to_dict(), **on_evaluation.get(t.looseness, {})} for t in trials],
        "seconds": time.perf_counter() - started,
        "time_budget_s": time_budget_s,
    }
    return best.plan, result.decisions
