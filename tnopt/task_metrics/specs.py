"""Metric spec strings (`detection:iou=0.5,conf=0.25`) and shape-based suggestions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tnopt.task_metrics._base import OutputInfo, OutputOptions, TaskMetric, parse_options
from tnopt.task_metrics.ctc import CTC
from tnopt.task_metrics.detection import Detection
from tnopt.task_metrics.fidelity import Fidelity
from tnopt.task_metrics.maps import Embedding, Segmentation
from tnopt.task_metrics.plugins import load_plugin

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
PROBABILITY_OPS = ("Softmax", "LogSoftmax", "Sigmoid")


# Ops that end a classifier or a regression head: their [N, D] output is no embedding to compare by angle.
HEAD_OPS = ("Gemm", "MatMul", "Add", "Softmax", "LogSoftmax", "Sigmoid")
MIN_EMBEDDING_WIDTH = 32


def _embedding_like(info: OutputInfo) -> bool:
    """[N, D >= 32] written by a pooling or normalisation (a sentence embedding is Div of a masked sum,
    an L2 normalisation, a ReduceMean), not by a head op."""
    width = info.shape[1]
    return isinstance(width, int) and width >= MIN_EMBEDDING_WIDTH and info.producer not in (None, *HEAD_OPS)


def suggest(infos: list[OutputInfo], reference: list[np.ndarray] | None = None) -> list[str]:
    """Task metrics that the output shapes (and, with data, value ranges) point at unambiguously."""
    hints = []
    # Beside a probability map (Softmax/Sigmoid) a map from any other op is as likely a regression
    # (MTCNN P-Net's box offsets beside its face map), whose argmax is no segmentation.
    probability_maps = {
        i for i, info in enumerate(infos) if len(info.shape) == 4 and info.producer in PROBABILITY_OPS
    }
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
        elif len(shape) == 2 and _embedding_like(info):
            hints.append(
                f"embedding:output={info.name} ({info.name} {tuple(shape)} is one vector per sample from "
                f"{info.producer}, not a classifier head: per-sample cosine)"
            )
        elif len(shape) == 4 and (index in probability_maps or not probability_maps):
            hints.append(f"segmentation:output={info.name} ({info.name} {tuple(shape)} is a map)")
    return hints
