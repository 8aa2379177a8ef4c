"""Which task metric a run without --metric charges, when the output says unambiguously what the task is.

Why the default is the task metric for these outputs (and `fidelity` otherwise): a per-channel fidelity
has to count every value the output holds, the task does not. On a YOLO-style detector the box rows at
background anchors and score changes far below the confidence threshold are most of the output and none
of the task: the bench (bench/RESULTS.md, issue 14) measured the worst-group fidelity default at 1.46x
FLOPs where the detection metric reached 5.20x at a 0.32-point held-out F1 drop, and no aggregation of
group R^2 (worst, mean) came near it. A CTC recognizer is the opposite case: its characters are a few
time steps of a mostly-blank sequence, so a pooled or per-step R^2 lets whole characters go (text-ctc:
0.77 points lost at 1% where the ctc metric lost 0.41). Where the output layout and its values on the
calibration data leave no doubt, the default is therefore the task's own decision metric, compared
against the original's decisions; the collapse guard (every channel group's standardised fidelity) still
checks every plan, so a plan that destroys what the task metric does not read is still rejected.

Recognised (only when it is the one counted output, so no other output goes unmeasured):

* detection: rank 3, [N, 4+C, A] or [N, A, 4+C] with 1 <= C and A >= 4 (4+C), the score rows/columns
  within [0, 1] on the calibration data, the box rows not (pixels, |value| > 1), not a Softmax, and the
  original detecting at least MIN_DETECTIONS objects at the default confidence on the calibration data
  (fewer, and one lost detection would be worth more than a budget).
* ctc: rank 3 [N, T, C] written by Softmax/LogSoftmax over its last axis, T >= MIN_STEPS, and one class
  the argmax at >= BLANK_SHARE of all calibration steps (CTC's blank; it becomes blank=), and the
  original's greedy decode holding at least MIN_CHARACTERS characters.

* a probability map: rank 4 [N, 1, H, W] written by a Sigmoid, H x W >= 64, whose map at 0.5 is
  neither empty nor full on the calibration data. The default is the IoU of the thresholded map against
  the original's at 0.3, 0.5 and 0.7, charged on the worst: the user's threshold is not in the model
  (PP-OCR's text detector uses 0.3), and the bench showed why a fidelity R^2 is not enough here: det-tiny
  at a 1.3% loss of the map's R^2 lost 3.5 points of IoU at 0.3 (boundary pixels are few and all of the
  task).

Anything else keeps the `fidelity` default, the safe rule for outputs nobody recognised.
"""

from __future__ import annotations

import numpy as np

from tnopt.errors import TnoptError
from tnopt.task_metrics._base import OutputInfo, Score, TaskMetric
from tnopt.task_metrics.ctc import CTC
from tnopt.task_metrics.detection import Detection
from tnopt.task_metrics.maps import Segmentation

MIN_DETECTIONS = 20
MIN_STEPS = 4
MIN_CHARACTERS = 20
BLANK_SHARE = 0.5
MAP_THRESHOLDS = (0.3, 0.5, 0.7)
MIN_MAP_PIXELS = 64


class _WorstOfAccumulator:
    def __init__(self, parts, thresholds):
        self.parts, self.thresholds = parts, thresholds

    def update(self, reference, outputs, labels=None) -> None:
        for part in self.parts:
            part.update(reference, outputs, labels)

    def result(self) -> Score:
        scores = [part.result() for part in self.parts]
        worst = min(range(len(scores)), key=lambda i: scores[i].value)
        iou_at = {str(t): s.value for t, s in zip(self.thresholds, scores)}
        return Score(
            scores[worst].value, scores[worst].stderr, {"iou_at": iou_at, "worst": self.thresholds[worst]}
        )


class ProbabilityMapIoU(Segmentation):
    """IoU of a single-channel probability map thresholded at each of MAP_THRESHOLDS against the
    original's, the worst of them (the default for a recognised probability map)."""

    def __init__(self, output: str, thresholds=MAP_THRESHOLDS):
        listed = "|".join(f"{t:g}" for t in thresholds)
        super().__init__(f"segmentation:output={output} (IoU at {listed}, worst)", {"output": output})
        self.options["thresholds"] = listed  # names it apart from plain segmentation in the cache
        self.thresholds = tuple(thresholds)
        self.parts = [
            Segmentation(f"segmentation:threshold={t}", {"output": output, "threshold": t})
            for t in thresholds
        ]

    def bind(self, infos, reference, labels, counted):
        super().bind(infos, reference, None, None)
        for part in self.parts:
            part.bind(infos, reference, None, None)

    def start(self):
        return _WorstOfAccumulator([part.start() for part in self.parts], self.thresholds)


def _yolo_layout(info: OutputInfo, array: np.ndarray) -> str | None:
    """'channels_first' / 'channels_last' when the array looks like YOLO boxes + class scores."""
    if array.ndim != 3 or info.producer in ("Softmax", "LogSoftmax"):
        return None
    small, large = sorted(array.shape[1:])
    if not (5 <= small and large >= 4 * small):
        return None
    layout = "channels_first" if array.shape[1] == small else "channels_last"
    rows = array if layout == "channels_first" else np.swapaxes(array, 1, 2)
    scores, boxes = rows[:, 4:], rows[:, :4]
    if scores.size == 0 or scores.min() < 0 or scores.max() > 1 or np.abs(boxes).max() <= 1:
        return None
    return layout


def _ctc_blank(info: OutputInfo, array: np.ndarray) -> int | None:
    if array.ndim != 3 or info.producer not in ("Softmax", "LogSoftmax"):
        return None
    if array.shape[1] < MIN_STEPS or array.shape[2] < 2:
        return None
    counts = np.bincount(array.argmax(axis=-1).reshape(-1), minlength=array.shape[2])
    blank = int(counts.argmax())
    return blank if counts[blank] >= BLANK_SHARE * counts.sum() else None


def recognise_task(infos: list[OutputInfo], reference, indices: list[int]) -> tuple[TaskMetric, str] | None:
    """(a bound task metric, why) when the one counted output is unambiguously a YOLO-style detector, a
    CTC recognizer or a probability map on this calibration data, else None."""
    if len(indices) != 1:
        return None
    index = indices[0]
    info, array = infos[index], np.asarray(reference[index])
    if not np.issubdtype(array.dtype, np.floating) or array.ndim not in (3, 4) or len(array) == 0:
        return None
    if array.ndim == 4:
        return _recognised_map(infos, reference, index)
    layout = _yolo_layout(info, array)
    if layout is not None:
        metric = Detection(f"detection:output={info.name}", {"output": info.name, "layout": layout})
        metric.bind(infos, reference, None, None)
        found = sum(len(d) for d in metric.detect(reference))
        if found >= MIN_DETECTIONS:
            shape = tuple(array.shape[1:])
            return metric, (
                f"{info.name} [N, {shape[0]}, {shape[1]}] is a YOLO-style detector output (score rows in "
                f"0..1, box rows in pixels; the original finds {found} objects in the calibration data): "
                f"detection F1 against the original's detections (IoU {metric.iou}, conf {metric.conf}, NMS "
                f"{metric.nms_iou}); every channel group's fidelity is still guarded against collapse"
            )
    blank = _ctc_blank(info, array)
    if blank is not None:
        metric = CTC(f"ctc:output={info.name},blank={blank}", {"output": info.name, "blank": blank})
        try:
            metric.bind(infos, reference, None, None)
        except TnoptError:
            return None
        characters = sum(len(text) for text in metric.decode(reference))
        if characters < MIN_CHARACTERS:  # (almost) empty text: character accuracy would measure nothing
            return None
        return metric, (
            f"{info.name} [N, {array.shape[1]}, {array.shape[2]}] is a per-step class distribution whose "
            f"argmax is class {blank} at most steps (CTC's blank; the original reads {characters} characters "
            "in the calibration data): character accuracy of the greedy CTC "
            "decode against the original's text; every channel group's fidelity is still guarded against "
            "collapse"
        )
    return None


def _recognised_map(infos, reference, index) -> tuple[TaskMetric, str] | None:
    info, array = infos[index], np.asarray(reference[index])
    if info.producer != "Sigmoid" or array.shape[1] != 1 or array.shape[2] * array.shape[3] < MIN_MAP_PIXELS:
        return None
    share = float(np.mean(array > 0.5))
    if not 0.0 < share < 1.0:  # empty or full at 0.5: IoU against it would measure nothing
        return None
    metric = ProbabilityMapIoU(info.name)
    metric.bind(infos, reference, None, None)
    return metric, (
        f"{info.name} [N, 1, {array.shape[2]}, {array.shape[3]}] is a probability map (Sigmoid; "
        f"{100 * share:.1f}% of calibration pixels above 0.5): IoU of the thresholded map against the "
        f"original's at {', '.join(f'{t:g}' for t in MAP_THRESHOLDS)}, the worst of them; every channel "
        "group's fidelity is still guarded against collapse"
    )
