"""The original model's outputs on the calibration set, taken from the statistics pass.

    statistics pass:  x ──► model ──► {layer inputs} → moments
                                 └──► model outputs ──► tap (one list per batch)
    search:           reference = concat(tap)   instead of a second whole pass over x

The statistics pass runs the original model over the calibration samples with the layers' inputs
as extra outputs; onnxruntime computes the model's own outputs in that pass anyway, so the search's
reference outputs (what every plan is scored against) come free. The search ran that pass again
(ResNet-50, 512 crops at 224²: ~20 s of a 10-minute row).

The reference must be what a plain session of the model gives: extra graph outputs can stop an
onnxruntime fusion (a node whose output is fetched is not fused away), which would change the
float rounding. So the tap is used only when it covers every calibration sample in order and its
first batch equals, bit for bit, a plain run of the model on those samples (one batch of work);
else the search runs its own pass, as before.
"""

from __future__ import annotations

import numpy as np


def tap_names(model, names: list[str]) -> list[str]:
    """`names` and then the model's outputs that are not among them: what the tapped pass fetches."""
    return list(names) + [o.name for o in model.graph.output if o.name not in names]


def tap_sink(model, names: list[str], batches: list):
    """A callable for each batch's {name: value}: appends the model's outputs (in the model's order)
    to `batches`, and removes the ones that are not among `names` from the dict."""
    outputs = [o.name for o in model.graph.output]
    extra = [o for o in outputs if o not in names]

    def sink(values: dict) -> None:
        batches.append([values[o] for o in outputs])
        for name in extra:
            del values[name]

    return sink


def tapped_reference(batches: list, model, inputs, samples: int, runtime) -> list[np.ndarray] | None:
    """The model's outputs on `inputs` (`samples` of them) from the tap's `batches`, or None when
    they cannot stand for a plain run (not every sample, or the first batch differs in any bit)."""
    if not batches:
        return None
    outputs = [np.concatenate([b[i] for b in batches]) for i in range(len(batches[0]))]
    if any(len(o) != samples for o in outputs):
        return None
    from tnopt.data import as_feeds

    first = len(batches[0][0])
    plain = runtime.run(model, as_feeds(inputs).take(slice(0, first)))
    if len(plain) != len(outputs) or not all(
        p.shape == o[:first].shape and p.dtype == o.dtype and np.array_equal(p, o[:first], equal_nan=True)
        for p, o in zip(plain, outputs)
    ):
        return None
    return outputs
