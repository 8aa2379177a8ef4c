"""`segmentation` (IoU of argmax or thresholded maps) and `embedding` (per-sample cosine)."""

from __future__ import annotations

import numpy as np

from tnopt.errors import TnoptError
from tnopt.task_metrics._base import RunningMean, Score, TaskMetric, _flag


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
