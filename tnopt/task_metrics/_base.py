"""Shared pieces of the task metrics: scores, running statistics, option parsing, the metric base."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from tnopt.errors import TnoptError

METRIC_BATCH = 64
# A channel group whose standardised fidelity falls below this (R^2; standardised relative L2 > 0.71)
# has collapsed: it carries less than half of what the original's group varies by.
COLLAPSE_FIDELITY = 0.5
# A classifier-like output whose top-1 agrees with the original's on fewer than this fraction of
# samples (or positions) has collapsed.
COLLAPSE_AGREEMENT = 0.5
# A group's spread is floored at this fraction of its output's largest group spread: a constant
# channel (a padding channel) would otherwise turn round-off into a "collapse" of a channel the task
# never reads. Small enough that score rows 400x smaller than box rows still count in full.
SPREAD_FLOOR = 1e-3


@dataclass
class Score:
    value: float
    stderr: float = 0.0
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- running statistics
class RunningMean:
    """Mean and its standard error of per-sample values, from running sums (O(1) memory)."""

    def __init__(self):
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, values) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        self.n += len(values)
        self.total += float(values.sum())
        self.squares += float((values * values).sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    @property
    def stderr(self) -> float:
        if self.n < 2:
            return 0.0
        variance = max(self.squares - self.total * self.total / self.n, 0.0) / (self.n - 1)
        return math.sqrt(variance / self.n)


class RunningRatio:
    """R = sum(x) / sum(y) over samples, with its delta-method standard error (O(1) memory):
    se(R) = sqrt(sum((x_i - R y_i)^2) / (n (n - 1))) / mean(y)."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def add(self, x, y) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        self.n += len(x)
        self.sx += float(x.sum())
        self.sy += float(y.sum())
        self.sxx += float((x * x).sum())
        self.syy += float((y * y).sum())
        self.sxy += float((x * y).sum())

    @property
    def ratio(self) -> float:
        return self.sx / self.sy if self.sy else float("nan")

    @property
    def stderr(self) -> float:
        if self.n < 2 or not self.sy:
            return 0.0
        r = self.ratio
        residual = max(self.sxx - 2 * r * self.sxy + r * r * self.syy, 0.0)
        return math.sqrt(residual / (self.n * (self.n - 1))) / (self.sy / self.n)


# --------------------------------------------------------------------------- options
def parse_options(text: str, allowed: dict[str, type], what: str) -> dict:
    """'iou=0.5,conf=0.25' -> {'iou': 0.5, 'conf': 0.25}, each converted by allowed[key]."""
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            known = ", ".join(f"{k}=" for k in allowed) or "none"
            raise TnoptError(f"{what}: unknown option {part!r} (options: {known})")
        try:
            options[key] = allowed[key](value.strip())
        except ValueError:
            raise TnoptError(
                f"{what}: option {key}={value!r} is not a valid {allowed[key].__name__}"
            ) from None
    return options


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_flag.__name__ = "flag (0/1)"


def parse_groups(text: str, channels: int | None = None) -> list[tuple[int, int]]:
    """'0-3,4-' -> [(0, 4), (4, channels)]: inclusive ranges, an open end runs to the last channel."""
    groups = []
    for part in filter(None, (p.strip() for p in text.split("|" if "|" in text else ","))):
        match = re.fullmatch(r"(\d+)(?:-(\d*))?", part)
        if not match:
            raise TnoptError(f"channel group {part!r} is not N, N-M or N- (e.g. groups=0-3,4-)")
        start = int(match.group(1))
        if match.group(2) is None:
            stop = start + 1
        elif match.group(2) == "":
            stop = channels if channels is not None else -1
        else:
            stop = int(match.group(2)) + 1
        if stop != -1 and stop <= start:
            raise TnoptError(f"channel group {part!r} is empty")
        groups.append((start, stop))
    return groups


@dataclass
class OutputOptions:
    """Per-output settings of the fidelity metric and the collapse guard: `NAME:axis=K,groups=...`."""

    axis: int | None = None
    groups: str | None = None


def parse_output_spec(text: str) -> tuple[str, OutputOptions]:
    """'output0:axis=1' / 'output0:groups=0-3,4-' / 'output0:axis=2,groups=0-3|4-'."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise TnoptError(f"--output-spec {text!r}: expected NAME:axis=K or NAME:groups=0-3,4-")
    options = OutputOptions()
    # groups may itself contain commas: everything after 'groups=' belongs to it
    head, gsep, groups = rest.partition("groups=")
    if gsep:
        options.groups = groups.strip()
        parse_groups(options.groups)
    for key, value in parse_options(head.rstrip(", "), {"axis": int}, f"--output-spec {text!r}").items():
        setattr(options, key, value)
    return name, options


# --------------------------------------------------------------------------- what the metric sees
@dataclass
class OutputInfo:
    """What binding a metric needs to know about one model output."""

    name: str
    shape: tuple  # as run on the calibration data
    producer: str | None = None


def _select(outputs, indices):
    return [outputs[i] for i in indices]


class TaskMetric:
    """Base of the streaming metrics. Subclasses implement start() and bind()."""

    name = "task"
    higher_is_better = True
    needs_labels = False

    def __init__(self, spec: str = "", options: dict | None = None):
        self.spec = spec or self.name
        self.options = dict(options or {})
        self.reason = ""
        self.warnings: list[str] = []
        self.suggestions: list[str] = []
        self.guard = None  # the CollapseGuard, set when the metric is chosen for a run
        self.indices: list[int] = []  # which model outputs this metric reads
        self.output_names: list[str] = []
        self._memo = None

    # -- binding to a model and its calibration outputs ----------------------------------------------
    def bind(self, infos: list[OutputInfo], reference: list[np.ndarray], labels, counted: list[str] | None):
        """Check the metric fits these outputs (raise TnoptError with one line if not) and fix
        whatever it derives from the calibration data. `counted` are the outputs the user cares about."""
        wanted = self.options.get("output")
        names = [i.name for i in infos]
        if wanted is not None:
            if wanted not in names:
                raise TnoptError(
                    f"--metric {self.spec}: the model has no output {wanted!r} ({', '.join(names)})"
                )
            self.indices = [names.index(wanted)]
        elif counted:
            self.indices = [names.index(n) for n in counted]
        else:
            self.indices = list(range(len(infos)))
        self.output_names = [names[i] for i in self.indices]

    @property
    def cache_key(self) -> str:
        """Names this metric and its settings in the sensitivity cache (same spec, same numbers)."""
        import hashlib

        extra = repr(
            (
                sorted(self.options.items()),
                self.output_names,
                sorted((k, vars(v)) for k, v in getattr(self, "output_options", {}).items()),
            )
        )
        digest = hashlib.sha256(extra.encode()).hexdigest()[:8]
        return f"{self.name.replace(':', '_').replace('/', '_')}-{digest}"

    # -- streaming -----------------------------------------------------------------------------------
    def start(self):
        raise NotImplementedError

    def score(self, reference, outputs, labels=None, batch: int = METRIC_BATCH) -> Score:
        # search.evaluate asks for the value and then the standard error of the same arrays
        if self._memo is not None and self._memo[0] is reference and self._memo[1] is outputs:
            return self._memo[2]
        accumulator = self.start()
        n = len(reference[0])
        for begin in range(0, n, batch):
            chunk = slice(begin, begin + batch)
            accumulator.update(
                [r[chunk] for r in reference],
                [o[chunk] for o in outputs],
                None if labels is None else labels[chunk],
            )
        result = accumulator.result()
        self._memo = (reference, outputs, result)
        return result

    def __call__(self, reference, outputs, labels=None) -> float:
        return self.score(reference, outputs, labels).value

    def standard_error(self, reference, outputs, labels=None) -> float:
        return self.score(reference, outputs, labels).stderr

    def drop(self, value: float, baseline: float, drop_type: str = "absolute") -> float:
        loss = baseline - value if self.higher_is_better else value - baseline
        if drop_type == "relative" and self.higher_is_better and baseline != 0:
            return loss / abs(baseline)
        return loss
