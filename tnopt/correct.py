"""Sequential output correction (Zhang et al.): compress layers in graph order and refit each
layer's last factor by least squares, so that fed with the activations of the already-compressed
upstream model it reproduces the original model's output of that layer:

    M, b = argmin ‖T − H·M − 1·bᵀ‖,   T: original layer output on original inputs,
                                       H: the layer's hidden activations in the compressed model.

Closed form from the accumulated Gram matrices; no gradients. Upstream errors are absorbed by the
layers after them, which is why it recovers most of what truncation loses.
"""

from __future__ import annotations

import numpy as np

from tnopt.graph import emitted_tensor
from tnopt.passes import METHODS, Factors
from tnopt.passes._linalg import refit_last_factor
from tnopt.rewrite import Choice, apply_plan


def _rows(values: np.ndarray, channel_axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def sequential_correction(original, choices: list[Choice], inputs: dict[str, np.ndarray], runtime,
                          order: dict[str, int]) -> list[Choice]:
    """Returns the choices with refitted last factors (and biases), in graph order."""
    corrected: list[Choice] = []
    reference = None
    for choice in sorted(choices, key=lambda c: order[c.layer.name]):
        spec = METHODS[choice.method].refit_spec(choice.layer)
        if spec is None:
            corrected.append(choice)
            continue
        layer = choice.layer
        model, _ = apply_plan(original, corrected + [choice])
        hidden_name = emitted_tensor(layer.name, choice.method, spec.hidden_role)
        compressed = runtime.with_outputs(model, [hidden_name])
        if reference is None:
            reference = runtime.with_outputs(original, sorted({c.layer.output_name for c in choices}))
        gram = cross = None
        batches = zip(runtime.iter_batches(compressed, inputs, output_names=[hidden_name]),
                      runtime.iter_batches(reference, inputs, output_names=[layer.output_name]))
        for (_, (hidden,)), (_, (target,)) in batches:
            h, t = _rows(hidden, spec.channel_axis), _rows(target, spec.channel_axis)
            if spec.intercept:
                h = np.concatenate([h, np.ones((len(h), 1))], axis=1)
            gram = h.T @ h if gram is None else gram + h.T @ h
            cross = h.T @ t if cross is None else cross + h.T @ t
        solution = refit_last_factor(gram, cross)
        arrays = dict(choice.factors.arrays)
        last = arrays[spec.factor_key]
        arrays[spec.factor_key] = spec.from_matrix(solution[:-1] if spec.intercept else solution, last)
        if spec.intercept:
            arrays["bias"] = solution[-1].astype(last.dtype)
        notes = dict(choice.factors.notes, corrected=True)
        corrected.append(Choice(layer, choice.method, Factors(arrays, choice.factors.rank,
                                                              choice.factors.rel_error, notes)))
    return corrected
