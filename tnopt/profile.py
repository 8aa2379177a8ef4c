"""Calibration statistics: each candidate layer's input second moments, accumulated batch by batch.

For y = x·W (Gemm/MatMul) the output error of any Ŵ on the calibration rows X is
‖X(W − Ŵ)‖² = tr((W − Ŵ)ᵀ C (W − Ŵ)) with C = XᵀX: the second moment C is all a data-aware
factorization needs. Conv layers get the channel moment (over every pixel: the input mode of
Tucker-2 / CP / the {I | O·k} cut) and, for 2-D convs, the patch (im2col) moment that makes the
{O | I·k·k} cut exact. Memory is one batch of activations plus the moments themselves.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import blas as _blas

from tnopt.analyze import Layer
from tnopt.data import as_feeds
from tnopt.reference_tap import tap_names, tap_sink
from tnopt.threads import math_threads

# Calibration moments converge long before this many samples.
MAX_STATS_SAMPLES = 2048
# Methods whose data-aware form needs the im2col (patch) moment of a Conv input.
PATCH_METHODS = ("cut-o",)

# The patch moment stops accumulating past this many im2col rows: (I·k·k)² entries converge long
# before, and each batch of 28x28 feature maps adds ~50k rows.
MAX_PATCH_ROWS = 200_000
# At most this many im2col rows (positions) are taken from one batch, drawn at random (seeded) from
# its positions: a 736x736 page has 540k positions per sample, and unfolding them all would cost
# I·k·k times the activation itself. Spread over batches, the moment sees more samples, too.
MAX_PATCH_ROWS_PER_BATCH = 50_000
# ... and no more than this many bytes of them (a 3x3 conv on 256 channels has 2304 features).
MAX_PATCH_BYTES_PER_BATCH = 32 * 2**20
# Rows go through float64 in chunks of at most this many rows and bytes, so a big activation (or a
# wide patch matrix) is never copied whole.
ROW_CHUNK = 65_536
ROW_CHUNK_BYTES = 16 * 2**20

# Economy: where the channel moments' products over the whole pass (Σ over distinct layer inputs of
# rows × features²) are projected above this many FLOPs, each batch gives only a random sample of
# its rows (positions), products are taken in float32 (float64 sums across batches, as for the patch
# moment), and patch moments stop at a few rows per feature. ResNet-50 at 224², 512 crops: 1.9e12 →
# the exact pass spent ~9 minutes in these products alone; the reference models (VGG 2e9, ResNet-
# style 5e9 at 512 samples) and MiniLM stay exact.
EXACT_STATS_MAX_FLOPS = 1e11
# In economy a layer's channel moment keeps at least this many rows per feature over the pass (all
# rows where it has fewer): its entries' sampling error ~ 1/√256 of their scale, far inside the
# damping that whitening adds. Rows are drawn per batch in proportion, so every sample contributes.
ECONOMY_ROWS_PER_FEATURE = 256
# ... and a patch moment this many rows per feature (a 3x3 conv on 512 channels: 4608 features, 18k
# rows: 4e11 FLOPs, where MAX_PATCH_ROWS cost 4e12).
ECONOMY_PATCH_ROWS_PER_FEATURE = 4
# Patch moments are stored in this dtype: their sums are float32 products (the rounding of the
# division and shrinkage to float32 is ~1e-7 of each entry, far below the sums' own), the users widen
# them to float64 where they compute, and float64 copies held for the whole search were ResNet-50's
# largest single item (0.9 GB).
PATCH_MOMENT_DTYPE = np.float32
# The cross-fitted gate's per-fold moment sums (float32, folds × features² per layer, and the patch
# moment's when collected) are kept for the layers in graph order while they fit in this many bytes;
# a layer past it keeps only its all-sample moments, and the gate runs its all-sample (whitened)
# factors in every fold: for it the whitening is not cross-fitted (the report counts such layers).
# MiniLM: ~300 MB at 4 folds; ResNet-50's channel moments ~0.8 GB (the later, wider layers fall back).
FOLD_MOMENT_MAX_BYTES = 512 * 2**20


@dataclass
class LayerStats:
    rows: int  # how many input rows (pixels, tokens, samples) the moments average over
    input_moment: np.ndarray  # (K, K) or (I, I): E[x xᵀ] over rows
    # Conv 2-D: (I·kh·kw)² moment of the im2col rows (PATCH_MOMENT_DTYPE; a pointwise conv's is its
    # input_moment itself, see share_pointwise_patches)
    patch_moment: np.ndarray | None = None
    # The cross-fitted gate's folds (tnopt/fold_stats.py): per fold (calibration sample i in fold
    # i mod folds) the *sums* of x xᵀ over its rows (float32) and its row counts; None where the
    # folds could not be told apart or did not fit the byte cap.
    fold_moments: list | None = None
    fold_rows: list | None = None
    fold_patch_moments: list | None = None
    fold_patch_rows: list | None = None

    def fingerprint(self) -> str:
        return f"{self.rows}-{float(np.trace(self.input_moment)):.6e}"


class _Accumulator:
    def __init__(self, layer: Layer, want_patches: bool):
        self.layer = layer
        self.want_patches = (
            want_patches
            and layer.op == "Conv"
            and len(layer.weight_shape) == 4
            and layer.group == 1
            and layer.attr("auto_pad", "NOTSET") in ("NOTSET", "")
        )
        # A pointwise conv's patches are its channel rows: its patch moment *is* the channel moment
        # (and its folds' sums the channel folds'), so it is not collected twice but shared (result).
        self.patches_are_channels = self.want_patches and _pointwise(layer)
        self.want_patches = self.want_patches and not self.patches_are_channels
        self.rng = np.random.default_rng(0)
        # Economy (set by collect_stats): the fraction of each batch's rows the channel moment takes
        # (None: all, in float64) and the patch moment's row cap.
        self.keep: float | None = None
        self.max_patch_rows = MAX_PATCH_ROWS
        self.patch_rows_per_batch = MAX_PATCH_ROWS_PER_BATCH
        # Per-fold sums for the cross-fitted gate (set by collect_stats: the fold count, or None).
        self.folds: int | None = None
        # The sums themselves (_Gram): the channel moment's may be another layer's reading the same
        # tensor the same way (`owned` False: forked before it would diverge).
        self.channel: _Gram | None = None
        self.owned = True
        self.patches: _Gram | None = None

    @property
    def rows(self) -> int:
        return self.channel.count if self.channel is not None else 0

    @property
    def patch_rows(self) -> int:
        return self.patches.count if self.patches is not None else 0

    def add(self, activations: np.ndarray, shared: dict | None = None, sample_folds=None) -> None:
        """Accumulate one batch. `shared`: the channel sums that already hold this batch, by (input,
        row layout, folds), so layers reading the same tensor the same way (a block's first conv and
        its shortcut) share one product and one set of sums. `sample_folds`: each sample's
        cross-fitting fold (kept per fold when the accumulator has `folds`)."""
        folds = self.folds if sample_folds is not None else None
        if folds and not _batch_first(self.layer, activations, len(sample_folds)):
            folds = None  # rows cannot be told apart by sample: this layer keeps no fold moments
        key = (self.layer.input_name, _row_layout(self.layer), folds)
        owner = shared.get(key) if shared is not None else None
        if owner is not None and (owner is self.channel or self.channel is None):
            self.channel, self.owned = owner, owner is self.channel and self.owned
        else:
            if self.keep is None:
                rows = _rows(self.layer, activations)
                samples = (
                    _row_samples(self.layer, activations, len(rows), len(sample_folds)) if folds else None
                )
                dtype = np.float64
            else:
                n = len(sample_folds) if folds else 0
                rows, samples = _sampled_rows(self.layer, activations, self.keep, self.rng, n)
                dtype = np.float32
            if self.channel is None:
                self.channel = _Gram(self.folds, dtype)
            elif not self.owned:
                self.channel, self.owned = self.channel.copy(), True  # diverges from the layer it shared
            self.channel.add(rows, samples if folds else None, sample_folds)
            if shared is not None:
                shared[key] = self.channel
        if self.want_patches and self.patch_rows < self.max_patch_rows:
            features = activations.shape[1] * int(np.prod(self.layer.attr("kernel_shape")))
            limit = min(MAX_PATCH_ROWS_PER_BATCH, max(1, MAX_PATCH_BYTES_PER_BATCH // (4 * features)))
            if self.keep is not None:  # economy: its cap spread over the batches
                limit = min(limit, self.patch_rows_per_batch, self.max_patch_rows - self.patch_rows)
            patches, samples = _patches(self.layer, activations, limit, self.rng, with_samples=True)
            # float32 products: the moment only feeds a damped whitening.
            if self.patches is None:
                self.patches = _Gram(self.folds, np.float32)
            self.patches.add(patches, samples if folds else None, sample_folds)
            if self.patches.fold_sums is None:
                self.folds = None  # a cut-o factor of a fold needs both moments without the fold
        if self.folds and (folds is None or self.channel.fold_sums is None):
            self.folds = None  # rows not told apart by sample once: no fold moments for this layer

    def result(self) -> LayerStats:
        """The layer's moments. The accumulator is spent: its sums are dropped as each moment is
        made (and the moments divided in place), so the pass's end holds one layer's sums and
        moments at once beside the finished layers' moments, not every layer's (ResNet-50: the
        patch moments alone are 0.9 GB in float64)."""
        fold_moments = fold_patches = None
        if self.folds and self.channel.fold_sums is not None:
            fold_moments = self.channel.folds_result()
            if self.patches is not None and self.patches.fold_sums is not None:
                fold_patches = self.patches.folds_result()
        patch = None
        if self.patches is not None:
            patch_rows, patch = self.patch_rows, self.patches.total()
            self.patches = None
            patch /= max(patch_rows, 1)
            # Kept in float32 (PATCH_MOMENT_DTYPE): its sums are float32 products already, and it is
            # the largest thing the search holds (ResNet-50: 0.9 GB of patch moments in float64).
            patch = shrunk(patch, patch_rows).astype(PATCH_MOMENT_DTYPE)
        rows, moment = self.rows, self.channel.total()
        self.channel = None  # (another layer reading the same tensor keeps the shared sums)
        moment /= max(rows, 1)
        stats = LayerStats(rows, shrunk(moment, rows), patch)
        if fold_moments is not None:
            stats.fold_moments, stats.fold_rows = fold_moments
            if fold_patches is not None:
                stats.fold_patch_moments, stats.fold_patch_rows = fold_patches
        if self.patches_are_channels:
            share_pointwise_patches(stats)
        return stats


def _pointwise(layer: Layer) -> bool:
    """A 1x1 conv with unit strides and no padding: each im2col row is one input pixel's channels."""
    kernel = tuple(layer.attr("kernel_shape") or ())
    return (
        bool(kernel)
        and all(k == 1 for k in kernel)
        and all(s == 1 for s in layer.attr("strides") or ())
        and not any(layer.attr("pads") or ())
    )


def share_pointwise_patches(stats: LayerStats) -> LayerStats:
    """A pointwise conv's patch moment and fold sums as the very arrays of its channel moment and
    folds (one copy in memory: ResNet-50's 1x1 convs held ~0.2 GB of patch moments that repeated
    their channel moments from fewer rows)."""
    stats.patch_moment = stats.input_moment
    stats.fold_patch_moments, stats.fold_patch_rows = stats.fold_moments, stats.fold_rows
    return stats


class _Gram:
    """Σ x xᵀ over the rows added batch by batch, accumulated in place by BLAS syrk (the upper
    triangle; no d×d temporary per batch). Per batch the old sums made a zeroed float64 gram per fold,
    their sum, a float32 copy of each and a new total: for ResNet-50's 4608-feature patch moment at 5
    crops a batch, ~1.2 s per batch for that layer alone, against 0.2 s in place.

    Sums are kept in the products' dtype: float32 for the economy's channel moments and for patch
    moments (as the folds' sums always were: they only feed a damped whitening), float64 for exact
    statistics. While every batch splits by sample into `folds`, only the folds' float32 sums are
    kept where the products are float32, and the total is their sum in float64 — the same products,
    split: C = Σ_k S_k; with float64 products the float64 total is kept beside them. A batch that
    cannot be split drops the folds (the total continues from their sum so far)."""

    def __init__(self, folds: int | None, dtype):
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.sum: np.ndarray | None = None  # total in `dtype`, upper triangle (None: the folds carry it)
        self.fold_sums: list | None = [None] * folds if folds and folds > 1 else None
        self.fold_rows: list | None = [0] * folds if self.fold_sums is not None else None

    def copy(self) -> "_Gram":
        twin = _Gram(None, self.dtype)
        twin.count = self.count
        twin.sum = None if self.sum is None else self.sum.copy(order="F")
        if self.fold_sums is not None:
            twin.fold_sums = [None if s is None else s.copy(order="F") for s in self.fold_sums]
            twin.fold_rows = list(self.fold_rows)
        return twin

    def add(self, rows: np.ndarray, samples, sample_folds) -> None:
        """`rows` (n, d); `samples`: each row's sample in the batch (None: not known, the folds are
        dropped); `sample_folds`: each sample's fold."""
        if not len(rows):
            return
        if self.fold_sums is not None and samples is None:
            self.sum = self._folded_total()
            self.fold_sums = self.fold_rows = None
        if self.fold_sums is None or self.dtype == np.float64:
            self.sum = _syrk_into(self.sum, rows, self.dtype)
        if self.fold_sums is not None:
            row_folds = np.asarray(sample_folds)[samples]
            for fold in range(len(self.fold_sums)):
                index = np.flatnonzero(row_folds == fold)
                if len(index):
                    self.fold_sums[fold] = _syrk_into(self.fold_sums[fold], rows, np.float32, index)
                    self.fold_rows[fold] += len(index)
        self.count += len(rows)

    def _fold_sum(self) -> np.ndarray | None:
        """Σ_k S_k in float64 (upper triangle), None before any row."""
        present = [part for part in self.fold_sums if part is not None]
        if not present:
            return None
        total = np.zeros(present[0].shape, order="F")
        for part in present:
            total += part
        return total

    def _folded_total(self) -> np.ndarray | None:
        if self.sum is not None:
            return self.sum
        folded = self._fold_sum()
        return None if folded is None else folded.astype(self.dtype, order="F")

    def total(self) -> np.ndarray:
        """The full symmetric Σ x xᵀ in float64 (the folds' sum while they carry it)."""
        return _symmetric(self.sum.astype(np.float64) if self.sum is not None else self._fold_sum())

    def folds_result(self) -> tuple[list, list]:
        """(per-fold full symmetric float32 sums, per-fold rows); a fold without rows gives zeros."""
        shape = next(s.shape for s in self.fold_sums if s is not None)
        sums = [np.zeros(shape, np.float32) if s is None else _symmetric(s) for s in self.fold_sums]
        return sums, list(self.fold_rows)


def _syrk_into(total: np.ndarray | None, rows: np.ndarray, dtype, index: np.ndarray | None = None):
    """total (upper triangle, Fortran order, `dtype`; allocated when None) += rows[index]ᵀ rows[index],
    ROW_CHUNK rows (at most ROW_CHUNK_BYTES) converted to `dtype` at a time, in place."""
    dtype = np.dtype(dtype)
    features = rows.shape[1]
    step = max(1, min(ROW_CHUNK, ROW_CHUNK_BYTES // max(features * dtype.itemsize, 1)))
    if total is None:
        total = np.zeros((features, features), dtype, order="F")
    syrk = _blas.dsyrk if dtype == np.float64 else _blas.ssyrk
    count = len(rows) if index is None else len(index)
    for start in range(0, count, step):
        part = slice(start, start + step)
        chunk = np.asarray(rows[part] if index is None else rows[index[part]], dtype=dtype)
        # C := A Aᵀ + C with A = chunkᵀ (features × rows, a Fortran-order view): the upper triangle.
        total = syrk(1.0, chunk.T, beta=1.0, c=total, trans=0, lower=0, overwrite_c=1)
        del chunk  # before the next chunk is made: one chunk alive at a time
    return total


def _symmetric(upper: np.ndarray) -> np.ndarray:
    """The symmetric matrix of an upper triangle whose strict lower triangle is zero (as syrk leaves
    a zero-initialised sum): U + Uᵀ with the diagonal counted once."""
    full = upper + upper.T
    np.fill_diagonal(full, np.diagonal(upper))
    return full


def _batch_first(layer: Layer, x: np.ndarray, batch_samples: int) -> bool:
    """Whether the layer's input has the batch's samples on the axis its rows start from."""
    shape = np.shape(x)
    if layer.op == "Gemm" and layer.attr("transA"):
        return len(shape) == 2 and shape[1] == batch_samples
    return len(shape) >= 2 and shape[0] == batch_samples


def _row_samples(layer: Layer, x: np.ndarray, count: int, batch_samples: int) -> np.ndarray | None:
    """The sample of each of `_rows(layer, x)`'s rows, where the layout tells (batch on axis 0, rows
    sample-major); None otherwise (e.g. a recurrent state with its batch on axis 1)."""
    x = np.asarray(x)
    if layer.op == "Gemm" and layer.attr("transA"):
        return np.arange(count) if x.ndim == 2 and x.shape[1] == batch_samples else None
    if x.ndim < 2 or x.shape[0] != batch_samples or count % max(batch_samples, 1):
        return None
    return np.repeat(np.arange(batch_samples), count // batch_samples)


def shrunk(moment: np.ndarray, rows: int) -> np.ndarray:
    """The moment shrunk toward isotropic when it has fewer rows than features.

    From n < d rows the moment has rank ≤ n: whitening by it would fit W to the n-dimensional
    span of the calibration inputs and ignore every direction that unseen inputs use (measured: a
    1000x1280 classifier calibrated on 70 images kept 100% agreement on them and lost 10.6 points
    on other crops). Adding (d/n − 1)·mean(diag)·I gives the unseen directions the weight an
    average seen one has, so the fit degrades toward weight-only instead of overfitting."""
    dim = len(moment)
    if rows >= dim or rows == 0:
        return moment
    scale = float(np.mean(np.diag(moment))) or 1.0
    out = moment.copy()  # + c·I on the diagonal only: no dim x dim identity (170 MB for 4608²)
    out.flat[:: dim + 1] += (dim / rows - 1.0) * scale
    return out


def _row_layout(layer: Layer) -> tuple:
    """What `_rows` depends on besides the tensor: layers equal here read equal rows from it."""
    if layer.op in ("Conv", "ConvTranspose"):
        return ("channels",)
    return (layer.op, bool(layer.op == "Gemm" and layer.attr("transA")))


def _sampled_rows(layer: Layer, x: np.ndarray, keep: float, rng, batch_samples: int = 0):
    """(A random `keep` fraction of `_rows(layer, x)` (at least one row), copying only those rows;
    each row's sample, or None without `batch_samples` or where the layout does not tell)."""
    x = np.asarray(x)
    if layer.op in ("Conv", "ConvTranspose"):
        flat = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions): a view
        total = flat.shape[0] * flat.shape[2]
        count = min(total, max(1, int(round(keep * total))))
        picked = np.sort(rng.choice(total, size=count, replace=False))
        sample, position = np.divmod(picked, flat.shape[2])
        return flat[sample, :, position], sample  # (count, C)
    rows = _rows(layer, x)
    count = min(len(rows), max(1, int(round(keep * len(rows)))))
    picked = np.sort(rng.choice(len(rows), size=count, replace=False))
    samples = _row_samples(layer, x, len(rows), batch_samples) if batch_samples else None
    return rows[picked], None if samples is None else samples[picked]


def _rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input as a (rows, features) matrix in its own dtype, features = the contracted
    axis (a view where the layout allows; _syrk_into widens it a chunk at a time)."""
    x = np.asarray(x)
    if layer.op in ("Conv", "ConvTranspose"):
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if layer.op == "Gemm":
        return x.T if layer.attr("transA") else x.reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])  # MatMul, weight on the right


def _patches(layer: Layer, x: np.ndarray, limit: int | None = None, rng=None, with_samples: bool = False):
    """im2col rows (positions, I·kh·kw) in the (I, kh, kw) order of a reshaped Conv weight: numpy
    strided windows (a view; only the final rows are copied), no deep-learning framework needed.
    With `limit`, at most that many positions, drawn at random from the batch's (sample, y, x).
    `with_samples`: (rows, each row's sample)."""
    pads = layer.attr("pads")
    (kh, kw), (dh, dw), (sh, sw) = layer.attr("kernel_shape"), layer.attr("dilations"), layer.attr("strides")
    padded = np.pad(np.asarray(x, dtype=np.float32), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    # (N, I, H', W', span_h, span_w) → strides on the positions, dilation inside each window.
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]
    n, channels, out_h, out_w = windows.shape[:4]
    positions = n * out_h * out_w
    if limit is not None and positions > limit:
        picked = np.sort((rng or np.random.default_rng(0)).choice(positions, size=limit, replace=False))
        sample, rest = np.divmod(picked, out_h * out_w)
        y, x_pos = np.divmod(rest, out_w)
        # Fancy indexing on the strided view copies only the picked windows: (limit, I, kh, kw).
        rows = windows[sample, :, y, x_pos].reshape(limit, channels * kh * kw)
        return (rows, sample) if with_samples else rows
    rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(positions, channels * kh * kw)
    return (rows, np.repeat(np.arange(n), out_h * out_w)) if with_samples else rows


def collect_stats(
    model,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    runtime,
    want_patches: bool = False,
    folds: int | None = None,
    outputs_into: list | None = None,
) -> dict[str, LayerStats]:
    """Input moments of every layer whose weight sits on the right of its product (all but
    left-weight MatMuls), from one pass of the original model over `inputs`. `folds`: also each
    cross-fitting fold's sums (sample i in fold i mod folds), within FOLD_MOMENT_MAX_BYTES.
    `outputs_into`: a list that gets the model's own outputs of each batch (onnxruntime computes
    them in this pass anyway; tnopt/reference_tap.py)."""
    eligible = [layer for layer in layers if layer.attr("weight_side", "right") == "right"]
    if not eligible:
        return {}
    names = sorted({layer.input_name for layer in eligible})
    session = runtime.with_outputs(model, names)
    if outputs_into is not None:
        # The batch's values keep only the layer inputs, as without the tap.
        names, outputs_into = tap_names(model, names), tap_sink(model, names, outputs_into)
    accumulators = {layer.name: _Accumulator(layer, want_patches) for layer in eligible}
    samples = as_feeds(inputs).samples()
    last_reader = {(layer.input_name, _row_layout(layer)): i for i, layer in enumerate(eligible)}
    first = True
    for batch, outputs in runtime.iter_batches(session, inputs, output_names=names):
        values = dict(zip(names, outputs))
        if outputs_into is not None:
            outputs_into(values)
        if first:
            _plan_economy(accumulators.values(), values, samples, batch.stop - batch.start)
            if folds and folds > 1:
                plan_fold_moments(list(accumulators.values()), values, folds)
            first = False
        shared: dict = {}
        largest_moment = max(
            (max(v.shape[1], v.shape[-1]) ** 2 for v in values.values() if np.ndim(v) >= 2), default=0
        )
        sample_folds = np.arange(batch.start, batch.stop) % folds if folds and folds > 1 else None
        # One BLAS thread unless the machine has idle cores (tnopt/threads.py).
        with math_threads(largest_moment):
            for index, layer in enumerate(eligible):
                accumulators[layer.name].add(values[layer.input_name], shared, sample_folds)
                if last_reader[(layer.input_name, _row_layout(layer))] == index:
                    # No later layer reads this product: drop it (with folds, each key holds folds + 1
                    # grams: MiniLM's 1536² FFN inputs held 0.5 GB more for the whole batch).
                    for key in [k for k in shared if k[:2] == (layer.input_name, _row_layout(layer))]:
                        del shared[key]
    # Each accumulator is dropped as its result is made (its sums go with it).
    return {name: accumulators.pop(name).result() for name in list(accumulators)}


def plan_fold_moments(accumulators, values: dict, folds: int, max_bytes: int | None = None) -> None:
    """Give each accumulator `folds` (per-fold sums) in order while their bytes fit in
    `max_bytes` (FOLD_MOMENT_MAX_BYTES)."""
    budget = FOLD_MOMENT_MAX_BYTES if max_bytes is None else max_bytes
    for acc in accumulators:
        x = np.asarray(values[acc.layer.input_name])
        features = x.shape[1] if acc.layer.op in ("Conv", "ConvTranspose") else _rows(acc.layer, x).shape[1]
        size = features**2
        if acc.want_patches:
            size += (features * int(np.prod(acc.layer.attr("kernel_shape")))) ** 2
        size *= 4 * folds
        if size <= budget:
            acc.folds, budget = folds, budget - size


def _plan_economy(accumulators, values: dict, samples: int, batch_samples: int) -> bool:
    """From the first batch's sizes: the pass's projected channel-moment FLOPs; above
    EXACT_STATS_MAX_FLOPS, each accumulator's row fraction and patch cap (module constants)."""
    sizes = {}
    for acc in accumulators:
        x = np.asarray(values[acc.layer.input_name])
        if acc.layer.op in ("Conv", "ConvTranspose"):
            features = x.shape[1]
            count = x.size // max(features, 1)
        else:
            count, features = _rows(acc.layer, x).shape  # a view: Gemm/MatMul rows are not copied
        sizes[acc.layer.name] = (count / max(batch_samples, 1) * samples, features)
    distinct = {(a.layer.input_name, _row_layout(a.layer)): sizes[a.layer.name] for a in accumulators}
    projected = sum(total * features**2 for total, features in distinct.values())
    if projected <= EXACT_STATS_MAX_FLOPS:
        return False
    for acc in accumulators:
        total, features = sizes[acc.layer.name]
        acc.keep = min(1.0, ECONOMY_ROWS_PER_FEATURE * features / max(total, 1.0))
        if acc.want_patches:
            patch_features = features * int(np.prod(acc.layer.attr("kernel_shape")))
            acc.max_patch_rows = min(MAX_PATCH_ROWS, ECONOMY_PATCH_ROWS_PER_FEATURE * patch_features)
            # Spread over the batches, so the patch moment sees every sample, not the first few.
            batches = max(1, -(-samples // max(batch_samples, 1)))
            acc.patch_rows_per_batch = -(-acc.max_patch_rows // batches)
    return True


def save_stats(path, stats: dict[str, LayerStats]) -> None:
    """One .npz per (model, data): arrays under positional keys, layer names in a JSON index
    (node names hold '/', which zip members would turn into folders)."""
    import json
    import os

    arrays, index = {}, []
    for i, (name, item) in enumerate(sorted(stats.items())):
        arrays[f"m{i}"] = item.input_moment
        for k, moment in enumerate(item.fold_moments or []):
            arrays[f"f{i}_{k}"] = moment
        # A pointwise conv's patch moment is its channel moment (share_pointwise_patches): saved once.
        shared = item.patch_moment is not None and item.patch_moment is item.input_moment
        if item.patch_moment is not None and not shared:
            arrays[f"p{i}"] = item.patch_moment
            for k, moment in enumerate(item.fold_patch_moments or []):
                arrays[f"q{i}_{k}"] = moment
        index.append([name, item.rows, item.fold_rows, item.fold_patch_rows, shared])
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    tmp = f"{path}.tmp.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only loses the speed-up


def load_stats(path) -> dict[str, LayerStats]:
    import json

    try:
        with np.load(path) as archive:
            index = json.loads(archive["index"].tobytes().decode())
            loaded = {}
            for i, (name, rows, fold_rows, patch_rows, *shared) in enumerate(index):
                item = LayerStats(
                    rows,
                    archive[f"m{i}"],
                    archive[f"p{i}"] if f"p{i}" in archive.files else None,
                    [archive[f"f{i}_{k}"] for k in range(len(fold_rows))] if fold_rows else None,
                    fold_rows,
                )
                if shared and shared[0]:
                    share_pointwise_patches(item)
                elif item.patch_moment is not None and patch_rows:
                    item.fold_patch_moments = [archive[f"q{i}_{k}"] for k in range(len(patch_rows))]
                    item.fold_patch_rows = patch_rows
                loaded[name] = item
            return loaded
    except (OSError, ValueError, KeyError):
        return {}


def calibration_stats(
    original,
    targets,
    calib,
    runtime,
    cache_dir,
    planned_methods,
    report,
    say,
    folds: int | None = None,
    outputs_into: list | None = None,
) -> dict:
    """Moments of every target layer from the first MAX_STATS_SAMPLES calibration samples, read from
    and saved to `cache_dir` when given; times and cache use go to `report.timings`. `folds`: the
    cross-fitted gate's fold count (per-fold moments too; tnopt/fold_stats.py). `outputs_into`: see
    `collect_stats` (left empty when no pass runs)."""
    stats_start = time.perf_counter()
    stats_data = calib.head(MAX_STATS_SAMPLES)
    folds = min(folds, len(stats_data)) if folds and folds > 1 else None
    want_patches = any(m in planned_methods for m in PATCH_METHODS)
    stats, stats_file = {}, None
    if cache_dir:
        model_hash = hashlib.sha256(original.SerializeToString()).hexdigest()[:16]
        tag = f"-f{folds}" if folds else ""
        stats_file = Path(cache_dir) / f"{model_hash}-{stats_data.fingerprint()}{tag}-stats3.npz"
        stats = load_stats(stats_file) if stats_file.exists() else {}
    missing = [
        layer
        for layer in targets
        if layer.name not in stats
        or (want_patches and layer.op == "Conv" and stats[layer.name].patch_moment is None)
    ]
    if missing:
        stats.update(
            collect_stats(
                original,
                missing,
                stats_data.inputs,
                runtime,
                want_patches=want_patches,
                folds=folds,
                outputs_into=outputs_into,
            )
        )
        if stats_file is not None:
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            save_stats(stats_file, stats)
    report.timings["stats_cached_layers"] = len(targets) - len(missing)
    report.timings["stats_s"] = time.perf_counter() - stats_start
    say(
        f"calibration statistics: {len(targets)} layers from {len(stats_data)} samples, "
        f"{len(targets) - len(missing)} from cache"
    )
    return stats
