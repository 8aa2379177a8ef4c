"""What the task sees of a compressed model, beside the budget's metric (bench/scale.py's rows).

The scale rows charge their budget on cosine fidelity of the outputs; these checks read the same
held-out outputs as the application would, original against compressed:
- text detection (a DB probability map [N, 1, H, W]): pixels above DB's binarisation threshold 0.3,
  their IoU, and the text boxes (connected regions of ≥ MIN_BOX_PIXELS pixels, PP-OCR's box step
  without its polygon unclipping) matched one to one at IoU ≥ 0.5: recall and precision of the
  compressed model's boxes against the original's;
- text recognition (CTC scores [N, T, C]): greedy decoding of both, exact-string agreement and
  character accuracy (1 − edit distance / length of the original's string).
Run in onnxruntime, one thread, a few samples at a time (one batch of activations at once).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from scipy import ndimage

DB_THRESHOLD = 0.3  # PP-OCR's DBPostProcess `thresh`
MIN_BOX_PIXELS = 9
MATCH_IOU = 0.5


def _outputs(path, inputs: dict, batch: int) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    n = len(next(iter(inputs.values())))
    fixed = session.get_inputs()[0].shape[0] == 1
    step = 1 if fixed else batch
    return np.concatenate(
        [session.run(None, {k: v[i : i + step] for k, v in inputs.items()})[0] for i in range(0, n, step)]
    )


def _boxes(mask: np.ndarray) -> list[tuple[slice, slice]]:
    labels, _ = ndimage.label(mask)
    return [
        s
        for s in ndimage.find_objects(labels)
        if s is not None and (s[0].stop - s[0].start) * (s[1].stop - s[1].start) >= MIN_BOX_PIXELS
    ]


def _box_iou(a, b) -> float:
    h = min(a[0].stop, b[0].stop) - max(a[0].start, b[0].start)
    w = min(a[1].stop, b[1].stop) - max(a[1].start, b[1].start)
    inter = max(h, 0) * max(w, 0)

    def area(r):
        return (r[0].stop - r[0].start) * (r[1].stop - r[1].start)

    return inter / (area(a) + area(b) - inter)


def match_boxes(reference: list, candidate: list) -> int:
    """Greedy one-to-one matches at IoU ≥ MATCH_IOU (each reference box takes its best free one)."""
    used, matched = set(), 0
    for box in reference:
        best, index = 0.0, None
        for j, other in enumerate(candidate):
            if j not in used:
                iou = _box_iou(box, other)
                if iou > best:
                    best, index = iou, j
        if best >= MATCH_IOU:
            used.add(index)
            matched += 1
    return matched


def detection_check(original, compressed, evaluation: dict, batch: int = 4) -> dict:
    a = _outputs(original, evaluation, batch)[:, 0] > DB_THRESHOLD
    b = _outputs(compressed, evaluation, batch)[:, 0] > DB_THRESHOLD
    union = int((a | b).sum())
    boxes_a = boxes_b = matched = 0
    for page_a, page_b in zip(a, b):
        ra, rb = _boxes(page_a), _boxes(page_b)
        boxes_a, boxes_b, matched = boxes_a + len(ra), boxes_b + len(rb), matched + match_boxes(ra, rb)
    return {
        "map_iou": int((a & b).sum()) / union if union else 1.0,
        "boxes": boxes_a,
        "recall": matched / boxes_a if boxes_a else 1.0,
        "precision": matched / boxes_b if boxes_b else 1.0,
    }


def recognition_check(original, compressed, evaluation: dict, batch: int = 16) -> dict:
    from tnopt.task_metrics.ctc import ctc_greedy_decode, levenshtein

    texts_a = ctc_greedy_decode(_outputs(original, evaluation, batch))
    texts_b = ctc_greedy_decode(_outputs(compressed, evaluation, batch))
    exact = np.mean([x == y for x, y in zip(texts_a, texts_b)])
    chars = sum(len(x) for x in texts_a)
    edits = sum(levenshtein(x, y) for x, y in zip(texts_a, texts_b))
    return {"exact": float(exact), "char_accuracy": 1 - edits / chars if chars else 1.0}


def describe(check: dict) -> str:
    if "map_iou" in check:
        return (
            f"boxes R {check['recall']:.3f} / P {check['precision']:.3f} of {check['boxes']}, "
            f"map IoU {check['map_iou']:.3f}"
        )
    return f"strings {check['exact']:.3f} exact, chars {check['char_accuracy']:.3f}"
