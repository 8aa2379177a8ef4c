"""Sequential output correction (Zhang et al.): compress layers in graph order and refit each
layer's last factor by least squares, so that fed with the activations of the already-compressed
upstream model it reproduces the original model's output of that layer:

    M, b = argmin ‖T − H·M − 1·bᵀ‖,   T: original layer output on original inputs,
                                       H: the layer's hidden activations in the compressed model.

Closed form from the accumulated Gram matrices; no gradients. Upstream errors are absorbed by the
layers after them, which is why it recovers much of what truncation loses.
"""

from __future__ import annotations

import numpy as np

from tnopt.graph import emitted_tensor, truncate
from tnopt.passes import METHODS, Factors
from tnopt.passes._linalg import refit_last_factor
from tnopt.rewrite import Choice, apply_plan


def _rows(values: np.ndarray, channel_axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


class Corrector:
    """Refits plans against one fixed set of calibration inputs.

    The original model's layer outputs (the targets) do not depend on the plan, so they are
    captured once, on first use, and reused by every plan the search verifies; each layer's hidden
    activations come from the compressed model cut just after them."""

    def __init__(self, original, layers, inputs: dict[str, np.ndarray], runtime):
        self.original, self.inputs, self.runtime = original, inputs, runtime
        self.order = {layer.name: i for i, layer in enumerate(layers)}
        self.refittable = [
            layer
            for layer in layers
            if any(
                METHODS[m].refit_spec(layer) is not None for m in METHODS if layer.op in METHODS[m].op_types
            )
        ]
        self._targets: dict[str, np.ndarray] | None = None

    def targets(self) -> dict[str, np.ndarray]:
        if self._targets is None:
            names = sorted({layer.output_name for layer in self.refittable})
            self._targets = self.runtime.capture(self.original, names, self.inputs) if names else {}
        return self._targets

    def __call__(self, choices: list[Choice]) -> list[Choice]:
        corrected: list[Choice] = []
        for choice in sorted(choices, key=lambda c: self.order[c.layer.name]):
            spec = METHODS[choice.method].refit_spec(choice.layer)
            corrected.append(choice if spec is None else self._refit(choice, spec, corrected))
        return corrected

    def _refit(self, choice: Choice, spec, upstream: list[Choice]) -> Choice:
        layer = choice.layer
        model, _ = apply_plan(self.original, upstream + [choice])
        hidden_name = emitted_tensor(layer.name, choice.method, spec.hidden_role)
        head = self.runtime.session(truncate(model, [hidden_name]))
        target = self.targets()[layer.output_name]
        gram = cross = None
        for rows, (hidden,) in self.runtime.iter_batches(head, self.inputs):
            h, t = _rows(hidden, spec.channel_axis), _rows(target[rows], spec.channel_axis)
            if spec.intercept:
                h = np.concatenate([h, np.ones((len(h), 1))], axis=1)
            gram = h.T @ h if gram is None else gram + h.T @ h
            cross = h.T @ t if cross is None else cross + h.T @ t
        if 2 * len(gram) > _count_rows(target, spec.channel_axis):
            return choice  # too few rows per unknown: a refit would memorise the calibration set
        solution = refit_last_factor(gram, cross)
        arrays = dict(choice.factors.arrays)
        last = arrays[spec.factor_key]
        arrays[spec.factor_key] = spec.from_matrix(solution[:-1] if spec.intercept else solution, last)
        if spec.intercept:
            arrays["bias"] = solution[-1].astype(last.dtype)
        notes = dict(choice.factors.notes, corrected=True)
        return Choice(
            layer, choice.method, Factors(arrays, choice.factors.rank, choice.factors.rel_error, notes)
        )


def _count_rows(values: np.ndarray, channel_axis: int) -> int:
    return values.size // values.shape[channel_axis]
