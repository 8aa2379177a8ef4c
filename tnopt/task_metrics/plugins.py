"""Plug-in metrics `package.module:function` and Python callables."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable

import numpy as np

from tnopt.errors import TnoptError
from tnopt.task_metrics._base import METRIC_BATCH, RunningMean, RunningRatio, Score, TaskMetric


# --------------------------------------------------------------------------- plug-ins
class _PluginAccumulator:
    def __init__(self, metric):
        self.metric = metric
        self.per_sample = RunningMean()
        self.batches = RunningRatio()  # batch scores weighted by batch size
        self.kind = None

    def update(self, reference, outputs, labels=None) -> None:
        n = len(reference[0])
        raw = self.metric.fn(reference, outputs, labels)
        value = np.asarray(raw)
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise TnoptError(
                f"--metric {self.metric.spec} returned {type(raw).__name__}; expected a number "
                "or a 1-D array with one score per sample"
            )
        if value.ndim == 0:
            self.kind = "batch"
            self.batches.add([float(value) * n], [n])
        elif value.ndim == 1 and len(value) == n:
            self.kind = "per-sample"
            self.per_sample.add(value)
        else:
            raise TnoptError(
                f"--metric {self.metric.spec} returned an array of shape {value.shape} for a "
                f"batch of {n}; expected a number or shape ({n},)"
            )
        if not np.all(np.isfinite(value)):
            raise TnoptError(f"--metric {self.metric.spec} returned a non-finite score")

    def result(self) -> Score:
        if self.per_sample.n:
            return Score(self.per_sample.mean, self.per_sample.stderr, {"form": "per-sample"})
        return Score(self.batches.ratio, 0.0, {"form": "per-batch (no standard error)"})


class Plugin(TaskMetric):
    """A user callable fn(reference, outputs, labels) -> number or per-sample array; higher is better."""

    def __init__(self, spec: str, fn: Callable):
        super().__init__(spec, {})
        self.fn = fn
        self.name = spec

    def bind(self, infos, reference, labels, counted):
        super().bind(infos, reference, labels, None)
        # one small trial before any work: an ill-typed plug-in fails now, with one line
        trial = slice(0, min(4, len(reference[0])))
        accumulator = self.start()
        try:
            accumulator.update(
                [r[trial] for r in reference],
                [r[trial] for r in reference],
                None if labels is None else labels[trial],
            )
        except TnoptError:
            raise
        except Exception as exc:
            raise TnoptError(
                f"--metric {self.spec} failed on the original's outputs: {type(exc).__name__}: {exc}"
            ) from None

    def start(self):
        return _PluginAccumulator(self)

    def score(self, reference, outputs, labels=None, batch: int = METRIC_BATCH) -> Score:
        try:
            return super().score(reference, outputs, labels, batch)
        except TnoptError:
            raise
        except Exception as exc:
            raise TnoptError(f"--metric {self.spec} raised {type(exc).__name__}: {exc}") from None


def load_plugin(spec: str) -> Plugin:
    """'package.module:function' -> Plugin; one-line TnoptError when it cannot be imported or called."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute or not all(p.isidentifier() for p in module_name.split(".")):
        raise TnoptError(f"--metric {spec!r}: expected a built-in metric or package.module:function")
    added = os.getcwd() not in sys.path
    if added:  # a module beside the user's data, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TnoptError(
            f"--metric {spec}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            raise TnoptError(f"--metric {spec}: module {module_name!r} has no attribute {attribute!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TnoptError(f"--metric {spec}: {attribute!r} is {type(fn).__name__}, not a function")
    return Plugin(spec, _three_argument(fn, spec))


def _three_argument(fn: Callable, spec: str) -> Callable:
    """Accept fn(reference, outputs, labels) and the older two-argument fn(outputs, labels)."""
    try:
        parameters = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn
    if varargs or len(parameters) == 3:
        return fn
    if len(parameters) == 2:
        return lambda reference, outputs, labels: fn(outputs, labels)
    raise TnoptError(
        f"--metric {spec}: the function takes {len(parameters)} required arguments; "
        "expected fn(reference_outputs, outputs, labels)"
    )


def plugin_from_callable(fn: Callable, name: str | None = None) -> Plugin:
    name = name or getattr(fn, "__name__", "custom")
    return Plugin(name, _three_argument(fn, name))
