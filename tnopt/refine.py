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

The budget's gate never scores a sample under a refit fitted on it (K-fold cross-fitting):
`cross_fitted_refiners` assigns calibration sample i to fold i mod CROSS_FIT_FOLDS and returns a
`CrossFit`; the search's verification (`CrossFit.gated`) runs each fold's samples through the plan
as refitted on the other folds' samples, and gets the plan refitted on all samples (what is saved)
from the same passes. One correction run serves every fold: each capture pass accumulates the
normal equations per fold, and fold k's refit solves with the total minus fold k's part (moment
subtraction, tnopt/correct.py); a wave runs each fold's samples under that fold's own upstream
refits. What that leaves fitted on fold k: fold k's refit of a layer used the other folds' hidden
activations, shaped by their upstream refits, which fold k's samples helped fit (upstream targets
only; never this layer's targets on fold k). Measured on VGG
at 1% (512 samples) with one refit per fold, one 2.94x-FLOPs plan: drop -0.2% in-sample, 0.8% at two
folds (each refit on 256 samples, too few rows for the Gemm refits), 0.0% at four.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tnopt.correct import MAX_HELD_TARGET_BYTES, Corrector, correction_mode
from tnopt.data import as_feeds
from tnopt.plan import Plan

Refiner = Callable[[Plan], Plan]
# The correction's least-squares refit converges long before this many samples.
MAX_REFIT_SAMPLES = 512
# The gate's cross-fitting: each fold's samples are scored under refits fitted on the other folds.
# More folds fit each refit on more samples (closer to the one saved, fitted on all: 3/4 of them
# at 4 folds); a fold costs one more least-squares solve per layer, no ORT pass.
CROSS_FIT_FOLDS = 4


def build_refiners(
    config, runner, layers, calib, *, correct: bool, max_held_bytes: int = MAX_HELD_TARGET_BYTES
) -> list[Refiner]:
    """The run's refiners in the order they apply. `layers`: the layers plans may rewrite;
    `calib`: the calibration Dataset."""
    refiners: list[Refiner] = []
    if correct:
        index = refit_indices(len(calib))
        mode = correction_mode(runner, layers, len(index), 1)
        refiners.append(Corrector(runner, layers, calib.subset(index).inputs, max_held_bytes, **mode))
    return refiners


def cross_fitted_refiners(config, runner, layers, calib, *, correct: bool, folds: int = CROSS_FIT_FOLDS):
    """The gate's `CrossFit` over `calib`; [] when nothing is fitted (no correction) or there are
    too few samples to split."""
    samples = len(calib)
    if not correct or samples < 2:
        return []
    folds = min(folds, samples)
    refit_samples = refit_indices(samples)
    # The folds in contiguous blocks (each fold's samples run under its own refits), in random order
    # within each.
    refit_samples = refit_samples[np.argsort(refit_samples % folds, kind="stable")]
    corrector = Corrector(
        runner,
        layers,
        calib.subset(refit_samples).inputs,
        folds=folds,
        fold_of_sample=refit_samples % folds,
        **correction_mode(runner, layers, len(refit_samples), folds),
    )
    return CrossFit(corrector, folds)


def refit_indices(samples: int) -> np.ndarray:
    """The calibration samples the correction fits on: at most MAX_REFIT_SAMPLES, in a seeded
    random order, so that a capture pass that stops early (rows enough) has seen a spread of the
    data and every fold, not the first class of a sorted file."""
    return np.random.default_rng(0).permutation(samples)[:MAX_REFIT_SAMPLES]


class CrossFit:
    """The cross-fitted gate: `gated(runner, plan, inputs)` → (the model outputs on every sample,
    each under the plan refitted without its fold; the plan refitted on all refit samples)."""

    def __init__(self, corrector: Corrector, folds: int):
        self.corrector, self.folds = corrector, folds

    def __len__(self) -> int:
        return self.folds

    def gated(self, runner, plan: Plan, inputs) -> tuple[list[np.ndarray], Plan]:
        refitted, by_fold = self.corrector.cross_fitted(plan)
        return gated_outputs(runner, by_fold, inputs), refitted


def gated_outputs(runner, plans_by_fold: list[Plan], inputs) -> list[np.ndarray]:
    """The model's outputs on all of `inputs` (sample-major, in order), sample i run under
    `plans_by_fold[i mod folds]`."""
    folds, samples = len(plans_by_fold), as_feeds(inputs).samples()
    if folds > 1:
        runner.lift(plans_by_fold[0])  # the folds' plans differ in factor values only
    outputs = None
    for fold, plan in enumerate(plans_by_fold):
        index = np.arange(fold, samples, folds)
        if not len(index):
            continue
        part = runner.run(plan, as_feeds(inputs).take(index))
        if outputs is None:
            outputs = [np.empty((samples,) + p.shape[1:], p.dtype) for p in part]
        for whole, piece in zip(outputs, part):
            whole[index] = piece
    return outputs


def apply_refiners(refiners: list[Refiner], plan: Plan) -> Plan:
    for refiner in refiners:
        plan = refiner(plan)
    return plan
