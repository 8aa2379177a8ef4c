"""The normal equations of one layer's least-squares refit (tnopt/correct.py), accumulated batch by
batch and per cross-fitting fold:

    M, b = argmin ‖T − H·M − 1·bᵀ‖   ⇐   (HᵀH) [M; bᵀ] = HᵀT   (H with a column of ones for b),

H: the layer's hidden activations in the compressed model, T: the original layer's outputs. Fold k's
refit solves with every fold's sums but k's (total − fold k), so one capture pass serves every fold.
Math only: the Corrector decides what is captured and when.
"""

from __future__ import annotations

import numpy as np

# Rows (output positions) per sample a refit keeps: far above correct.MIN_ROWS_PER_UNKNOWN for any channel
# count once samples number in the tens, and all of them at the reference models' 28x28.
MAX_REFIT_ROWS_PER_SAMPLE = 1024
# Rows decide a least-squares fit, not samples: a capture pass stops early once every layer it
# refits has this many rows per unknown in each cross-fitted fold's refit (a 224x224 conv gives
# 1024 rows per sample, so a few dozen samples fit it as well as 512), from at least
# MIN_REFIT_SAMPLES samples (rows of one image are correlated: samples, not rows, carry its variety).
ENOUGH_ROWS_PER_UNKNOWN = 64
MIN_REFIT_SAMPLES = 128


def _rows(values: np.ndarray, channel_axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


class NormalEquations:
    """HᵀH and HᵀT of one layer's refit, accumulated batch by batch, per cross-fitting fold (the
    fold of each sample given by the caller; one fold without cross-fitting). A conv layer gives a
    row per output position: beyond MAX_REFIT_ROWS_PER_SAMPLE per sample a seeded random subset of
    them is kept, so a refit at high resolution costs what it costs at low.

    Fold k's refit solves with the moments of every fold but k (total − fold k): one capture pass
    serves every fold (moment subtraction), and its rows are exactly those of the other folds."""

    def __init__(self, spec, folds: int = 1):
        self.spec, self.folds = spec, folds
        self.fold_gram: list = [None] * folds
        self.fold_cross: list = [None] * folds
        self.fold_rows = [0] * folds
        self.fold_samples = [0] * folds
        self.samples = 0
        # False once a batch's rows could not be told apart by sample (no fold per row).
        self.splittable = True
        self.rng = np.random.default_rng(0)

    @property
    def gram(self):
        return _total(self.fold_gram)

    @property
    def cross(self):
        return _total(self.fold_cross)

    @property
    def rows(self) -> int:
        return sum(self.fold_rows)

    def _kept_rows(self, rows: np.ndarray, target: np.ndarray, samples: int):
        """(rows, target, the kept rows' indices, rows per sample or None where the rows are not
        sample-major): at most MAX_REFIT_ROWS_PER_SAMPLE rows per sample of this batch, a seeded
        random subset beyond that."""
        self.samples += samples
        per_sample = len(rows) // samples if len(rows) % samples == 0 else None
        keep = MAX_REFIT_ROWS_PER_SAMPLE * samples
        chosen = np.arange(len(rows))
        if len(rows) > keep:
            chosen = np.sort(self.rng.choice(len(rows), size=keep, replace=False))
            rows, target = rows[chosen], target[chosen]
        return rows, target, chosen, per_sample

    def add(self, hidden: np.ndarray, target: np.ndarray, fold_of_sample=None) -> None:
        h, t = _rows(hidden, self.spec.channel_axis), _rows(target, self.spec.channel_axis)
        h, t, chosen, per_sample = self._kept_rows(h, t, max(int(np.shape(hidden)[0]), 1))
        if self.spec.intercept:
            h = np.concatenate([h, np.ones((len(h), 1))], axis=1)
        if fold_of_sample is not None:
            for fold, count in zip(*np.unique(np.asarray(fold_of_sample), return_counts=True)):
                self.fold_samples[int(fold)] += int(count)
        if self.folds == 1 or fold_of_sample is None:
            self._accumulate(0, h, t)
            if self.folds > 1:
                self.splittable = False
            return
        if per_sample is None:
            self.splittable = False  # rows not sample-major: no fold can be told from the others
            self._accumulate(0, h, t)
            return
        fold_of_row = np.asarray(fold_of_sample)[chosen // per_sample]
        for fold in range(self.folds):
            mask = fold_of_row == fold
            if mask.any():
                self._accumulate(fold, h[mask], t[mask])

    def _accumulate(self, fold: int, h: np.ndarray, t: np.ndarray) -> None:
        gram, cross = h.T @ h, h.T @ t
        self.fold_gram[fold] = gram if self.fold_gram[fold] is None else self.fold_gram[fold] + gram
        self.fold_cross[fold] = cross if self.fold_cross[fold] is None else self.fold_cross[fold] + cross
        self.fold_rows[fold] += len(h)

    def without(self, fold: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(HᵀH, HᵀT, rows) of every fold but `fold`; None where the folds could not be split."""
        if not self.splittable:
            return None
        gram, cross = self.gram, self.cross
        if self.fold_gram[fold] is not None:
            gram, cross = gram - self.fold_gram[fold], cross - self.fold_cross[fold]
        return gram, cross, self.rows - self.fold_rows[fold]

    def enough(self, fold: int | None = None) -> bool:
        """Whether more samples would barely change the refit: ENOUGH_ROWS_PER_UNKNOWN rows per
        unknown from at least MIN_REFIT_SAMPLES samples in every refit. `fold`: whether that fold
        has its share of them (each fold's refit keeps the other folds' rows)."""
        if self.gram is None:
            return False
        unknowns = len(self.gram)
        if fold is not None and self.folds > 1:
            share = self.folds - 1
            return (
                self.fold_samples[fold] * share >= MIN_REFIT_SAMPLES
                and self.fold_rows[fold] * share >= ENOUGH_ROWS_PER_UNKNOWN * unknowns
            )
        return self.samples >= MIN_REFIT_SAMPLES and self.rows >= ENOUGH_ROWS_PER_UNKNOWN * unknowns


def _total(parts):
    present = [p for p in parts if p is not None]
    if not present:
        return None
    total = present[0].copy()
    for part in present[1:]:
        total += part
    return total


class InputSpaceEquations(NormalEquations):
    """The normal equations of a refit whose hidden tensor is a plain map of the layer's input,
    H = x·A (`Method.input_map`), where the folds' plans carry different first factors A_k (each
    whitened without its fold, tnopt/fold_stats.py). One shared capture pass still serves every
    fold: it captures x, and each refit rebuilds its own H from it — the plan refitted on all samples
    H = x·A on every row, fold k's refit H = x·A_k on the other folds' rows. Rows not told apart by
    sample leave the folds unrefitted (`without` → None), as in `NormalEquations`."""

    def __init__(self, spec, folds: int, map_all: np.ndarray, maps_by_fold: list[np.ndarray]):
        super().__init__(spec, folds)
        self.maps = [np.asarray(map_all, np.float64)] + [np.asarray(m, np.float64) for m in maps_by_fold]
        # parts[0]: every row under A; parts[1 + k]: the rows of every fold but k under A_k.
        self.parts = [NormalEquations(spec, 1) for _ in self.maps]

    @property
    def gram(self):
        return self.parts[0].gram

    @property
    def cross(self):
        return self.parts[0].cross

    @property
    def rows(self) -> int:
        return self.parts[0].rows

    def add(self, inputs: np.ndarray, target: np.ndarray, fold_of_sample=None) -> None:
        x, t = _rows(inputs, -1), _rows(target, self.spec.channel_axis)
        x, t, chosen, per_sample = self._kept_rows(x, t, max(int(np.shape(inputs)[0]), 1))
        fold_of_row = None
        if fold_of_sample is not None and per_sample is not None:
            fold_of_row = np.asarray(fold_of_sample)[chosen // per_sample]
            for fold, count in zip(*np.unique(np.asarray(fold_of_sample), return_counts=True)):
                self.fold_samples[int(fold)] += int(count)
                self.fold_rows[int(fold)] += int(np.sum(fold_of_row == fold))
        else:
            self.splittable = False
        for index, a in enumerate(self.maps):
            if index > 0 and fold_of_row is None:
                continue
            rows = slice(None) if index == 0 else fold_of_row != index - 1
            h = x[rows] @ a
            if self.spec.intercept:
                h = np.concatenate([h, np.ones((len(h), 1))], axis=1)
            self.parts[index]._accumulate(0, h, t[rows])

    def without(self, fold: int):
        if not self.splittable:
            return None
        part = self.parts[1 + fold]
        return part.gram, part.cross, part.rows
