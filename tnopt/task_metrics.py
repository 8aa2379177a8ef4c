"""Metrics that measure what the user's task measures, streamed batch by batch.

A budget is charged on one number. For a classifier that number is top-1 (with labels) or the
agreement of the compressed model's top-1 with the original's. For anything else the whole-output
cosine used to be the default, and it is blind: a YOLO-style output [N, 4+C, A] has box rows in pixels
~100x larger than its class-score rows, so the scores can be destroyed at cosine 0.99. This module
provides:

* `fidelity` (the default for non-classifier outputs): every counted output is split into channel
  groups (axis 1 for rank >= 3, single channels unless `NAME:groups=0-3,4-`; a rank-2 output is one
  group), each group's error is standardised by the *original's* spread of that group on the
  calibration data, and the value is the worst group's R^2 = 1 - MSE_g / Var_g (standardised relative
  L2 squared). A small-valued group counts as much as a large one.
* task metrics compared against the original model's own predictions (or labels): `detection`
  (YOLO-style decode, confidence threshold, per-class NMS, micro-F1 at IoU 0.5, same class), `ctc`
  (greedy decode, character accuracy = 1 - Levenshtein / reference length), `segmentation` (IoU of
  argmax or thresholded maps), `embedding` (per-sample cosine).
* plug-ins `package.module:function` with `fn(reference, outputs, labels)` -> a number (that batch's
  score) or a 1-D array of per-sample scores (then the standard error comes from their spread).
* the collapse guard (`CollapseGuard`): whatever the metric, a plan under which a channel group's
  standardised fidelity or a classifier-like output's top-1 agreement collapses is flagged.

Every metric is an object with `start()` -> accumulator; `accumulator.update(reference, outputs,
labels)` takes one batch (lists of arrays in the model's output order) and keeps only running sums, so
memory is bounded by one batch; `accumulator.result()` -> `Score(value, stderr, details)`. Calling the
metric on whole arrays feeds them in batches of METRIC_BATCH samples.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tnopt.errors import DataError, TnoptError

METRIC_BATCH = 64
# A channel group whose standardised fidelity falls below this (R^2; standardised relative L2 > 0.71)
# has collapsed: it carries less than half of what the original's group varies by.
COLLAPSE_FIDELITY = 0.5
# A classifier-like output whose top-1 agrees with the original's on fewer than this fraction of
# samples (or positions) has collapsed.
COLLAPSE_AGREEMENT = 0.5
# A group's spread is floored at this fraction of its output's largest group spread: a constant
# channel (a padding channel) would otherwise turn round-off into a "collapse" of a channel the task
# never reads. Small enough that score rows 400x smaller than box rows still count in full.
SPREAD_FLOOR = 1e-3


@dataclass
class Score:
    value: float
    stderr: float = 0.0
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- running statistics
class RunningMean:
    """Mean and its standard error of per-sample values, from running sums (O(1) memory)."""

    def __init__(self):
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, values) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        self.n += len(values)
        self.total += float(values.sum())
        self.squares += float((values * values).sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    @property
    def stderr(self) -> float:
        if self.n < 2:
            return 0.0
        variance = max(self.squares - self.total * self.total / self.n, 0.0) / (self.n - 1)
        return math.sqrt(variance / self.n)


class RunningRatio:
    """R = sum(x) / sum(y) over samples, with its delta-method standard error (O(1) memory):
    se(R) = sqrt(sum((x_i - R y_i)^2) / (n (n - 1))) / mean(y)."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def add(self, x, y) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        self.n += len(x)
        self.sx += float(x.sum())
        self.sy += float(y.sum())
        self.sxx += float((x * x).sum())
        self.syy += float((y * y).sum())
        self.sxy += float((x * y).sum())

    @property
    def ratio(self) -> float:
        return self.sx / self.sy if self.sy else float("nan")

    @property
    def stderr(self) -> float:
        if self.n < 2 or not self.sy:
            return 0.0
        r = self.ratio
        residual = max(self.sxx - 2 * r * self.sxy + r * r * self.syy, 0.0)
        return math.sqrt(residual / (self.n * (self.n - 1))) / (self.sy / self.n)


# --------------------------------------------------------------------------- options
def parse_options(text: str, allowed: dict[str, type], what: str) -> dict:
    """'iou=0.5,conf=0.25' -> {'iou': 0.5, 'conf': 0.25}, each converted by allowed[key]."""
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            known = ", ".join(f"{k}=" for k in allowed) or "none"
            raise TnoptError(f"{what}: unknown option {part!r} (options: {known})")
        try:
            options[key] = allowed[key](value.strip())
        except ValueError:
            raise TnoptError(
                f"{what}: option {key}={value!r} is not a valid {allowed[key].__name__}"
            ) from None
    return options


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_flag.__name__ = "flag (0/1)"


def parse_groups(text: str, channels: int | None = None) -> list[tuple[int, int]]:
    """'0-3,4-' -> [(0, 4), (4, channels)]: inclusive ranges, an open end runs to the last channel."""
    groups = []
    for part in filter(None, (p.strip() for p in text.split("|" if "|" in text else ","))):
        match = re.fullmatch(r"(\d+)(?:-(\d*))?", part)
        if not match:
            raise TnoptError(f"channel group {part!r} is not N, N-M or N- (e.g. groups=0-3,4-)")
        start = int(match.group(1))
        if match.group(2) is None:
            stop = start + 1
        elif match.group(2) == "":
            stop = channels if channels is not None else -1
        else:
            stop = int(match.group(2)) + 1
        if stop != -1 and stop <= start:
            raise TnoptError(f"channel group {part!r} is empty")
        groups.append((start, stop))
    return groups


@dataclass
class OutputOptions:
    """Per-output settings of the fidelity metric and the collapse guard: `NAME:axis=K,groups=...`."""

    axis: int | None = None
    groups: str | None = None


def parse_output_spec(text: str) -> tuple[str, OutputOptions]:
    """'output0:axis=1' / 'output0:groups=0-3,4-' / 'output0:axis=2,groups=0-3|4-'."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise TnoptError(f"--output-spec {text!r}: expected NAME:axis=K or NAME:groups=0-3,4-")
    options = OutputOptions()
    # groups may itself contain commas: everything after 'groups=' belongs to it
    head, gsep, groups = rest.partition("groups=")
    if gsep:
        options.groups = groups.strip()
        parse_groups(options.groups)
    for key, value in parse_options(head.rstrip(", "), {"axis": int}, f"--output-spec {text!r}").items():
        setattr(options, key, value)
    return name, options


# --------------------------------------------------------------------------- what the metric sees
@dataclass
class OutputInfo:
    """What binding a metric needs to know about one model output."""

    name: str
    shape: tuple  # as run on the calibration data
    producer: str | None = None


def _select(outputs, indices):
    return [outputs[i] for i in indices]


class TaskMetric:
    """Base of the streaming metrics. Subclasses implement start() and bind()."""

    name = "task"
    higher_is_better = True
    needs_labels = False

    def __init__(self, spec: str = "", options: dict | None = None):
        self.spec = spec or self.name
        self.options = dict(options or {})
        self.reason = ""
        self.warnings: list[str] = []
        self.suggestions: list[str] = []
        self.guard = None  # the CollapseGuard, set when the metric is chosen for a run
        self.indices: list[int] = []  # which model outputs this metric reads
        self.output_names: list[str] = []
        self._memo = None

    # -- binding to a model and its calibration outputs ----------------------------------------------
    def bind(self, infos: list[OutputInfo], reference: list[np.ndarray], labels, counted: list[str] | None):
        """Check the metric fits these outputs (raise TnoptError with one line if not) and fix
        whatever it derives from the calibration data. `counted` are the outputs the user cares about."""
        wanted = self.options.get("output")
        names = [i.name for i in infos]
        if wanted is not None:
            if wanted not in names:
                raise TnoptError(
                    f"--metric {self.spec}: the model has no output {wanted!r} ({', '.join(names)})"
                )
            self.indices = [names.index(wanted)]
        elif counted:
            self.indices = [names.index(n) for n in counted]
        else:
            self.indices = list(range(len(infos)))
        self.output_names = [names[i] for i in self.indices]

    @property
    def cache_key(self) -> str:
        """Names this metric and its settings in the sensitivity cache (same spec, same numbers)."""
        import hashlib

        extra = repr(
            (
                sorted(self.options.items()),
                self.output_names,
                sorted((k, vars(v)) for k, v in getattr(self, "output_options", {}).items()),
            )
        )
        digest = hashlib.sha256(extra.encode()).hexdigest()[:8]
        return f"{self.name.replace(':', '_').replace('/', '_')}-{digest}"

    # -- streaming -----------------------------------------------------------------------------------
    def start(self):
        raise NotImplementedError

    def score(self, reference, outputs, labels=None, batch: int = METRIC_BATCH) -> Score:
        # search.evaluate asks for the value and then the standard error of the same arrays
        if self._memo is not None and self._memo[0] is reference and self._memo[1] is outputs:
            return self._memo[2]
        accumulator = self.start()
        n = len(reference[0])
        for begin in range(0, n, batch):
            chunk = slice(begin, begin + batch)
            accumulator.update(
                [r[chunk] for r in reference],
                [o[chunk] for o in outputs],
                None if labels is None else labels[chunk],
            )
        result = accumulator.result()
        self._memo = (reference, outputs, result)
        return result

    def __call__(self, reference, outputs, labels=None) -> float:
        return self.score(reference, outputs, labels).value

    def standard_error(self, reference, outputs, labels=None) -> float:
        return self.score(reference, outputs, labels).stderr

    def drop(self, value: float, baseline: float, drop_type: str = "absolute") -> float:
        loss = baseline - value if self.higher_is_better else value - baseline
        if drop_type == "relative" and self.higher_is_better and baseline != 0:
            return loss / abs(baseline)
        return loss


# --------------------------------------------------------------------------- fidelity (the default)
def _channel_view(array: np.ndarray, axis: int) -> np.ndarray:
    """[N, ..., C at axis, ...] -> [N, C, rest] (float64)."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim < 2:
        return array.reshape(len(array), 1, 1)
    moved = np.moveaxis(array, axis, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


@dataclass
class _Group:
    output: int  # index into the model's outputs
    label: str  # "output0[4]" or "output0[0:4]"
    start: int
    stop: int
    mean: float = 0.0
    spread: float = 1.0  # standard deviation of the original's values (floored), calibration data


class GroupLayout:
    """The channel groups of the counted outputs and the original's spread of each on the calibration
    data; shared by the fidelity metric and the collapse guard."""

    def __init__(self, infos, reference, indices, output_options: dict[str, OutputOptions]):
        self.groups: list[_Group] = []
        self.axes: dict[int, int] = {}
        self.skipped: list[str] = []
        for index in indices:
            info = infos[index]
            array = np.asarray(reference[index])
            if not np.issubdtype(array.dtype, np.floating):
                self.skipped.append(f"{info.name} (not float)")
                continue
            opts = output_options.get(info.name, OutputOptions())
            axis = opts.axis if opts.axis is not None else (1 if array.ndim >= 3 else None)
            if axis is not None and not 1 <= (axis % max(array.ndim, 1)) < array.ndim:
                raise TnoptError(
                    f"--output-spec {info.name}: axis {axis} does not fit its shape {array.shape}"
                )
            if axis is None and opts.groups is None:
                self.axes[index] = -1
                self.groups.append(_Group(index, info.name, 0, 1))
                continue
            axis = 1 if axis is None else axis % array.ndim
            self.axes[index] = axis
            channels = array.shape[axis]
            ranges = (
                parse_groups(opts.groups, channels) if opts.groups else [(c, c + 1) for c in range(channels)]
            )
            for start, stop in ranges:
                stop = channels if stop == -1 else stop
                if stop > channels:
                    raise TnoptError(
                        f"--output-spec {info.name}: group {start}-{stop - 1} exceeds its {channels} channels"
                    )
                label = f"{info.name}[{start}]" if stop == start + 1 else f"{info.name}[{start}:{stop}]"
                self.groups.append(_Group(index, label, start, stop))
        self._measure_spreads(reference)

    def view(self, index: int, array) -> np.ndarray:
        axis = self.axes[index]
        array = np.asarray(array, dtype=np.float64)
        if axis == -1:
            return array.reshape(len(array), 1, -1)
        return _channel_view(array, axis)

    def _measure_spreads(self, reference) -> None:
        for group in self.groups:
            values = self.view(group.output, reference[group.output])[:, group.start : group.stop]
            group.mean = float(values.mean()) if values.size else 0.0
            group.spread = float(values.std()) if values.size else 0.0
        for index in {g.output for g in self.groups}:
            members = [g for g in self.groups if g.output == index]
            floor = max(SPREAD_FLOOR * max(g.spread for g in members), 1e-12)
            for g in members:
                g.spread = max(g.spread, floor)

    def squared_errors(self, reference, outputs) -> np.ndarray:
        """[n, G]: each sample's mean squared error in each group, over that group's spread squared."""
        columns = []
        views = {}
        for group in self.groups:
            if group.output not in views:
                views[group.output] = (
                    self.view(group.output, reference[group.output]),
                    self.view(group.output, outputs[group.output]),
                )
            a, b = views[group.output]
            diff = a[:, group.start : group.stop] - b[:, group.start : group.stop]
            per_sample = (diff * diff).reshape(len(diff), -1).mean(axis=1)
            columns.append(per_sample / (group.spread * group.spread))
        return np.stack(columns, axis=1) if columns else np.zeros((len(reference[0]), 0))


class _FidelityAccumulator:
    def __init__(self, layout: GroupLayout, rule: str):
        self.layout, self.rule = layout, rule
        self.sums = [RunningMean() for _ in layout.groups]
        self.mean_of_groups = RunningMean()

    def update(self, reference, outputs, labels=None) -> None:
        errors = self.layout.squared_errors(reference, outputs)
        for g, running in enumerate(self.sums):
            running.add(errors[:, g])
        if errors.shape[1]:
            self.mean_of_groups.add(errors.mean(axis=1))

    def result(self) -> Score:
        per_group = {g.label: 1.0 - s.mean for g, s in zip(self.layout.groups, self.sums)}
        if not per_group:
            return Score(1.0, 0.0, {})
        if self.rule == "mean":
            return Score(1.0 - self.mean_of_groups.mean, self.mean_of_groups.stderr, {"groups": per_group})
        worst = min(range(len(self.sums)), key=lambda g: 1.0 - self.sums[g].mean)
        return Score(
            1.0 - self.sums[worst].mean,
            self.sums[worst].stderr,
            {"groups": per_group, "worst_group": self.layout.groups[worst].label},
        )


class Fidelity(TaskMetric):
    """Worst channel group's standardised fidelity R^2 = 1 - MSE_g / Var_g (1.0 = identical)."""

    name = "fidelity"
    OPTIONS = {"rule": str, "output": str}

    def __init__(self, spec="", options=None, output_options: dict[str, OutputOptions] | None = None):
        super().__init__(spec, options)
        self.output_options = dict(output_options or {})
        self.rule = self.options.get("rule", "worst")
        if self.rule not in ("worst", "mean"):
            raise TnoptError(f"--metric {self.spec}: rule must be worst or mean")
        self.layout: GroupLayout | None = None

    def bind(self, infos, reference, labels, counted):
        super().bind(infos, reference, labels, counted)
        self.layout = GroupLayout(infos, reference, self.indices, self.output_options)
        if not self.layout.groups:
            raise TnoptError("fidelity: none of the counted outputs is a float tensor")

    def start(self):
        return _FidelityAccumulator(self.layout, self.rule)


# --------------------------------------------------------------------------- detection
def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a [n, 4] and b [m, 4] -> [n, m]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        best = order[0]
        keep.append(best)
        if len(order) == 1:
            break
        overlaps = box_iou(boxes[best][None], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou]
    return np.asarray(keep, dtype=np.int64)


def detections_from(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    conf: float,
    iou: float,
    box_format: str,
    max_det: int = 300,
    agnostic: bool = False,
) -> np.ndarray:
    """One image: boxes [A, 4], class scores [A, C] -> rows (class, score, x1, y1, x2, y2) after the
    confidence threshold (best class per anchor, as YOLOv8) and per-class NMS."""
    cls = scores.argmax(axis=1)
    best = scores[np.arange(len(scores)), cls]
    keep = best >= conf
    if not keep.any():
        return np.zeros((0, 6), np.float64)
    boxes, cls, best = boxes[keep].astype(np.float64), cls[keep], best[keep]
    xyxy = _xywh_to_xyxy(boxes) if box_format == "xywh" else boxes
    # per-class NMS in one pass: shift each class's boxes far apart
    offset = 0.0 if agnostic else (cls[:, None] * (np.abs(xyxy).max() + 1.0) * 2.0)
    kept = nms(xyxy + offset, best, iou)[:max_det]
    return np.column_stack([cls[kept], best[kept], xyxy[kept]])


def decode_yolo(
    output: np.ndarray,
    *,
    conf: float = 0.25,
    iou: float = 0.5,
    layout: str = "auto",
    box_format: str = "xywh",
    max_det: int = 300,
) -> list[np.ndarray]:
    """A YOLO-style [N, 4+C, A] (channels_first) or [N, A, 4+C] (channels_last) output -> per image
    rows (class, score, x1, y1, x2, y2)."""
    output = np.asarray(output)
    if layout == "auto":
        layout = "channels_first" if output.shape[1] < output.shape[2] else "channels_last"
    if layout == "channels_first":
        output = np.swapaxes(output, 1, 2)
    return [
        detections_from(
            image[:, :4], image[:, 4:], conf=conf, iou=iou, box_format=box_format, max_det=max_det
        )
        for image in output
    ]


def match_detections(reference: np.ndarray, predicted: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """Greedy one-to-one matching, highest-scoring prediction first, same class, IoU >= iou.
    Returns (true positives, false positives, false negatives) of `predicted` against `reference`."""
    if len(reference) == 0 or len(predicted) == 0:
        return 0, len(predicted), len(reference)
    overlaps = box_iou(predicted[:, 2:6], reference[:, 2:6])
    overlaps[predicted[:, 0][:, None] != reference[:, 0][None, :]] = 0.0
    taken = np.zeros(len(reference), bool)
    tp = 0
    for p in np.argsort(-predicted[:, 1], kind="stable"):
        candidates = np.where(~taken & (overlaps[p] >= iou))[0]
        if len(candidates):
            taken[candidates[np.argmax(overlaps[p, candidates])]] = True
            tp += 1
    return tp, len(predicted) - tp, len(reference) - tp


class _DetectionAccumulator:
    def __init__(self, metric):
        self.metric = metric
        self.f1 = RunningRatio()
        self.counts = np.zeros(3, np.int64)
        self.reference_detections = 0

    def update(self, reference, outputs, labels=None) -> None:
        ref_dets = self.metric.detect(reference)
        out_dets = self.metric.detect(outputs)
        tps, denominators = [], []
        for r, o in zip(ref_dets, out_dets):
            tp, fp, fn = match_detections(r, o, self.metric.iou)
            self.counts += (tp, fp, fn)
            self.reference_detections += len(r)
            tps.append(2 * tp)
            denominators.append(2 * tp + fp + fn)
        self.f1.add(tps, denominators)

    def result(self) -> Score:
        tp, fp, fn = (int(c) for c in self.counts)
        details = {"tp": tp, "fp": fp, "fn": fn, "reference_detections": self.reference_detections}
        if self.f1.sy == 0:  # neither model detected anything: identical behaviour
            return Score(1.0, 0.0, details)
        return Score(self.f1.ratio, self.f1.stderr, details)


class Detection(TaskMetric):
    """Micro-F1 of the compressed model's detections against the original's (IoU, same class)."""

    name = "detection"
    OPTIONS = {
        "iou": float,
        "conf": float,
        "nms": float,
        "box": str,
        "layout": str,
        "output": str,
        "boxes": str,
        "scores": str,
        "max_det": int,
        "agnostic": _flag,
    }

    def __init__(self, spec="", options=None):
        super().__init__(spec, options)
        self.iou = self.options.get("iou", 0.5)
        self.conf = self.options.get("conf", 0.25)
        self.nms_iou = self.options.get("nms", 0.5)
        self.box_format = self.options.get("box", "xywh")
        self.layout = self.options.get("layout", "auto")
        if self.box_format not in ("xywh", "xyxy"):
            raise TnoptError(f"--metric {self.spec}: box must be xywh or xyxy")
        if self.layout not in ("auto", "channels_first", "channels_last"):
            raise TnoptError(f"--metric {self.spec}: layout must be auto, channels_first or channels_last")
        for key in ("iou", "conf", "nms"):
            if not 0 <= getattr(self, {"iou": "iou", "conf": "conf", "nms": "nms_iou"}[key]) <= 1:
                raise TnoptError(f"--metric {self.spec}: {key} must be in [0, 1]")
        self.pair: tuple[int, int] | None = None  # (boxes output, scores output)

    def bind(self, infos, reference, labels, counted):
        names = [i.name for i in infos]
        if "boxes" in self.options or "scores" in self.options:
            missing = [self.options.get(k) for k in ("boxes", "scores") if self.options.get(k) not in names]
            if missing:
                raise TnoptError(
                    f"--metric {self.spec}: the model has no output {missing[0]!r} ({', '.join(names)})"
                )
            self.pair = (names.index(self.options["boxes"]), names.index(self.options["scores"]))
            self.indices = list(self.pair)
            return
        super().bind(infos, reference, labels, None)
        if "output" not in self.options:
            # a single YOLO-style output, or a boxes [N, A, 4] + scores pair
            yolo = [i for i, r in enumerate(reference) if np.ndim(r) == 3 and min(np.shape(r)[1:]) >= 5]
            boxes = [i for i, r in enumerate(reference) if np.ndim(r) == 3 and np.shape(r)[2] == 4]
            if len(yolo) == 1 and not boxes:
                self.indices = yolo
            elif len(boxes) == 1:
                scores = [
                    i
                    for i, r in enumerate(reference)
                    if i != boxes[0]
                    and np.ndim(r) == 3
                    and len(r[0]) > 0
                    and reference[boxes[0]].shape[1] in np.shape(r)[1:]
                ]
                if len(scores) != 1:
                    raise TnoptError(
                        f"--metric {self.spec}: found boxes output {names[boxes[0]]!r} but no "
                        "single scores output beside it; name them with boxes=NAME,scores=NAME"
                    )
                self.pair = (boxes[0], scores[0])
                self.indices = list(self.pair)
                return
            else:
                raise TnoptError(
                    f"--metric {self.spec}: no single YOLO-style [N, 4+C, A] output among "
                    f"{', '.join(f'{n} {tuple(np.shape(r))}' for n, r in zip(names, reference))}; "
                    "name it with output=NAME"
                )
        shape = np.shape(reference[self.indices[0]])
        if len(shape) != 3 or min(shape[1:]) < 5:
            raise TnoptError(
                f"--metric {self.spec}: output {names[self.indices[0]]!r} has shape {shape}; "
                "detection expects [N, 4+C, A] or [N, A, 4+C]"
            )

    def detect(self, outputs) -> list[np.ndarray]:
        if self.pair is not None:
            boxes = np.asarray(outputs[self.pair[0]])
            scores = np.asarray(outputs[self.pair[1]])
            if scores.shape[1] != boxes.shape[1]:  # [N, C, A] -> [N, A, C]
                scores = np.swapaxes(scores, 1, 2)
            return [
                detections_from(
                    b,
                    s,
                    conf=self.conf,
                    iou=self.nms_iou,
                    box_format=self.box_format,
                    max_det=self.options.get("max_det", 300),
                    agnostic=self.options.get("agnostic", False),
                )
                for b, s in zip(boxes, scores)
            ]
        return decode_yolo(
            outputs[self.indices[0]],
            conf=self.conf,
            iou=self.nms_iou,
            layout=self.layout,
            box_format=self.box_format,
            max_det=self.options.get("max_det", 300),
        )

    def start(self):
        return _DetectionAccumulator(self)


# --------------------------------------------------------------------------- CTC
def ctc_greedy_decode(probs: np.ndarray, blank: int = 0) -> list[list[int]]:
    """[N, T, C] scores -> per sample the label sequence: argmax per step, repeats merged, blanks dropped."""
    best = np.asarray(probs).argmax(axis=-1)
    sequences = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        sequences.append([int(k) for k in row[keep] if k != blank])
    return sequences


def levenshtein(a, b) -> int:
    """Edit distance (insertions, deletions, substitutions) between two sequences."""
    a, b = list(a), list(b)
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _label_sequences(labels) -> list[list[int]]:
    """Labels for ctc: an [N, L] integer array padded with negative values (or a list of sequences)."""
    return [[int(k) for k in np.asarray(row).reshape(-1) if k >= 0] for row in labels]


class _CTCAccumulator:
    def __init__(self, metric):
        self.metric = metric
        self.errors = RunningRatio()  # edit distance / reference length
        self.exact = RunningMean()

    def update(self, reference, outputs, labels=None) -> None:
        out = self.metric.decode(outputs)
        truth = _label_sequences(labels) if self.metric.against_labels else self.metric.decode(reference)
        distances = [levenshtein(o, t) for o, t in zip(out, truth)]
        self.errors.add(distances, [len(t) for t in truth])
        self.exact.add([o == t for o, t in zip(out, truth)])

    def result(self) -> Score:
        details = {"exact_match": self.exact.mean, "characters": int(self.errors.sy)}
        if self.metric.score_kind == "exact":
            return Score(self.exact.mean, self.exact.stderr, details)
        if self.errors.sy == 0:
            return Score(1.0 if self.errors.sx == 0 else 0.0, 0.0, details)
        return Score(1.0 - self.errors.ratio, self.errors.stderr, details)


class CTC(TaskMetric):
    """Character accuracy 1 - Levenshtein / len(reference) of the greedy CTC decode (or exact match)."""

    name = "ctc"
    OPTIONS = {"blank": int, "layout": str, "output": str, "score": str, "labels": _flag}

    def __init__(self, spec="", options=None):
        super().__init__(spec, options)
        self.blank = self.options.get("blank", 0)
        self.layout = self.options.get("layout", "ntc")
        self.score_kind = self.options.get("score", "char")
        if self.layout not in ("ntc", "tnc"):
            raise TnoptError(f"--metric {self.spec}: layout must be ntc ([N, T, C]) or tnc ([T, N, C])")
        if self.score_kind not in ("char", "exact"):
            raise TnoptError(f"--metric {self.spec}: score must be char or exact")
        self.against_labels = False

    def bind(self, infos, reference, labels, counted):
        super().bind(infos, reference, labels, None)
        if "output" not in self.options:
            rank3 = [i for i, r in enumerate(reference) if np.ndim(r) == 3]
            if len(rank3) != 1:
                raise TnoptError(
                    f"--metric {self.spec}: expected one [N, T, C] output, found "
                    f"{', '.join(f'{i.name} {tuple(np.shape(r))}' for i, r in zip(infos, reference))}; "
                    "name it with output=NAME"
                )
            self.indices = rank3
        shape = np.shape(reference[self.indices[0]])
        if len(shape) != 3:
            raise TnoptError(f"--metric {self.spec}: output has shape {shape}; ctc expects [N, T, C]")
        classes = shape[2]
        if not -classes <= self.blank < classes:
            raise TnoptError(f"--metric {self.spec}: blank={self.blank} is outside the {classes} classes")
        self.blank %= classes
        use_labels = self.options.get("labels", labels is not None and np.ndim(labels) == 2)
        if use_labels:
            if labels is None or np.ndim(labels) != 2:
                raise DataError(
                    f"--metric {self.spec}: labels=1 needs an [N, L] integer 'labels' array "
                    "(label indices padded with -1)"
                )
            flat = np.asarray(labels)
            if flat.max() >= classes or (flat == self.blank).any():
                raise DataError(
                    f"'labels' hold class {int(flat.max())}: the output has {classes} classes "
                    f"and blank={self.blank}"
                )
        self.against_labels = bool(use_labels)
        texts = self.decode([reference[i] for i in range(len(reference))])
        if not any(texts):
            self.warnings.append(
                f"ctc: the original decodes to empty text on every calibration sample (blank={self.blank}); "
                "character accuracy against it measures nothing; check blank= and the data"
            )

    def decode(self, outputs) -> list[list[int]]:
        probs = np.asarray(outputs[self.indices[0]])
        if self.layout == "tnc":
            probs = np.swapaxes(probs, 0, 1)
        return ctc_greedy_decode(probs, self.blank)

    def start(self):
        return _CTCAccumulator(self)

    def score(self, reference, outputs, labels=None, batch: int = METRIC_BATCH) -> Score:
        if self.layout == "tnc":  # samples are on axis 1: feed whole arrays (one batch)
            accumulator = self.start()
            accumulator.update(reference, outputs, labels)
            return accumulator.result()
        return super().score(reference, outputs, labels, batch)


# --------------------------------------------------------------------------- segmentation
class _SegmentationAccumulator:
    def __init__(self, metric):
        self.metric = metric
        self.intersections: dict[int, float] = {}
        self.unions: dict[int, float] = {}
        self.per_image = RunningMean()

    def update(self, reference, outputs, labels=None) -> None:
        ref = self.metric.masks(reference)
        out = self.metric.masks(outputs) if not self.metric.against_labels else None
        if self.metric.against_labels:
            out, ref = ref, np.asarray(labels).astype(np.int64).reshape(ref.shape)
        classes = self.metric.classes
        image_scores = np.zeros(len(ref))
        image_counts = np.zeros(len(ref))
        for c in classes:
            a, b = ref == c, out == c
            inter = (a & b).reshape(len(a), -1).sum(axis=1).astype(np.float64)
            union = (a | b).reshape(len(a), -1).sum(axis=1).astype(np.float64)
            self.intersections[c] = self.intersections.get(c, 0.0) + inter.sum()
            self.unions[c] = self.unions.get(c, 0.0) + union.sum()
            present = union > 0
            image_scores[present] += inter[present] / union[present]
            image_counts[present] += 1
        # an image where neither map has any counted class is a perfect match
        self.per_image.add(np.where(image_counts > 0, image_scores / np.maximum(image_counts, 1), 1.0))

    def result(self) -> Score:
        ious = {c: self.intersections[c] / self.unions[c] for c in self.intersections if self.unions[c] > 0}
        value = float(np.mean(list(ious.values()))) if ious else 1.0
        return Score(value, self.per_image.stderr, {"iou_per_class": {str(k): v for k, v in ious.items()}})


class Segmentation(TaskMetric):
    """Mean IoU of the compressed model's masks against the original's (argmax over the class axis,
    or a threshold for a single-channel map), summed over the data set, averaged over classes."""

    name = "segmentation"
    OPTIONS = {"threshold": float, "axis": int, "output": str, "background": _flag}

    def __init__(self, spec="", options=None):
        super().__init__(spec, options)
        self.axis = self.options.get("axis", 1)
        self.classes: list[int] = []
        self.against_labels = False
        self.binary = False

    def bind(self, infos, reference, labels, counted):
        super().bind(infos, reference, labels, None)
        if "output" not in self.options:
            maps = [i for i, r in enumerate(reference) if np.ndim(r) >= 3]
            if len(maps) != 1:
                raise TnoptError(
                    f"--metric {self.spec}: expected one map output [N, C, H, W]; name it with output=NAME"
                )
            self.indices = maps
        array = np.asarray(reference[self.indices[0]])
        if array.ndim < 3:
            raise TnoptError(f"--metric {self.spec}: output has shape {array.shape}; expected a map")
        channels = array.shape[self.axis]
        self.binary = channels == 1
        if self.binary:
            if "threshold" not in self.options:
                inside = array.min() >= 0 and array.max() <= 1
                self.options["threshold"] = 0.5 if inside else 0.0
            self.classes = [1]
        else:
            background = self.options.get("background", True)
            self.classes = list(range(0 if background else 1, channels))
        if labels is not None and np.ndim(labels) >= 3:
            self.against_labels = True
        fraction = float(np.mean(self.masks(reference) > 0)) if self.binary else None
        if fraction is not None and (fraction == 0.0 or fraction == 1.0):
            self.warnings.append(
                "segmentation: the original's thresholded map is "
                f"{'empty' if fraction == 0 else 'full'} on every calibration sample "
                f"(threshold {self.options['threshold']}); IoU against it means little"
            )

    def masks(self, outputs) -> np.ndarray:
        array = np.asarray(outputs[self.indices[0]])
        if self.binary:
            return (np.take(array, 0, axis=self.axis) > self.options["threshold"]).astype(np.int64)
        return array.argmax(axis=self.axis)

    def start(self):
        return _SegmentationAccumulator(self)


# --------------------------------------------------------------------------- embedding
class _EmbeddingAccumulator:
    def __init__(self, metric):
        self.metric = metric
        self.cosines = RunningMean()

    def update(self, reference, outputs, labels=None) -> None:
        a = np.concatenate(
            [
                np.asarray(reference[i], np.float64).reshape(len(reference[i]), -1)
                for i in self.metric.indices
            ],
            axis=1,
        )
        b = np.concatenate(
            [np.asarray(outputs[i], np.float64).reshape(len(outputs[i]), -1) for i in self.metric.indices],
            axis=1,
        )
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cosines.add(np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0))

    def result(self) -> Score:
        return Score(self.cosines.mean, self.cosines.stderr)


class Embedding(TaskMetric):
    """Mean per-sample cosine of the (counted) outputs to the original's."""

    name = "embedding"
    OPTIONS = {"output": str}

    def start(self):
        return _EmbeddingAccumulator(self)


# --------------------------------------------------------------------------- plug-ins
class _PluginAccumulator:
    def __init__(self, metric):
        self.metric = metric
        self.per_sample = RunningMean()
        self.batches = RunningRatio()  # batch scores weighted by batch size
        self.kind = None

    def update(self, reference, outputs, labels=None) -> None:
        n = len(reference[0])
        raw = self.metric.fn(reference, outputs, labels)
        value = np.asarray(raw)
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise TnoptError(
                f"--metric {self.metric.spec} returned {type(raw).__name__}; expected a number "
                "or a 1-D array with one score per sample"
            )
        if value.ndim == 0:
            self.kind = "batch"
            self.batches.add([float(value) * n], [n])
        elif value.ndim == 1 and len(value) == n:
            self.kind = "per-sample"
            self.per_sample.add(value)
        else:
            raise TnoptError(
                f"--metric {self.metric.spec} returned an array of shape {value.shape} for a "
                f"batch of {n}; expected a number or shape ({n},)"
            )
        if not np.all(np.isfinite(value)):
            raise TnoptError(f"--metric {self.metric.spec} returned a non-finite score")

    def result(self) -> Score:
        if self.per_sample.n:
            return Score(self.per_sample.mean, self.per_sample.stderr, {"form": "per-sample"})
        return Score(self.batches.ratio, 0.0, {"form": "per-batch (no standard error)"})


class Plugin(TaskMetric):
    """A user callable fn(reference, outputs, labels) -> number or per-sample array; higher is better."""

    def __init__(self, spec: str, fn: Callable):
        super().__init__(spec, {})
        self.fn = fn
        self.name = spec

    def bind(self, infos, reference, labels, counted):
        super().bind(infos, reference, labels, None)
        # one small trial before any work: an ill-typed plug-in fails now, with one line
        trial = slice(0, min(4, len(reference[0])))
        accumulator = self.start()
        try:
            accumulator.update(
                [r[trial] for r in reference],
                [r[trial] for r in reference],
                None if labels is None else labels[trial],
            )
        except TnoptError:
            raise
        except Exception as exc:
            raise TnoptError(
                f"--metric {self.spec} failed on the original's outputs: {type(exc).__name__}: {exc}"
            ) from None

    def start(self):
        return _PluginAccumulator(self)

    def score(self, reference, outputs, labels=None, batch: int = METRIC_BATCH) -> Score:
        try:
            return super().score(reference, outputs, labels, batch)
        except TnoptError:
            raise
        except Exception as exc:
            raise TnoptError(f"--metric {self.spec} raised {type(exc).__name__}: {exc}") from None


def load_plugin(spec: str) -> Plugin:
    """'package.module:function' -> Plugin; one-line TnoptError when it cannot be imported or called."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute or not all(p.isidentifier() for p in module_name.split(".")):
        raise TnoptError(f"--metric {spec!r}: expected a built-in metric or package.module:function")
    added = os.getcwd() not in sys.path
    if added:  # a module beside the user's data, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TnoptError(
            f"--metric {spec}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            raise TnoptError(f"--metric {spec}: module {module_name!r} has no attribute {attribute!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TnoptError(f"--metric {spec}: {attribute!r} is {type(fn).__name__}, not a function")
    return Plugin(spec, _three_argument(fn, spec))


def _three_argument(fn: Callable, spec: str) -> Callable:
    """Accept fn(reference, outputs, labels) and the older two-argument fn(outputs, labels)."""
    try:
        parameters = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn
    if varargs or len(parameters) == 3:
        return fn
    if len(parameters) == 2:
        return lambda reference, outputs, labels: fn(outputs, labels)
    raise TnoptError(
        f"--metric {spec}: the function takes {len(parameters)} required arguments; "
        "expected fn(reference_outputs, outputs, labels)"
    )


def plugin_from_callable(fn: Callable, name: str | None = None) -> Plugin:
    name = name or getattr(fn, "__name__", "custom")
    return Plugin(name, _three_argument(fn, name))


# --------------------------------------------------------------------------- spec strings
BUILT_IN: dict[str, type[TaskMetric]] = {
    "fidelity": Fidelity,
    "detection": Detection,
    "ctc": CTC,
    "segmentation": Segmentation,
    "embedding": Embedding,
}


@dataclass
class MetricRequest:
    """What the user asked for, before the model is known: a metric spec (None = the default), the
    outputs that count, per-output axis/groups settings."""

    spec: str | Callable | None = None
    outputs: list[str] | None = None
    output_options: dict[str, OutputOptions] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.spec, str):
            parse_spec(self.spec, self.output_options)  # fail early, before any work

    def __hash__(self):  # a field of the frozen RunConfig
        options = tuple(sorted((k, repr(vars(v))) for k, v in self.output_options.items()))
        return hash(
            (self.spec if isinstance(self.spec, str) else id(self.spec), tuple(self.outputs or ()), options)
        )


def parse_spec(spec: str, output_options: dict[str, OutputOptions] | None = None):
    """'detection:iou=0.5,conf=0.25' -> Detection; 'pkg.mod:fn' -> Plugin; a legacy name -> None
    (the caller's METRICS table)."""
    name, _, rest = spec.partition(":")
    if name in BUILT_IN:
        cls = BUILT_IN[name]
        options = parse_options(rest, cls.OPTIONS, f"--metric {spec}")
        if cls is Fidelity:
            return Fidelity(spec, options, output_options)
        return cls(spec, options)
    if ":" in spec:
        return load_plugin(spec)
    return None


def known_names() -> list[str]:
    return ["top1", "agreement", "cosine", "rel-l2", *BUILT_IN, "package.module:function"]


# --------------------------------------------------------------------------- suggestions
def suggest(infos: list[OutputInfo], reference: list[np.ndarray] | None = None) -> list[str]:
    """Task metrics that the output shapes (and, with data, value ranges) point at unambiguously."""
    hints = []
    for index, info in enumerate(infos):
        shape = info.shape
        if len(shape) == 3 and isinstance(shape[1], int) and isinstance(shape[2], int):
            small, large = sorted(shape[1:])
            if 5 <= small <= 4 + 1000 and large >= 4 * small:
                rows_are_scores = True
                if reference is not None:
                    array = np.asarray(reference[index])
                    array = array if array.shape[1] == small else np.swapaxes(array, 1, 2)
                    scores = array[:, 4:]
                    rows_are_scores = (
                        scores.min() >= 0 and scores.max() <= 1 and np.abs(array[:, :4]).max() > 1
                    )
                if rows_are_scores and info.producer not in ("Softmax", "LogSoftmax"):
                    hints.append(
                        f"detection:output={info.name} ({info.name} {tuple(shape)} looks like "
                        "YOLO-style boxes + class scores)"
                    )
                    continue
        if len(shape) == 3 and info.producer in ("Softmax", "LogSoftmax"):
            hints.append(
                f"ctc:output={info.name} ({info.name} {tuple(shape)} is a per-step class "
                "distribution; blank= defaults to 0)"
            )
        elif len(shape) == 4:
            hints.append(f"segmentation:output={info.name} ({info.name} {tuple(shape)} is a map)")
    return hints


# --------------------------------------------------------------------------- collapse guard
def classifier_like(info: OutputInfo, array: np.ndarray, only_output: bool = True) -> int | None:
    """The class axis of an output whose argmax means something, else None: any output written by a
    Softmax/LogSoftmax (its last axis); [N, C >= 2] from a Sigmoid; and [N, C >= 2] logits from a
    Gemm/MatMul/Add when it is the model's only output (beside other outputs such a tensor is as likely
    a box regression or landmarks, whose argmax means nothing)."""
    if not np.issubdtype(np.asarray(array).dtype, np.floating):
        return None
    if info.producer in ("Softmax", "LogSoftmax") and np.ndim(array) >= 2 and np.shape(array)[-1] >= 2:
        return np.ndim(array) - 1
    if np.ndim(array) == 2 and np.shape(array)[1] >= 2 and info.producer in CLASSIFIER_HEADS:
        return 1 if only_output or info.producer == "Sigmoid" else None
    return None


CLASSIFIER_HEADS = ("Gemm", "MatMul", "Add", "Softmax", "LogSoftmax", "Sigmoid")


class CollapseGuard:
    """Flags a plan under which some channel group's standardised fidelity falls below
    COLLAPSE_FIDELITY, or a classifier-like output's top-1 agreement falls below COLLAPSE_AGREEMENT,
    whatever metric the budget is charged in."""

    def __init__(self, infos, reference, indices, output_options):
        self.layout = GroupLayout(infos, reference, indices, output_options)
        self.classifiers = {}
        for index in indices:
            axis = classifier_like(infos[index], reference[index], len(infos) == 1)
            if axis is not None and len(np.unique(np.asarray(reference[index]).argmax(axis=axis))) > 1:
                self.classifiers[index] = (infos[index].name, axis)

    def check(self, reference, outputs) -> tuple[list[str], dict]:
        """(reasons a plan collapsed, figures per group / classifier output)."""
        reasons, figures = [], {}
        errors = self.layout.squared_errors(reference, outputs)
        for g, group in enumerate(self.layout.groups):
            fidelity = 1.0 - float(errors[:, g].mean()) if len(errors) else 1.0
            figures[group.label] = fidelity
            if fidelity < COLLAPSE_FIDELITY:
                reasons.append(f"{group.label} standardised fidelity {fidelity:.3f} < {COLLAPSE_FIDELITY}")
        for index, (name, axis) in self.classifiers.items():
            agree = float(
                np.mean(
                    np.asarray(reference[index]).argmax(axis=axis)
                    == np.asarray(outputs[index]).argmax(axis=axis)
                )
            )
            figures[f"{name} agreement"] = agree
            if agree < COLLAPSE_AGREEMENT:
                reasons.append(f"{name} top-1 agreement {agree:.3f} < {COLLAPSE_AGREEMENT}")
        return reasons, figures
