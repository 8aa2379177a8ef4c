"""A candidate layer's input read as the rows its weight contracts: (rows, features) for a Gemm /
MatMul (features = the contracted axis) or a Conv's channels at every position, and a 2-D conv's
im2col rows (positions, I·kh·kw) — whole, or a seeded random subset of positions, with each row's
sample where the layout tells. numpy views where the layout allows; no deep-learning framework.
"""

from __future__ import annotations

import numpy as np

from tnopt.analyze import Layer


def pointwise(layer: Layer) -> bool:
    """A 1x1 conv with unit strides and no padding: each im2col row is one input pixel's channels."""
    kernel = tuple(layer.attr("kernel_shape") or ())
    return (
        bool(kernel)
        and all(k == 1 for k in kernel)
        and all(s == 1 for s in layer.attr("strides") or ())
        and not any(layer.attr("pads") or ())
    )


def batch_first(layer: Layer, x: np.ndarray, batch_samples: int) -> bool:
    """Whether the layer's input has the batch's samples on the axis its rows start from."""
    shape = np.shape(x)
    if layer.op == "Gemm" and layer.attr("transA"):
        return len(shape) == 2 and len(_a_rows(layer, x)) == batch_samples
    return len(shape) >= 2 and shape[0] == batch_samples


def row_samples(layer: Layer, x: np.ndarray, count: int, batch_samples: int) -> np.ndarray | None:
    """The sample of each of `input_rows(layer, x)`'s rows, where the layout tells (batch on axis 0, rows
    sample-major); None otherwise (e.g. a recurrent state with its batch on axis 1)."""
    x = np.asarray(x)
    if layer.op == "Gemm" and layer.attr("transA"):
        return np.arange(count) if x.ndim == 2 and count == batch_samples else None
    if x.ndim < 2 or x.shape[0] != batch_samples or count % max(batch_samples, 1):
        return None
    return np.repeat(np.arange(batch_samples), count // batch_samples)


def row_layout(layer: Layer) -> tuple:
    """What `input_rows` depends on besides the tensor: layers equal here read equal rows from it."""
    if layer.op in ("Conv", "ConvTranspose"):
        return ("channels",)
    return (layer.op, bool(layer.op == "Gemm" and layer.attr("transA")))


def sampled_rows(layer: Layer, x: np.ndarray, keep: float, rng, batch_samples: int = 0):
    """(A random `keep` fraction of `input_rows(layer, x)` (at least one row), copying only those rows;
    each row's sample, or None without `batch_samples` or where the layout does not tell)."""
    x = np.asarray(x)
    if layer.op in ("Conv", "ConvTranspose"):
        flat = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions): a view
        total = flat.shape[0] * flat.shape[2]
        count = min(total, max(1, int(round(keep * total))))
        picked = np.sort(rng.choice(total, size=count, replace=False))
        sample, position = np.divmod(picked, flat.shape[2])
        return flat[sample, :, position], sample  # (count, C)
    rows = input_rows(layer, x)
    count = min(len(rows), max(1, int(round(keep * len(rows)))))
    picked = np.sort(rng.choice(len(rows), size=count, replace=False))
    samples = row_samples(layer, x, len(rows), batch_samples) if batch_samples else None
    return rows[picked], None if samples is None else samples[picked]


def _a_rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """A Gemm with transA=1 reads A as (K, M). A capture comes sample-major where the runtime found
    A's batch dim (symbolic, on axis 1) and moved it to axis 0 (Runtime.iter_batches): then it is
    already (M, K); a fixed-shape A comes as the model holds it, (K, M)."""
    k = layer.weight_shape[0]
    shape = layer.input_shape or ()
    moved = len(shape) == 2 and isinstance(shape[1], str) and not isinstance(shape[0], str)
    if x.ndim == 2 and x.shape[1] == k and (x.shape[0] != k or moved):
        return x
    return x.T


def input_rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input as a (rows, features) matrix in its own dtype, features = the contracted
    axis (a view where the layout allows; syrk_into widens it a chunk at a time)."""
    x = np.asarray(x)
    if layer.op in ("Conv", "ConvTranspose"):
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if layer.op == "Gemm":
        return _a_rows(layer, x) if layer.attr("transA") else x.reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])  # MatMul, weight on the right


def im2col_rows(layer: Layer, x: np.ndarray, limit: int | None = None, rng=None, with_samples: bool = False):
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
