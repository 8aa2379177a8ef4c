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

The budget's gate never scores a sample that a refit was fitted on: `cross_fitted_refiners` cuts
the calibration data into CROSS_FIT_FOLDS parts and gives each part refiners fitted on the others,
and the search's verification (`gated_outputs`) runs each part through the plan as refitted without
it (K-fold cross-fitting). The plan the search keeps is then refitted once on all of them
(`build_refiners`), as a cross-validated estimate is followed by a fit on all the data. Measured on
VGG at 1% (512 samples), one 2.94x-FLOPs plan: drop -0.2% in-sample, 0.8% at two folds (each refit
on 256 samples, too few rows for the Gemm refits), 0.0% at four.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tnopt.correct import MAX_HELD_TARGET_BYTES, Corrector
from tnopt.plan import Plan

Refiner = Callable[[Plan], Plan]
# The correction's least-squares refit converges long before this many samples.
MAX_REFIT_SAMPLES = 512
# The gate's cross-fitting: each fold's samples are scored under refits fitted on the other folds.
# More folds fit each refit on more samples (closer to the one saved, fitted on all: 3/4 of them
# at 4 folds), at the price of more refits per verified plan.
CROSS_FIT_FOLDS = 4


def build_refiners(
    config, runner, layers, calib, *, correct: bool, max_held_bytes: int = MAX_HELD_TARGET_BYTES
) -> list[Refiner]:
    """The run's refiners in the order they apply. `layers`: the layers plans may rewrite;
    `calib`: the calibration Dataset."""
    refiners: list[Refiner] = []
    if correct:
        refiners.append(Corrector(runner, layers, calib.head(MAX_REFIT_SAMPLES).inputs, max_held_bytes))
    return refiners


def cross_fitted_refiners(
    config, runner, layers, calib, *, correct: bool, folds: int = CROSS_FIT_FOLDS
) -> list[tuple[slice, list[Refiner]]]:
    """[(gate samples, refiners fitted on all the other samples)] for `folds` contiguous parts of
    `calib`; [] when nothing is fitted (no correction) or there are too few samples to split."""
    samples = len(calib)
    if not correct or samples < 2:
        return []
    folds = min(folds, samples)
    edges = [round(i * samples / folds) for i in range(folds + 1)]
    result = []
    for start, stop in zip(edges, edges[1:]):
        rest = np.r_[0:start, stop:samples]
        result.append(
            (
                slice(start, stop),
                # The folds' targets together may be held no more than one full refit's.
                build_refiners(
                    config,
                    runner,
                    layers,
                    calib.subset(rest),
                    correct=correct,
                    max_held_bytes=MAX_HELD_TARGET_BYTES // folds,
                ),
            )
        )
    return result


def gated_outputs(runner, plan: Plan, inputs, folds) -> list[np.ndarray]:
    """The model's outputs on all of `inputs` (sample-major, in order), each fold's samples run
    under `plan` as refined by that fold's refiners (fitted on the other samples)."""
    parts = []
    for gate, refiners in sorted(folds, key=lambda fold: fold[0].start):
        parts.append(runner.run(apply_refiners(refiners, plan), inputs.take(gate)))
    return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]


def apply_refiners(refiners: list[Refiner], plan: Plan) -> Plan:
    for refiner in refiners:
        plan = refiner(plan)
    return plan
