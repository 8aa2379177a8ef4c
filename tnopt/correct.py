"""Sequential output correction (Zhang et al.): compress layers in graph order and refit each
layer's last factor by least squares, so that fed with the activations of the already-compressed
upstream model it reproduces the original model's output of that layer:

    M, b = argmin ‖T − H·M − 1·bᵀ‖,   T: original layer output on original inputs,
                                       H: the layer's hidden activations in the compressed model.

Closed form from the accumulated Gram matrices; no gradients. Upstream errors are absorbed by the
layers after them, which is why it recovers much of what truncation loses. A `Corrector` is a
refiner (tnopt/refine.py): `corrector(plan) -> plan`.
"""

from __future__ import annotations

import functools

import numpy as np

from tnopt.errors import InternalError
from tnopt.graph import emitted_tensor, upstream_layers
from tnopt.passes import METHODS, Factors
from tnopt.passes._linalg import refit_last_factor
from tnopt.plan import Choice, Plan

# A refit needs this many rows (positions × samples) per unknown of each output column. Least
# squares on n rows and p unknowns fits its own rows with error (1 − p/n)σ² but new rows with
# (1 + p/n)σ²: the calibration data flatters it 3x at 2 rows per unknown (the old rule, under which
# MiniLM's refits on 32 sentences certified a 1% cosine drop that 32 other sentences saw as 33%),
# 1.3x at 8.
MIN_ROWS_PER_UNKNOWN = 8
# The targets (original layer outputs on the refit's samples) are kept in memory up to this size and
# reused by every refit; above it they are recomputed batch by batch beside each refit pass, so
# memory stays at one batch (one more original-model pass per refit wave instead).
MAX_HELD_TARGET_BYTES = 1 << 30
# Rows (output positions) per sample a refit keeps: far above MIN_ROWS_PER_UNKNOWN for any channel
# count once samples number in the tens, and all of them at the reference models' 28x28.
MAX_REFIT_ROWS_PER_SAMPLE = 1024


def _rows(values: np.ndarray, channel_axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


class _NormalEquations:
    """HᵀH and HᵀT of one layer's refit, accumulated batch by batch. A conv layer gives a row per
    output position: beyond MAX_REFIT_ROWS_PER_SAMPLE per sample a seeded random subset of them is
    kept, so a refit at high resolution costs what it costs at low."""

    def __init__(self, spec):
        self.spec, self.gram, self.cross, self.rows = spec, None, None, 0
        self.rng = np.random.default_rng(0)

    def add(self, hidden: np.ndarray, target: np.ndarray) -> None:
        h, t = _rows(hidden, self.spec.channel_axis), _rows(target, self.spec.channel_axis)
        keep = MAX_REFIT_ROWS_PER_SAMPLE * max(int(np.shape(hidden)[0]), 1)
        if len(h) > keep:
            chosen = np.sort(self.rng.choice(len(h), size=keep, replace=False))
            h, t = h[chosen], t[chosen]
        if self.spec.intercept:
            h = np.concatenate([h, np.ones((len(h), 1))], axis=1)
        self.gram = h.T @ h if self.gram is None else self.gram + h.T @ h
        self.cross = h.T @ t if self.cross is None else self.cross + h.T @ t
        self.rows += len(h)


class Corrector:
    """Refits plans against one fixed set of calibration inputs.

    The original model's layer outputs (the targets) do not depend on the plan, so they are
    captured once, on first use, and reused by every plan the search verifies. Each layer's hidden
    activations come from the runner: where its board runs the plan, in waves (one run, every
    layer whose upstream is already corrected refitted from it), else from the compressed model
    cut just after them (an export and a session per layer)."""

    def __init__(
        self, runner, layers, inputs: dict[str, np.ndarray], max_held_bytes: int = MAX_HELD_TARGET_BYTES
    ):
        self.runner, self.inputs = runner, inputs
        self.max_held_bytes = max_held_bytes
        self.original, self.runtime, self.methods = runner.original, runner.runtime, runner.methods
        self.order = {layer.name: i for i, layer in enumerate(layers)}
        self.refittable = [
            layer
            for layer in layers
            if any(m.refit_spec(layer) is not None for m in self.methods.values() if layer.op in m.op_types)
        ]
        self.layer_names = [layer.name for layer in layers]
        self._targets: dict[str, np.ndarray] | None = None

    @functools.cached_property
    def upstream(self) -> dict[str, set[str]]:
        """Each layer's upstream layers; only the board's waves need them (a graph import)."""
        return upstream_layers(self.original, self.layer_names)

    @staticmethod
    def hidden_tensors(choices, methods=None) -> list[str]:
        """The tensors a board must expose for these (layer, method) paths to be refitted."""
        names = []
        for choice in choices:
            spec = (methods or METHODS)[choice.method].refit_spec(choice.layer)
            if spec is not None:
                names.append(emitted_tensor(choice.layer.name, choice.method, spec.hidden_role))
        return names

    def targets(self) -> dict[str, np.ndarray]:
        if self._targets is None:
            names = sorted({layer.output_name for layer in self.refittable})
            self._targets = self.runtime.capture(self.original, names, self.inputs) if names else {}
        return self._targets

    def target_batches(self):
        """A function rows → {output name: target rows}, called once per refit batch in order: the
        held targets sliced, or the original model run beside the refit, one batch at a time. The
        first pass keeps what it computed while that stays under `max_held_bytes`."""
        if self._targets is not None:
            held = self._targets
            return lambda rows: {name: value[rows] for name, value in held.items()}
        names = sorted({layer.output_name for layer in self.refittable})
        if not names:
            return lambda rows: {}
        stream = self.runtime.iter_batches(
            self.runtime.with_outputs(self.original, names), self.inputs, names
        )
        kept: dict[str, list] | None = {name: [] for name in names}
        size = 0

        def at(rows):
            nonlocal kept, size
            got, values = next(stream)
            if (got.start, got.stop) != (rows.start, rows.stop):
                raise InternalError(f"correction: target batch {got} does not match hidden batch {rows}")
            if kept is not None:
                size += sum(v.nbytes for v in values)
                if size > self.max_held_bytes:
                    kept = None  # too big to hold: later passes recompute them too
                else:
                    for name, value in zip(names, values):
                        kept[name].append(value)
            if kept is not None and rows.stop >= _samples(self.inputs):
                self._targets = {name: np.concatenate(parts) for name, parts in kept.items()}
            return dict(zip(names, values))

        return at

    def __call__(self, plan) -> Plan:
        ordered = sorted(plan, key=lambda c: self.order[c.layer.name])
        if self.runner.expresses(ordered, self.hidden_tensors(ordered, self.methods)):
            corrected = self._on_board(ordered)
            if corrected is not None:
                return Plan(tuple(corrected))
        corrected: list[Choice] = []
        for choice in ordered:
            spec = self.methods[choice.method].refit_spec(choice.layer)
            corrected.append(choice if spec is None else self._refit_cut(choice, spec, corrected))
        return Plan(tuple(corrected))

    def _on_board(self, ordered: list[Choice]) -> list[Choice] | None:
        """Refit in waves: a layer is ready once no layer upstream of it awaits its refit; one run
        of the board (plan = corrected so far + the rest as they are) gives every ready layer's H."""
        done: dict[str, Choice] = {}
        pending = list(ordered)
        while pending:
            waiting = {c.layer.name for c in pending}
            ready = [c for c in pending if not (self.upstream[c.layer.name] & (waiting - {c.layer.name}))]
            specs = {c.layer.name: self.methods[c.method].refit_spec(c.layer) for c in ready}
            refits = [c for c in ready if specs[c.layer.name] is not None]
            if refits:
                plan = list(done.values()) + pending
                names = self.hidden_tensors(refits, self.methods)
                if not self.runner.expresses(plan, names):
                    return None
                batches = self.runner.capture(plan, names, self.inputs)
                equations = {c.layer.name: _NormalEquations(specs[c.layer.name]) for c in refits}
                targets_at = self.target_batches()
                for rows, captured in batches:
                    targets = targets_at(rows)
                    for choice, name in zip(refits, names):
                        spec = specs[choice.layer.name]
                        width = spec.to_matrix(choice.factors.arrays[spec.factor_key]).shape[0]
                        # The board runs the widest rank; the padded channels of H are zeros.
                        hidden = np.take(captured[name], np.arange(width), axis=spec.channel_axis)
                        equations[choice.layer.name].add(hidden, targets[choice.layer.output_name])
                for choice in refits:
                    done[choice.layer.name] = self._solve(choice, equations[choice.layer.name])
            for choice in ready:
                done.setdefault(choice.layer.name, choice)
            pending = [c for c in pending if c.layer.name not in done]
        return [done[c.layer.name] for c in ordered]

    def _refit_cut(self, choice: Choice, spec, upstream: list[Choice]) -> Choice:
        layer = choice.layer
        hidden_name = emitted_tensor(layer.name, choice.method, spec.hidden_role)
        targets_at = self.target_batches()
        equations = _NormalEquations(spec)
        # The one-layer-at-a-time path: each prefix of the plan exported and cut after H.
        batches = self.runner.capture(upstream + [choice], [hidden_name], self.inputs, board=False)
        for rows, captured in batches:
            equations.add(captured[hidden_name], targets_at(rows)[layer.output_name])
        return self._solve(choice, equations)

    @staticmethod
    def _solve(choice: Choice, equations: _NormalEquations) -> Choice:
        spec = equations.spec
        if MIN_ROWS_PER_UNKNOWN * len(equations.gram) > equations.rows:
            return choice  # too few rows per unknown: a refit would memorise the calibration set
        solution = refit_last_factor(equations.gram, equations.cross)
        arrays = dict(choice.factors.arrays)
        last = arrays[spec.factor_key]
        arrays[spec.factor_key] = spec.from_matrix(solution[:-1] if spec.intercept else solution, last)
        if spec.intercept:
            arrays["bias"] = solution[-1].astype(last.dtype)
        notes = dict(choice.factors.notes, corrected=True)
        return choice.with_factors(Factors(arrays, choice.factors.rank, choice.factors.rel_error, notes))


def _samples(inputs) -> int:
    from tnopt.data import as_feeds

    return as_feeds(inputs).samples()
