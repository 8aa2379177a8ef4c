"""A plug-in task metric for MTCNN R-Net and O-Net (`--metric onet_task:agreement`), as a user writes one.

O-Net scores a 48x48 crop: `box_offsets` [N, 4] (refinement of the crop box, in crop sizes), `landmarks`
[N, 10] (5 points, x then y, in crop sizes) and `face_prob` [N, 2] (softmax: non-face, face). MTCNN keeps a
crop as a face when face_prob >= 0.7 (its default third-stage threshold), then moves the box and reads the
landmarks. Per crop, the compressed model agrees with the original when it takes the same face decision
and, for a face, its refined box overlaps the original's at IoU >= 0.8 and its landmarks are within 3% of
the crop size on average. R-Net scores a 24x24 crop with `box_offsets` and `face_prob` only, at the same
threshold (0.7, the second stage's): the same test without landmarks. Returns one score per sample, so
tnopt also gets the standard error.
"""

import numpy as np

FACE_THRESHOLD = 0.7


def _refined_boxes(offsets):
    unit = np.array([0.0, 0.0, 1.0, 1.0])
    return unit[None, :] + offsets  # crop box (0, 0, 1, 1) moved by the offsets, in crop units


def _iou(a, b):
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area = lambda box: np.clip(box[:, 2] - box[:, 0], 0, None) * np.clip(box[:, 3] - box[:, 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def agreement(reference, outputs, labels):
    if len(reference) == 2:  # R-Net: no landmarks
        (ref_offsets, ref_prob), (offsets, prob) = reference, outputs
        ref_marks = marks = np.zeros((len(ref_prob), 10))
    else:
        ref_offsets, ref_marks, ref_prob = reference
        offsets, marks, prob = outputs
    ref_face = ref_prob[:, 1] >= FACE_THRESHOLD
    face = prob[:, 1] >= FACE_THRESHOLD
    box_ok = _iou(_refined_boxes(ref_offsets), _refined_boxes(offsets)) >= 0.8
    marks_ok = np.abs(ref_marks - marks).mean(axis=1) <= 0.03
    return ((ref_face == face) & (~ref_face | (box_ok & marks_ok))).astype(float)
