"""`ctc`: greedy CTC decode; character accuracy = 1 - Levenshtein / reference length, exact match."""

from __future__ import annotations

import numpy as np

from tnopt.errors import DataError, TnoptError
from tnopt.task_metrics._base import METRIC_BATCH, RunningMean, RunningRatio, Score, TaskMetric, _flag


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
