"""`fidelity`, the default for non-classifier outputs: worst channel group's standardised R^2."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tnopt.errors import TnoptError
from tnopt.task_metrics._base import SPREAD_FLOOR, OutputOptions, RunningMean, Score, TaskMetric, parse_groups


# --------------------------------------------------------------------------- fidelity (the default)
def _channel_view(array: np.ndarray, axis: int) -> np.ndarray:
    """[N, ..., C at axis, ...] -> [N, C, rest] (float64)."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim < 2:
        return array.reshape(len(array), 1, 1)
    moved = np.moveaxis(array, axis, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


# A Softmax output holds probabilities, whose scale means something: a class that varies by less than
# this on the calibration data never carries a decision, and its round-off must not count as a collapse
# (a recognizer's 6906-class softmax has thousands of classes the data never shows).
PROBABILITY_SPREAD_FLOOR = 0.01
# Samples whose group errors are computed at once (float64 views of this many samples' outputs).
ERROR_CHUNK = 16


def _default_axis(info, array: np.ndarray) -> int | None:
    """Channel axis when the user gave none: for a Softmax output of rank >= 3 the axis it normalises
    (its classes: per-class groups, not per time step or per pixel), else 1 for rank >= 3, else none."""
    if array.ndim < 3:
        return None
    if getattr(info, "producer", None) == "Softmax" and array.size:
        for axis in (array.ndim - 1, *range(1, array.ndim - 1)):
            if np.allclose(array.sum(axis=axis), 1.0, atol=1e-3):
                return axis
    return 1


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
        self.probability_outputs = {i for i in indices if getattr(infos[i], "producer", None) == "Softmax"}
        for index in indices:
            info = infos[index]
            array = np.asarray(reference[index])
            if not np.issubdtype(array.dtype, np.floating):
                self.skipped.append(f"{info.name} (not float)")
                continue
            opts = output_options.get(info.name, OutputOptions())
            axis = opts.axis if opts.axis is not None else _default_axis(info, array)
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

    def spread_on(self, reference, group) -> float:
        """The original's spread of one group on `reference` (any samples), unfloored: only that
        group's channels are read."""
        array = np.asarray(reference[group.output])
        axis = self.axes[group.output]
        values = array if axis == -1 else np.take(array, range(group.start, group.stop), axis=axis)
        values = values.astype(np.float64)
        mean = float(values.mean()) if values.size else 0.0
        return float(np.sqrt(max(float((values * values).mean()) - mean * mean, 0.0))) if values.size else 0.0

    def _group_means(self, index: int, per_channel: np.ndarray) -> np.ndarray:
        """[n, C] per-channel means -> [n, G_index] means over each group's channels (vectorised: a
        softmax over 6906 classes is 6906 groups)."""
        members = [g for g in self.groups if g.output == index]
        starts = np.array([g.start for g in members])
        stops = np.array([g.stop for g in members])
        cumulative = np.concatenate([np.zeros((len(per_channel), 1)), np.cumsum(per_channel, axis=1)], axis=1)
        return (cumulative[:, stops] - cumulative[:, starts]) / (stops - starts)

    def _measure_spreads(self, reference) -> None:
        for index in dict.fromkeys(g.output for g in self.groups):
            members = [g for g in self.groups if g.output == index]
            values = self.view(index, reference[index])
            if values.size == 0:
                for g in members:
                    g.mean, g.spread = 0.0, 0.0
            else:
                means = self._group_means(index, values.mean(axis=2)).mean(axis=0)
                squares = self._group_means(index, (values * values).mean(axis=2)).mean(axis=0)
                for g, mean, square in zip(members, means, squares):
                    g.mean, g.spread = float(mean), float(np.sqrt(max(square - mean * mean, 0.0)))
            floor = max(SPREAD_FLOOR * max(g.spread for g in members), 1e-12)
            if index in self.probability_outputs:
                floor = max(floor, PROBABILITY_SPREAD_FLOOR)
            for g in members:
                g.spread = max(g.spread, floor)

    def squared_errors(self, reference, outputs) -> np.ndarray:
        """[n, G]: each sample's mean squared error in each group, over that group's spread squared.
        ERROR_CHUNK samples at a time: the float64 views are of one chunk, not of every output (256
        rec-tiny lines: 566 MB per view, three of them on every verified plan)."""
        columns = []
        for index in dict.fromkeys(g.output for g in self.groups):
            samples = len(reference[index])
            per_channel = []
            for start in range(0, samples, ERROR_CHUNK):
                rows = slice(start, start + ERROR_CHUNK)
                diff = self.view(index, reference[index][rows]) - self.view(index, outputs[index][rows])
                per_channel.append((diff * diff).mean(axis=2))
            if per_channel:
                columns.append(self._group_means(index, np.concatenate(per_channel)))
        if not columns:
            return np.zeros((len(reference[0]), 0))
        spreads = np.array([g.spread for g in self.groups])
        return np.concatenate(columns, axis=1) / (spreads * spreads)


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
