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
only; never this layer's targets on fold k). The data-aware factors are cross-fitted the same way
(tnopt/fold_stats.py): fold k's plan starts from factors whitened without fold k's input moments,
and its refits from those factors. Measured on VGG
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
        # A view in the refit order: the data set is not copied (runs copy a batch at a time).
        refiners.append(Corrector(runner, layers, calib.inputs.view(index), max_held_bytes, **mode))
    return refiners


def cross_fitted_refiners(
    config,
    runner,
    layers,
    calib,
    *,
    correct: bool,
    folds: int = CROSS_FIT_FOLDS,
    fold_factors=None,
    fold_of_sample=None,
    whitening_note: str = "",
):
    """The gate's `CrossFit` over `calib`; [] when nothing is fitted (no correction and no fold
    factors) or there are too few samples to split. `fold_factors` (tnopt/fold_stats.py
    FoldFactors): each fold's data-aware factors, whitened without it. `fold_of_sample`: each
    calibration sample's fold (default i mod folds, the statistics' folds). `whitening_note`: why
    data-aware factors could not be whitened without each fold (the report says so)."""
    samples = len(calib)
    if samples < 2 or not (correct or fold_factors is not None):
        return []
    folds = min(folds, samples)
    fold_of = np.arange(samples) % folds if fold_of_sample is None else np.asarray(fold_of_sample)
    unwhitened = whitening_note
    if fold_factors is not None and fold_factors.folds != folds:
        # The statistics' folds are not the gate's: nothing to subtract.
        unwhitened = f"the statistics' {fold_factors.folds} folds are not the gate's {folds}"
        fold_factors = None
        if not correct:
            return []
    corrector = None
    if correct:
        refit_samples = refit_indices(samples)
        # The folds in contiguous blocks (each fold's samples run under its own refits), in random
        # order within each.
        refit_samples = refit_samples[np.argsort(fold_of[refit_samples], kind="stable")]
        corrector = Corrector(
            runner,
            layers,
            calib.inputs.view(refit_samples),
            folds=folds,
            fold_of_sample=fold_of[refit_samples],
            **correction_mode(runner, layers, len(refit_samples), folds),
        )
    return CrossFit(corrector, folds, fold_of, fold_factors, "" if fold_factors is not None else unwhitened)


def refit_indices(samples: int) -> np.ndarray:
    """The calibration samples the correction fits on: at most MAX_REFIT_SAMPLES, in a seeded
    random order, so that a capture pass that stops early (rows enough) has seen a spread of the
    data and every fold, not the first class of a sorted file."""
    return np.random.default_rng(0).permutation(samples)[:MAX_REFIT_SAMPLES]


class CrossFit:
    """The cross-fitted gate: `gated(runner, plan, inputs)` → (the model outputs on every sample,
    each under the plan fitted without its fold: factors whitened without it (`fold_factors`) and
    refits fitted without it (`corrector`); the plan refitted on all refit samples)."""

    def __init__(
        self, corrector: Corrector | None, folds: int, fold_of_sample=None, fold_factors=None, unwhitened=""
    ):
        self.corrector, self.folds, self.fold_factors = corrector, folds, fold_factors
        self.fold_of_sample = fold_of_sample
        self.unwhitened = unwhitened  # why data-aware factors ran whitened on every sample, if they did

    def __len__(self) -> int:
        return self.folds

    def hidden_tensors(self, choices) -> list[str]:
        """Tensors a board must expose besides the refits' hidden ones: the inputs the correction's
        shared capture reads to refit fold factors (`Corrector.input_space_tensors`)."""
        if self.corrector is None or self.fold_factors is None:
            return []
        return self.corrector.input_space_tensors(choices)

    def gated(self, runner, plan: Plan, inputs) -> tuple[list[np.ndarray], Plan]:
        bases = None
        if self.fold_factors is not None:
            eligible = None if self.corrector is None else self.corrector.refits_fold_factors
            bases = self.fold_factors.plans(plan, eligible)
        if self.corrector is None:
            return gated_outputs(runner, bases, inputs, self.fold_of_sample), plan
        refitted, by_fold = self.corrector.cross_fitted(plan, bases)
        return gated_outputs(runner, by_fold, inputs, self.fold_of_sample), refitted

    def describe(self) -> str:
        """What the gate's fitted steps were fitted on, for the report."""
        parts = []
        if self.corrector is not None:
            parts.append(
                "refits fitted on the other parts (one correction run for all parts; a part's refits "
                "used the other parts' activations under their upstream refits, which this part "
                "helped fit)"
            )
        if self.fold_factors is not None:
            covered, fallbacks = self.fold_factors.covered, self.fold_factors.fallbacks
            text = f"data-aware factors whitened on the other parts' input moments ({len(covered)} layers"
            if fallbacks:
                text += f"; {len(set(fallbacks) - covered)} on all samples' moments: " + "; ".join(
                    f"{name}: {why}" for name, why in sorted(fallbacks.items()) if name not in covered
                )
            parts.append(text + ")")
        elif self.unwhitened:
            parts.append(
                f"data-aware factors whitened on all samples, the scored ones too ({self.unwhitened})"
            )
        return "; ".join(parts) if parts else "nothing fitted"


def gated_outputs(runner, plans_by_fold: list[Plan], inputs, fold_of_sample=None) -> list[np.ndarray]:
    """The model's outputs on all of `inputs` (sample-major, in order), sample i run under
    `plans_by_fold[fold_of_sample[i]]` (default i mod folds)."""
    folds, samples = len(plans_by_fold), as_feeds(inputs).samples()
    fold_of = np.arange(samples) % folds if fold_of_sample is None else np.asarray(fold_of_sample)
    if folds > 1:
        runner.lift(plans_by_fold[0])  # the folds' plans differ in factor values only
    outputs = None
    for fold, plan in enumerate(plans_by_fold):
        index = np.flatnonzero(fold_of == fold)
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
