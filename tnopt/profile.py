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
from threadpoolctl import threadpool_limits

from tnopt.analyze import Layer
from tnopt.data import as_feeds

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
# Rows go through float64 in chunks of this many, so a big activation is never copied whole.
ROW_CHUNK = 65_536

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


@dataclass
class LayerStats:
    rows: int  # how many input rows (pixels, tokens, samples) the moments average over
    input_moment: np.ndarray  # (K, K) or (I, I): E[x xᵀ] over rows
    patch_moment: np.ndarray | None = None  # Conv 2-D: (I·kh·kw)² moment of the im2col rows

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
        self.rows = 0
        self.moment = None
        self.patch_moment = None
        self.patch_rows = 0
        self.rng = np.random.default_rng(0)
        # Economy (set by collect_stats): the fraction of each batch's rows the channel moment takes
        # (None: all, in float64) and the patch moment's row cap.
        self.keep: float | None = None
        self.max_patch_rows = MAX_PATCH_ROWS
        self.patch_rows_per_batch = MAX_PATCH_ROWS_PER_BATCH

    def add(self, activations: np.ndarray, shared: dict | None = None) -> None:
        """Accumulate one batch. `shared`: this batch's channel moments by (input, row layout), so
        layers reading the same tensor the same way (a block's first conv and its shortcut) share
        one product."""
        key = (self.layer.input_name, _row_layout(self.layer))
        if shared is not None and key in shared:
            gram, count = shared[key]
        else:
            if self.keep is None:
                rows = _rows(self.layer, activations)
                gram, count = chunked_gram(rows), len(rows)
            else:
                rows = _sampled_rows(self.layer, activations, self.keep, self.rng)
                gram, count = chunked_gram(rows, np.float32), len(rows)
            if shared is not None:
                shared[key] = (gram, count)
        self.moment = gram if self.moment is None else self.moment + gram
        self.rows += count
        if self.want_patches and self.patch_rows < self.max_patch_rows:
            features = activations.shape[1] * int(np.prod(self.layer.attr("kernel_shape")))
            limit = min(MAX_PATCH_ROWS_PER_BATCH, max(1, MAX_PATCH_BYTES_PER_BATCH // (4 * features)))
            if self.keep is not None:  # economy: its cap spread over the batches
                limit = min(limit, self.patch_rows_per_batch, self.max_patch_rows - self.patch_rows)
            patches = _patches(self.layer, activations, limit, self.rng)
            # float32 products, float64 sums across batches: the moment only feeds a damped whitening.
            gram = (patches.T @ patches).astype(np.float64)
            self.patch_moment = gram if self.patch_moment is None else self.patch_moment + gram
            self.patch_rows += len(patches)

    def result(self) -> LayerStats:
        patch = (
            None
            if self.patch_moment is None
            else shrunk(self.patch_moment / max(self.patch_rows, 1), self.patch_rows)
        )
        return LayerStats(self.rows, shrunk(self.moment / max(self.rows, 1), self.rows), patch)


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
    return moment + (dim / rows - 1.0) * scale * np.eye(dim)


def chunked_gram(rows: np.ndarray, dtype=np.float64) -> np.ndarray:
    """rowsᵀ·rows summed in float64, ROW_CHUNK rows converted to `dtype` at a time for the product
    (never the whole matrix)."""
    gram = np.zeros((rows.shape[1], rows.shape[1]))
    for start in range(0, len(rows), ROW_CHUNK):
        chunk = np.asarray(rows[start : start + ROW_CHUNK], dtype=dtype)
        gram += chunk.T @ chunk
    return gram


def _row_layout(layer: Layer) -> tuple:
    """What `_rows` depends on besides the tensor: layers equal here read equal rows from it."""
    if layer.op in ("Conv", "ConvTranspose"):
        return ("channels",)
    return (layer.op, bool(layer.op == "Gemm" and layer.attr("transA")))


def _sampled_rows(layer: Layer, x: np.ndarray, keep: float, rng) -> np.ndarray:
    """A random `keep` fraction of `_rows(layer, x)` (at least one row), copying only those rows."""
    x = np.asarray(x)
    if layer.op in ("Conv", "ConvTranspose"):
        flat = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions): a view
        total = flat.shape[0] * flat.shape[2]
        count = min(total, max(1, int(round(keep * total))))
        picked = np.sort(rng.choice(total, size=count, replace=False))
        sample, position = np.divmod(picked, flat.shape[2])
        return flat[sample, :, position]  # (count, C)
    rows = _rows(layer, x)
    count = min(len(rows), max(1, int(round(keep * len(rows)))))
    return rows[np.sort(rng.choice(len(rows), size=count, replace=False))]


def _rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input as a (rows, features) matrix in its own dtype, features = the contracted
    axis (a view where the layout allows; chunked_gram widens it to float64 a chunk at a time)."""
    x = np.asarray(x)
    if layer.op in ("Conv", "ConvTranspose"):
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if layer.op == "Gemm":
        return x.T if layer.attr("transA") else x.reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])  # MatMul, weight on the right


def _patches(layer: Layer, x: np.ndarray, limit: int | None = None, rng=None) -> np.ndarray:
    """im2col rows (positions, I·kh·kw) in the (I, kh, kw) order of a reshaped Conv weight: numpy
    strided windows (a view; only the final rows are copied), no deep-learning framework needed.
    With `limit`, at most that many positions, drawn at random from the batch's (sample, y, x)."""
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
        return windows[sample, :, y, x_pos].reshape(limit, channels * kh * kw)
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(positions, channels * kh * kw)


def collect_stats(
    model, layers: list[Layer], inputs: dict[str, np.ndarray], runtime, want_patches: bool = False
) -> dict[str, LayerStats]:
    """Input moments of every layer whose weight sits on the right of its product (all but
    left-weight MatMuls), from one pass of the original model over `inputs`."""
    eligible = [layer for layer in layers if layer.attr("weight_side", "right") == "right"]
    if not eligible:
        return {}
    names = sorted({layer.input_name for layer in eligible})
    session = runtime.with_outputs(model, names)
    accumulators = {layer.name: _Accumulator(layer, want_patches) for layer in eligible}
    samples = as_feeds(inputs).samples()
    first = True
    for batch, outputs in runtime.iter_batches(session, inputs, output_names=names):
        values = dict(zip(names, outputs))
        if first:
            _plan_economy(accumulators.values(), values, samples, batch.stop - batch.start)
            first = False
        shared: dict = {}
        # One BLAS thread beside onnxruntime's spinning workers (see pipeline.factorize).
        with threadpool_limits(1):
            for layer in eligible:
                accumulators[layer.name].add(values[layer.input_name], shared)
    return {name: acc.result() for name, acc in accumulators.items()}


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
        if item.patch_moment is not None:
            arrays[f"p{i}"] = item.patch_moment
        index.append([name, item.rows])
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
            return {
                name: LayerStats(
                    rows, archive[f"m{i}"], archive[f"p{i}"] if f"p{i}" in archive.files else None
                )
                for i, (name, rows) in enumerate(index)
            }
    except (OSError, ValueError, KeyError):
        return {}


def calibration_stats(original, targets, calib, runtime, cache_dir, planned_methods, report, say) -> dict:
    """Moments of every target layer from the first MAX_STATS_SAMPLES calibration samples, read from
    and saved to `cache_dir` when given; times and cache use go to `report.timings`."""
    stats_start = time.perf_counter()
    stats_data = calib.head(MAX_STATS_SAMPLES)
    want_patches = any(m in planned_methods for m in PATCH_METHODS)
    stats, stats_file = {}, None
    if cache_dir:
        model_hash = hashlib.sha256(original.SerializeToString()).hexdigest()[:16]
        stats_file = Path(cache_dir) / f"{model_hash}-{stats_data.fingerprint()}-stats2.npz"
        stats = load_stats(stats_file) if stats_file.exists() else {}
    missing = [
        layer
        for layer in targets
        if layer.name not in stats
        or (want_patches and layer.op == "Conv" and stats[layer.name].patch_moment is None)
    ]
    if missing:
        stats.update(collect_stats(original, missing, stats_data.inputs, runtime, want_patches=want_patches))
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
