"""The collapse guard: a channel group's fidelity or a classifier's agreement collapsing."""

from __future__ import annotations

import numpy as np

from tnopt.task_metrics._base import COLLAPSE_AGREEMENT, COLLAPSE_FIDELITY, OutputInfo
from tnopt.task_metrics.fidelity import GroupLayout


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
            if fidelity < COLLAPSE_FIDELITY and len(errors):
                # Judged against what the original's group varies by on these samples where that is
                # more than on the calibration data: a class that the calibration lines barely show
                # (its spread at the floor) and held-out lines use is not collapsed by an error small
                # beside its spread there (rec-tiny, 64+64 lines: class 57, spread 0.003 calibration,
                # 0.015 held-out, error 0.009 read as R^2 0.20 against the 0.01 floor; 0.66 against
                # its held-out spread, 98.9% argmax agreement). The calibration data: unchanged.
                here = self.layout.spread_on(reference, group)
                if here > group.spread:
                    fidelity = 1.0 - float(errors[:, g].mean()) * (group.spread / here) ** 2
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
