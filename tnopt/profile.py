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

from tnopt.analyze import Layer
from tnopt.data import as_feeds
from tnopt.layer_rows import (
    batch_first,
    im2col_rows,
    input_rows,
    pointwise,
    row_layout,
    row_samples,
    sampled_rows,
)
from tnopt.moment_sums import GramSums, shrunk
from tnopt.reference_tap import tap_names, tap_sink
from tnopt.threads import math_threads

# Calibration moments converge long before this many samples.
MAX_STATS_SAMPLES = 2048
# Methods whose data-aware form needs the im2col (patch) moment of a Conv input.
PATCH_METHODS = ("cut-o",)

# The patch moment stops accumulating past this many im2col rows: (I·k·k)² entries converge long
# before, and each batch of 28x28 feature maps adds ~50k rows.
MAX_PATCH_ROWS = 200_000
# A layer whose input moment would be wider than this keeps weight-only factors: the moment is
# features² float64 values and whitening it holds about four such arrays at once (the symmetrised
# sums, a contiguous copy, the damped copy, its Cholesky factor). VGG-19's fc6 reads 25,088 features:
# 5 GB per copy; its `--rank-ratio 0.5` run passed 16 GB RSS after the statistics and was stopped.
MAX_MOMENT_FEATURES = 8192
# At most this many im2col rows (positions) are taken from one batch, drawn at random (seeded) from
# its positions: a 736x736 page has 540k positions per sample, and unfolding them all would cost
# I·k·k times the activation itself. Spread over batches, the moment sees more samples, too.
MAX_PATCH_ROWS_PER_BATCH = 50_000
# ... and no more than this many bytes of them (a 3x3 conv on 256 channels has 2304 features).
MAX_PATCH_BYTES_PER_BATCH = 32 * 2**20

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
        self.patches_are_channels = self.want_patches and pointwise(layer)
        self.want_patches = self.want_patches and not self.patches_are_channels
        self.rng = np.random.default_rng(0)
        # Economy (set by collect_stats): the fraction of each batch's rows the channel moment takes
        # (None: all, in float64) and the patch moment's row cap.
        self.keep: float | None = None
        self.max_patch_rows = MAX_PATCH_ROWS
        self.patch_rows_per_batch = MAX_PATCH_ROWS_PER_BATCH
        # Per-fold sums for the cross-fitted gate (set by collect_stats: the fold count, or None).
        self.folds: int | None = None
        # The sums themselves (GramSums): the channel moment's may be another layer's reading the same
        # tensor the same way (`owned` False: forked before it would diverge).
        self.channel: GramSums | None = None
        self.owned = True
        self.patches: GramSums | None = None

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
        if folds and not batch_first(self.layer, activations, len(sample_folds)):
            folds = None  # rows cannot be told apart by sample: this layer keeps no fold moments
        key = (self.layer.input_name, row_layout(self.layer), folds)
        owner = shared.get(key) if shared is not None else None
        if owner is not None and (owner is self.channel or self.channel is None):
            self.channel, self.owned = owner, owner is self.channel and self.owned
        else:
            if self.keep is None:
                rows = input_rows(self.layer, activations)
                samples = (
                    row_samples(self.layer, activations, len(rows), len(sample_folds)) if folds else None
                )
                dtype = np.float64
            else:
                n = len(sample_folds) if folds else 0
                rows, samples = sampled_rows(self.layer, activations, self.keep, self.rng, n)
                dtype = np.float32
            if self.channel is None:
                self.channel = GramSums(self.folds, dtype)
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
            patches, samples = im2col_rows(self.layer, activations, limit, self.rng, with_samples=True)
            # float32 products: the moment only feeds a damped whitening.
            if self.patches is None:
                self.patches = GramSums(self.folds, np.float32)
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


def share_pointwise_patches(stats: LayerStats) -> LayerStats:
    """A pointwise conv's patch moment and fold sums as the very arrays of its channel moment and
    folds (one copy in memory: ResNet-50's 1x1 convs held ~0.2 GB of patch moments that repeated
    their channel moments from fewer rows)."""
    stats.patch_moment = stats.input_moment
    stats.fold_patch_moments, stats.fold_patch_rows = stats.fold_moments, stats.fold_rows
    return stats


def moment_width(layer: Layer) -> int:
    """Features of the widest moment a layer's data-aware factors read: a Conv's patch (I·kh·kw), a
    ConvTranspose's input channels, a Gemm/MatMul's K."""
    shape = layer.weight_shape
    if layer.op == "Conv":
        return int(np.prod(shape[1:]))
    return int(shape[0])


def split_by_moment_width(targets: list[Layer]) -> tuple[list[Layer], list[Layer]]:
    """(layers whose moments are collected, layers too wide for them: MAX_MOMENT_FEATURES)."""
    fits = [layer for layer in targets if moment_width(layer) <= MAX_MOMENT_FEATURES]
    return fits, [layer for layer in targets if moment_width(layer) > MAX_MOMENT_FEATURES]


def collect_stats(
    model,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    runtime,
    want_patches: bool = False,
    folds: int | None = None,
    outputs_into: list | None = None,
    stop=None,
) -> dict[str, LayerStats]:
    """Input moments of every layer whose weight sits on the right of its product (all but
    left-weight MatMuls), from one pass of the original model over `inputs`. `folds`: also each
    cross-fitting fold's sums (sample i in fold i mod folds), within FOLD_MOMENT_MAX_BYTES.
    `outputs_into`: a list that gets the model's own outputs of each batch (onnxruntime computes
    them in this pass anyway; tnopt/reference_tap.py). `stop(samples done)`: asked after each batch;
    True ends the pass there, the moments averaging the samples done (--time-limit)."""
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
    last_reader = {(layer.input_name, row_layout(layer)): i for i, layer in enumerate(eligible)}
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
                if last_reader[(layer.input_name, row_layout(layer))] == index:
                    # No later layer reads this product: drop it (with folds, each key holds folds + 1
                    # grams: MiniLM's 1536² FFN inputs held 0.5 GB more for the whole batch).
                    for key in [k for k in shared if k[:2] == (layer.input_name, row_layout(layer))]:
                        del shared[key]
        if stop is not None and stop(batch.stop):
            break
    # Each accumulator is dropped as its result is made (its sums go with it).
    return {name: accumulators.pop(name).result() for name in list(accumulators)}


def plan_fold_moments(accumulators, values: dict, folds: int, max_bytes: int | None = None) -> None:
    """Give each accumulator `folds` (per-fold sums) in order while their bytes fit in
    `max_bytes` (FOLD_MOMENT_MAX_BYTES)."""
    budget = FOLD_MOMENT_MAX_BYTES if max_bytes is None else max_bytes
    for acc in accumulators:
        x = np.asarray(values[acc.layer.input_name])
        features = (
            x.shape[1] if acc.layer.op in ("Conv", "ConvTranspose") else input_rows(acc.layer, x).shape[1]
        )
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
            count, features = input_rows(acc.layer, x).shape  # a view: Gemm/MatMul rows are not copied
        sizes[acc.layer.name] = (count / max(batch_samples, 1) * samples, features)
    distinct = {(a.layer.input_name, row_layout(a.layer)): sizes[a.layer.name] for a in accumulators}
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


def load_stats(path, names=None) -> dict[str, LayerStats]:
    """The cached moments, of the layers in `names` only (None: all): the archive reads each array
    on access, and a layer this run does not collect may hold gigabytes (VGG-19's fc6 moment, 5 GB,
    cached by a run before it was left weight-only, was read back whole)."""
    import json

    try:
        with np.load(path) as archive:
            index = json.loads(archive["index"].tobytes().decode())
            loaded = {}
            for i, (name, rows, fold_rows, patch_rows, *shared) in enumerate(index):
                if names is not None and name not in names:
                    continue
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
    out_of_time=None,
) -> dict:
    """Moments of every target layer from the first MAX_STATS_SAMPLES calibration samples, read from
    and saved to `cache_dir` when given; times and cache use go to `report.timings`. `folds`: the
    cross-fitted gate's fold count (per-fold moments too; tnopt/fold_stats.py). `outputs_into`: see
    `collect_stats` (left empty when no pass runs). `out_of_time()` (--time-limit): once True, the
    pass ends at the next batch boundary with the moments of the samples done (at least one batch),
    says so, records `stats_stopped_at_samples`, and saves nothing to the cache (a later run would
    read a partial pass as the whole)."""
    stats_start = time.perf_counter()
    stats_data = calib.head(MAX_STATS_SAMPLES)
    folds = min(folds, len(stats_data)) if folds and folds > 1 else None
    want_patches = any(m in planned_methods for m in PATCH_METHODS)
    stats, stats_file = {}, None
    if cache_dir:
        model_hash = hashlib.sha256(original.SerializeToString()).hexdigest()[:16]
        tag = f"-f{folds}" if folds else ""
        stats_file = Path(cache_dir) / f"{model_hash}-{stats_data.fingerprint()}{tag}-stats3.npz"
        stats = load_stats(stats_file, {layer.name for layer in targets}) if stats_file.exists() else {}
    missing = [
        layer
        for layer in targets
        if layer.name not in stats
        or (want_patches and layer.op == "Conv" and stats[layer.name].patch_moment is None)
    ]
    stopped_at: list[int] = []

    def stop(samples_done: int) -> bool:
        if out_of_time is None or samples_done >= len(stats_data) or not out_of_time():
            return False
        stopped_at.append(samples_done)
        return True

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
                stop=stop,
            )
        )
        if stats_file is not None and not stopped_at:
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            save_stats(stats_file, stats)
    report.timings["stats_cached_layers"] = len(targets) - len(missing)
    report.timings["stats_s"] = time.perf_counter() - stats_start
    samples = f"{len(stats_data)} samples"
    if stopped_at:
        report.timings["stats_stopped_at_samples"] = stopped_at[0]
        samples = f"the first {stopped_at[0]} of {len(stats_data)} samples (the time limit ran out)"
    say(
        f"calibration statistics: {len(targets)} layers from {samples}, "
        f"{len(targets) - len(missing)} from cache"
    )
    return stats
