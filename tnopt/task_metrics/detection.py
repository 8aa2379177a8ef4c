"""`detection`: YOLO-style decode, confidence threshold, per-class NMS, micro-F1 at IoU 0.5."""

from __future__ import annotations

import numpy as np

from tnopt.errors import TnoptError
from tnopt.task_metrics._base import RunningRatio, Score, TaskMetric, _flag


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
