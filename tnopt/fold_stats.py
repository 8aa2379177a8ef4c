"""Cross-fitted whitening: the gate scores each calibration fold under factors whitened without it.

    C₋ₖ = (Σ_j S_j − S_k) / (n − n_k),   S_j = Σ_{rows x of fold j} x xᵀ,  n_j its rows

Data-aware (whitened) factors are fitted to the calibration inputs' second moments. Scored on the
same samples they flatter the plan: on MiniLM at 1% (96 sentences) a plan whitened on sentences A
lost 0.0040 cosine on A and 0.0118 on unseen B, and the gate passed plans that missed the budget on
held-out data. So the statistics pass keeps each fold's moment sums beside the total
(tnopt/profile.py, within FOLD_MOMENT_MAX_BYTES), and in the gate (tnopt/refine.py `CrossFit`) fold
k's plan runs factors fitted from C₋ₖ — moment subtraction, as the correction's refits do with
their normal equations. The plan the search saves keeps the factors fitted on all samples.

Where a layer has no fold moments (its rows could not be told apart by sample, or the byte cap),
or where the correction's shared capture cannot refit a fold's own first factors (a method without
`Method.input_map`), the gate runs the all-sample factors of that layer in every fold: for it the
whitening is not cross-fitted; `FoldFactors.fallbacks` names such layers for the report.
"""

from __future__ import annotations

import numpy as np

from tnopt.memo import FactorsMemo
from tnopt.moment_sums import shrunk
from tnopt.passes import Factors
from tnopt.plan import Choice, Plan
from tnopt.profile import LayerStats

# Fold factors kept at once (least recently used dropped first), in bytes of their arrays.
MAX_FOLD_FACTOR_BYTES = 256 * 2**20


def held_out(stats: LayerStats | None, fold: int) -> LayerStats | None:
    """The layer's moments over every calibration fold but `fold` (shrunk as the all-sample ones),
    or None where the fold moments are missing."""
    if stats is None or not stats.fold_moments or not 0 <= fold < len(stats.fold_moments):
        return None
    if stats.patch_moment is not None and not stats.fold_patch_moments:
        return None  # a cut-o fit reads the patch moment too: without its folds, no fold fit
    moment, rows = _without(stats.fold_moments, stats.fold_rows, fold)
    if moment is None:
        return None
    patch = None
    if stats.patch_moment is not None and stats.patch_moment is stats.input_moment:
        # A pointwise conv's patch moment is its channel moment (profile.share_pointwise_patches).
        held = LayerStats(rows, shrunk(moment / rows, rows))
        held.patch_moment = held.input_moment
        return held
    if stats.patch_moment is not None:
        patch, patch_rows = _without(stats.fold_patch_moments, stats.fold_patch_rows, fold)
        if patch is None:
            return None
        patch = shrunk(patch / patch_rows, patch_rows)
    return LayerStats(rows, shrunk(moment / rows, rows), patch)


def _without(sums: list, rows: list, fold: int):
    count = int(sum(rows) - rows[fold])
    if count <= 0:
        return None, 0
    total = np.zeros(sums[0].shape, np.float64)
    for k, part in enumerate(sums):
        if k != fold:
            total += part
    return total, count


class FoldFactors:
    """Each fold's factors of a choice, fitted from the moments without that fold (memoised).

    `fit(layer, method, rank, stats) -> Factors | Refusal` is the run's factorization; `stats`
    the all-sample LayerStats by layer name (with their fold sums); `folds` their fold count."""

    def __init__(self, stats: dict, fit, folds: int):
        self.stats, self.fit, self.folds = stats, fit, folds
        self._memo = FactorsMemo(lambda: MAX_FOLD_FACTOR_BYTES)
        self.covered: set[str] = set()  # layers a gated plan ran with cross-fitted whitening
        self.fallbacks: dict[str, str] = {}  # layer → why its all-sample factors ran in every fold

    def available(self, choice: Choice) -> bool:
        """Whether `choice` is data-aware here and its layer has fold moments."""
        stats = self.stats.get(choice.layer.name)
        return stats is not None and bool(stats.fold_moments)

    def plans(self, plan: Plan, eligible=None) -> list[Plan]:
        """[the plan with fold k's factors] per fold; a choice that is not `eligible(choice)`, has
        no fold moments, or whose fold fit fails or comes out in another shape keeps its factors."""
        by_fold: list[list[Choice]] = [[] for _ in range(self.folds)]
        for choice in plan:
            name = choice.layer.name
            why = None
            if self.stats.get(name) is None:  # not data-aware: nothing was whitened to cross-fit
                for k in range(self.folds):
                    by_fold[k].append(choice)
                continue
            if not self.available(choice):
                why = "no per-fold moments (rows not split by sample, or past the byte cap)"
            elif eligible is not None and not eligible(choice):
                why = "its refit in the correction's shared capture cannot change first factors"
            fitted = [None] * self.folds if why else [self._fold_choice(choice, k) for k in range(self.folds)]
            if not why and any(f is None for f in fitted):
                why = "a fold's fit failed or changed shape"
            if why:
                self.fallbacks[name] = why
                fitted = [choice] * self.folds
            else:
                self.covered.add(name)
            for k in range(self.folds):
                by_fold[k].append(fitted[k])
        return [Plan(tuple(choices)) for choices in by_fold]

    def _fold_choice(self, choice: Choice, fold: int) -> Choice | None:
        key = (choice.layer.name, choice.method, _hashable(choice.factors.rank), fold)
        if key in self._memo:
            factors = self._memo.recent(key)
        else:
            stats = held_out(self.stats.get(choice.layer.name), fold)
            factors = (
                None if stats is None else self.fit(choice.layer, choice.method, choice.factors.rank, stats)
            )
            if not _same_shapes(factors, choice.factors):
                factors = None
            self._memo.put(key, factors)
        return None if factors is None else choice.with_factors(factors)


def _same_shapes(factors, like: Factors) -> bool:
    if not isinstance(factors, Factors) or factors.rank != like.rank:
        return False
    if set(factors.arrays) != set(like.arrays):
        return False
    return all(np.shape(factors.arrays[k]) == np.shape(like.arrays[k]) for k in like.arrays)


def _hashable(rank):
    return tuple(rank) if isinstance(rank, (list, tuple)) else rank
