"""Refiners: steps that improve a plan's factor values after the ranks are chosen.

    refine(plan: Plan) -> Plan

A refiner gets a `tnopt.plan.Plan` (choices with their layer, method, rank and factors) and returns
a plan of the same layers, methods and ranks with new factor values (`choice.with_factors(...)`); it
must not change the structure, and must return the plan unchanged where it cannot help. The search
applies the refiners, in order, to every plan it verifies (so a refiner is charged in the budget),
and a fixed-rank run applies them once to its plan.

A refiner runs the model through the run's `PlanRunner` (tnopt/runner.py), never through its own
sessions: `runner.capture(plan, tensor_names, inputs)` yields one batch of intermediate tensors at a
time; `runner.lift(plan)` once, then plans of that structure with new factor values run without a
re-export. A refiner that reads intermediate tensors may declare them with
`hidden_tensors(widest_choices) -> [tensor names]`, so the runner's switchboard exposes them.

`build_refiners` makes the run's list from the configuration; today: the sequential least-squares
correction (tnopt/correct.py), on when `config.correct` (default: with real data). A new refiner
(e.g. healing by distillation) is one more entry there.
"""

from __future__ import annotations

from typing import Callable

from tnopt.correct import Corrector
from tnopt.plan import Plan

Refiner = Callable[[Plan], Plan]
# The correction's least-squares refit converges long before this many samples.
MAX_REFIT_SAMPLES = 512


def build_refiners(config, runner, layers, calib, *, correct: bool) -> list[Refiner]:
    """The run's refiners in the order they apply. `layers`: the layers plans may rewrite;
    `calib`: the calibration Dataset."""
    refiners: list[Refiner] = []
    if correct:
        refiners.append(Corrector(runner, layers, calib.head(MAX_REFIT_SAMPLES).inputs))
    return refiners


def apply_refiners(refiners: list[Refiner], plan: Plan) -> Plan:
    for refiner in refiners:
        plan = refiner(plan)
    return plan
