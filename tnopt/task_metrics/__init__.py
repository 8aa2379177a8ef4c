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

from tnopt.task_metrics._base import (  # noqa: F401
    COLLAPSE_AGREEMENT,
    COLLAPSE_FIDELITY,
    METRIC_BATCH,
    SPREAD_FLOOR,
    OutputInfo,
    OutputOptions,
    RunningMean,
    RunningRatio,
    Score,
    TaskMetric,
    _flag,
    _select,
    parse_groups,
    parse_options,
    parse_output_spec,
)
from tnopt.task_metrics.ctc import CTC, _CTCAccumulator, _label_sequences, ctc_greedy_decode, levenshtein  # noqa: F401
from tnopt.task_metrics.detection import (  # noqa: F401
    Detection,
    _DetectionAccumulator,
    _xywh_to_xyxy,
    box_iou,
    decode_yolo,
    detections_from,
    match_detections,
    nms,
)
from tnopt.task_metrics.fidelity import Fidelity, GroupLayout, _channel_view, _FidelityAccumulator, _Group  # noqa: F401
from tnopt.task_metrics.guard import CLASSIFIER_HEADS, CollapseGuard, classifier_like  # noqa: F401
from tnopt.task_metrics.maps import Embedding, Segmentation, _EmbeddingAccumulator, _SegmentationAccumulator  # noqa: F401
from tnopt.task_metrics.plugins import (  # noqa: F401
    Plugin,
    _PluginAccumulator,
    _three_argument,
    load_plugin,
    plugin_from_callable,
)
from tnopt.task_metrics.specs import BUILT_IN, MetricRequest, known_names, parse_spec, suggest  # noqa: F401

# The package is split by task (one module each); this namespace is the public surface.
__all__ = [
    "BUILT_IN",
    "CLASSIFIER_HEADS",
    "COLLAPSE_AGREEMENT",
    "COLLAPSE_FIDELITY",
    "CTC",
    "CollapseGuard",
    "Detection",
    "Embedding",
    "Fidelity",
    "GroupLayout",
    "METRIC_BATCH",
    "MetricRequest",
    "OutputInfo",
    "OutputOptions",
    "Plugin",
    "RunningMean",
    "RunningRatio",
    "SPREAD_FLOOR",
    "Score",
    "Segmentation",
    "TaskMetric",
    "box_iou",
    "classifier_like",
    "ctc_greedy_decode",
    "decode_yolo",
    "detections_from",
    "known_names",
    "levenshtein",
    "load_plugin",
    "match_detections",
    "nms",
    "parse_groups",
    "parse_options",
    "parse_output_spec",
    "parse_spec",
    "plugin_from_callable",
    "suggest",
]
