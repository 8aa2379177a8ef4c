"""Which metric a run charges its budget in, and whether that metric can mean anything.

`choose` turns the user's request (a name, a spec string, a callable, or a MetricRequest with counted
outputs and per-output channel settings) into a metric bound to the model's outputs and the
calibration data, with a one-line `reason`, loud `warnings` where the budget would be meaningless,
`suggestions` of task metrics the output shapes point at, and the collapse `guard` every plan is
checked against. Errors that make the budget meaningless (top1 without labels, labels that do not fit
the output) are raised here, before any work.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tnopt.errors import DataError, TnoptError
from tnopt.task_metrics import (
    CLASSIFIER_HEADS,
    CollapseGuard,
    MetricRequest,
    OutputInfo,
    TaskMetric,
    classifier_like,
    known_names,
    parse_spec,
    plugin_from_callable,
    suggest,
)
from tnopt.task_metrics.recognise import recognise_task


def output_infos(model, reference_outputs) -> list[OutputInfo]:
    """Name, calibration shape and producing op of each model output."""
    if model is None:
        return [OutputInfo(f"output{i}", tuple(np.shape(r))) for i, r in enumerate(reference_outputs)]
    producers = {}
    for node in model.graph.node:
        for name in node.output:
            producers[name] = node.op_type
    return [
        OutputInfo(value.name, tuple(np.shape(r)), producers.get(value.name))
        for value, r in zip(model.graph.output, reference_outputs)
    ]


def _counted(request: MetricRequest, infos: list[OutputInfo]) -> list[str] | None:
    names = [i.name for i in infos]
    for name in list(request.outputs or []) + list(request.output_options):
        if name not in names:
            raise TnoptError(f"the model has no output {name!r} (outputs: {', '.join(names)})")
    return list(request.outputs) if request.outputs else None


def choose(metric, labels, synthetic: bool, reference_outputs, head_op, model=None):
    from tnopt.metrics import METRICS, Metric

    request = (
        metric
        if isinstance(metric, MetricRequest)
        else MetricRequest(None if isinstance(metric, (Metric, TaskMetric)) else metric)
    )
    infos = output_infos(model, reference_outputs)
    if model is None and infos:
        infos[0].producer = head_op
    counted = _counted(request, infos)
    indices = [i for i, info in enumerate(infos) if counted is None or info.name in counted]
    if labels is not None and len(labels) != len(reference_outputs[0]):
        raise DataError(f"'labels' has {len(labels)} entries for {len(reference_outputs[0])} samples")

    spec = metric if isinstance(metric, (Metric, TaskMetric)) else request.spec
    if isinstance(spec, (Metric, TaskMetric)):
        chosen = spec
        chosen.reason = chosen.reason or "given by the caller"
    elif callable(spec):
        chosen = plugin_from_callable(spec)
        chosen.reason = "the caller's function"
    elif spec is None:
        chosen = _default(labels, infos, reference_outputs, indices, request)
    else:
        chosen = parse_spec(spec, request.output_options)
        if chosen is None:
            if spec not in METRICS:
                raise TnoptError(f"unknown metric {spec!r}; choose from {', '.join(known_names())}")
            chosen = dataclasses.replace(METRICS[spec], warnings=[], suggestions=[])
        chosen.reason = f"--metric {spec}"

    if isinstance(chosen, TaskMetric):
        chosen.bind(infos, reference_outputs, labels, counted)
    else:
        _check_legacy(chosen, labels, synthetic, infos, reference_outputs, indices)
    chosen.guard = CollapseGuard(infos, reference_outputs, indices, request.output_options)
    if chosen.name not in ("detection", "ctc", "segmentation"):
        chosen.suggestions = suggest(infos, reference_outputs)
    if chosen.name == "cosine":
        _warn_if_cosine_is_blind(chosen)
    return chosen


def _default(labels, infos, reference, indices, request):
    from tnopt.metrics import METRICS
    from tnopt.task_metrics import Fidelity

    if labels is not None:
        chosen = dataclasses.replace(METRICS["top1"], warnings=[], suggestions=[])
        chosen.reason = "labels given: top-1 accuracy against them"
        return chosen
    # agreement reads one output: the default only where that one output is all that counts
    classifiers = [
        i
        for i in indices
        if np.ndim(reference[i]) == 2 and classifier_like(infos[i], reference[i], len(infos) == 1)
    ]
    constant = [i for i in classifiers if len(np.unique(np.asarray(reference[i]).argmax(axis=1))) == 1]
    if len(indices) == 1 and indices[0] == 0 and classifiers == indices and not constant:
        chosen = dataclasses.replace(METRICS["agreement"], warnings=[], suggestions=[])
        chosen.reason = "classifier output: top-1 agreement with the original"
        return chosen
    # a YOLO-style detector or CTC recognizer output: its task metric (why: tnopt/task_metrics/recognise.py)
    recognised = None if request.output_options else recognise_task(infos, reference, indices)
    if recognised is not None:
        chosen, chosen.reason = recognised
        return chosen
    chosen = Fidelity("fidelity", {}, request.output_options)
    why = "not every counted output is a classifier or a recognised detector / CTC output"
    if constant:
        why = (
            f"the original predicts one class on every calibration sample for "
            f"{', '.join(infos[i].name for i in constant)}, so top-1 agreement could not see damage"
        )
    chosen.reason = (
        f"{why}: worst channel group's standardised fidelity (R^2 against the original, each "
        "group scaled by its own spread on the calibration data)"
    )
    return chosen


def _check_legacy(chosen, labels, synthetic, infos, reference, indices) -> None:
    """Sanity of the classifier metrics: errors before any work, or loud warnings."""
    if chosen.needs_labels and labels is None:
        raise DataError(f"--metric {chosen.name} needs labels: add a 'labels' array to the data file")
    if synthetic and chosen.name == "top1":
        raise DataError("top1 cannot be measured on random inputs; pass --data with labels")
    first = np.asarray(reference[0])
    if chosen.name == "top1":
        if first.ndim != 2 or first.shape[1] < 2:
            raise DataError(f"top1 needs an [N, classes] output; {infos[0].name} has shape {first.shape}")
        classes = first.shape[1]
        if labels.min() < 0 or labels.max() >= classes:
            raise DataError(
                f"'labels' range {int(labels.min())}..{int(labels.max())} does not fit the {classes} classes "
                f"of {infos[0].name}"
            )
        accuracy = float(np.mean(first.argmax(axis=1) == labels))
        chance = float(np.bincount(labels, minlength=classes).max() / len(labels))
        resolution = 2 * math.sqrt(max(chance * (1 - chance), 1e-12) / len(labels))
        if accuracy <= chance + resolution:
            chosen.warnings.append(
                f"the original's top1 on the calibration data is {accuracy:.3f}, no better than guessing the "
                f"most common label ({chance:.3f}): the labels may not belong to this data or output, and a "
                "budget on top1 is meaningless"
            )
    if chosen.name in ("top1", "agreement") and first.ndim == 2 and first.shape[1] >= 2:
        if len(np.unique(first.argmax(axis=1))) == 1:
            chosen.warnings.append(
                f"the original predicts class {int(first[0].argmax())} on every calibration sample: "
                f"{chosen.name} is trivially stable and cannot see damage; "
                "use --metric fidelity or a task metric"
            )
    if chosen.name == "agreement" and not (first.ndim == 2 and first.shape[1] >= 2):
        chosen.warnings.append(
            f"agreement takes the argmax of the last axis of {infos[0].name} {first.shape}, which is not a "
            "classifier output; the budget may not measure the task"
        )


def _warn_if_cosine_is_blind(chosen) -> None:
    spreads = [(g.label, g.spread) for g in chosen.guard.layout.groups]
    if len(spreads) < 2:
        return
    (small_label, small), (large_label, large) = (
        min(spreads, key=lambda s: s[1]),
        max(spreads, key=lambda s: s[1]),
    )
    if large > 10 * small:
        chosen.warnings.append(
            f"whole-output cosine is dominated by {large_label} (spread {large:.3g}), "
            f"{large / small:.0f}x the spread of {small_label}: damage to the small group is invisible to it"
        )


def announce(chosen) -> list[str]:
    """Lines for the start of a run: which metric is charged and why, then its warnings."""
    lines = [f"metric: {getattr(chosen, 'spec', chosen.name)} ({chosen.reason})"]
    # A suggestion of the metric the run already charges is noise (MiniLM under --metric embedding).
    suggestions = [s for s in chosen.suggestions if s.split(":")[0] != chosen.name]
    lines += [f"note: task metrics that fit these outputs: --metric {s}" for s in suggestions]
    lines += [f"warning: {w}" for w in chosen.warnings]
    return lines


# Fewer changed predictions than this within the budget: the gate cannot tell a good plan from luck.
MIN_FLIPS_ALLOWED = 3


def flips_allowed(samples: int, max_drop: float) -> int:
    """The most changed predictions among `samples` that a plan may make and still pass an absolute
    `max_drop` on top-1 / agreement: k/n plus its standard error, ≈ √k/n, within the budget."""
    k = 0
    while (k + 1) / samples + math.sqrt(k + 1) / samples <= max_drop:
        k += 1
    return k


def resolution_warning(metric_name: str, samples: int, max_drop: float, drop_type: str) -> str | None:
    """A warning when the calibration data is too small to resolve the budget on a per-prediction
    metric (EfficientNet-Lite0, 128 crops at 1%: one changed prediction is 0.78 points, and with its
    standard error no plan that changes any can pass — the run kept every layer, and said only that
    each 'exceeds the budget')."""
    if metric_name not in ("top1", "agreement") or drop_type != "absolute" or samples <= 0 or max_drop <= 0:
        return None  # a zero budget asks for no changed prediction at all: nothing to resolve
    allowed = flips_allowed(samples, max_drop)
    if allowed >= MIN_FLIPS_ALLOWED:
        return None
    needed = math.ceil((MIN_FLIPS_ALLOWED + math.sqrt(MIN_FLIPS_ALLOWED)) / max_drop)
    return (
        f"{samples} calibration samples: one changed prediction is {100 / samples:.2f} points of "
        f"{metric_name}, and with its standard error a {max_drop:g} budget lets a plan change at most "
        f"{allowed} of them; give --data at least {needed} samples, or expect little or no compression"
    )


def output_figures(model, reference, outputs, request=None) -> tuple[list[str], dict[str, float]]:
    """For the validation table and JSON (also under fixed ranks): each counted output's worst group
    fidelity and classifier agreement, and why the plan collapsed (empty when it did not)."""
    request = request if isinstance(request, MetricRequest) else MetricRequest(None)
    infos = output_infos(model, reference)
    counted = _counted(request, infos)
    indices = [i for i, info in enumerate(infos) if counted is None or info.name in counted]
    guard = CollapseGuard(infos, reference, indices, request.output_options)
    reasons, figures = guard.check(reference, outputs)
    summary: dict[str, float] = {}
    for group in guard.layout.groups:
        key = f"fidelity[{infos[group.output].name}]"
        summary[key] = min(summary.get(key, math.inf), figures[group.label])
    for key, value in figures.items():
        if key.endswith(" agreement"):
            summary[key] = value
    return reasons, summary


def describe_default(model) -> list[str]:
    """For `tnopt inspect`: the metric a run without --metric would charge, from the output shapes
    alone (with labels in the data it is top1), and task metrics the shapes suggest."""
    infos = []
    producers = {name: node.op_type for node in model.graph.node for name in node.output}
    for value in model.graph.output:
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim
        )
        infos.append(OutputInfo(value.name, dims, producers.get(value.name)))
    classifier = (
        len(infos) == 1
        and len(infos[0].shape) == 2
        and isinstance(infos[0].shape[1], int)
        and infos[0].shape[1] >= 2
        and infos[0].producer in CLASSIFIER_HEADS
    )
    shapes = ", ".join(f"{i.name} {list(i.shape)}" for i in infos)
    if classifier:
        lines = [f"metric without --metric: top1 with labels, else agreement ({shapes}: classifier output)"]
    else:
        lines = [
            f"metric without --metric: fidelity, the worst channel group's standardised R^2 ({shapes}: "
            "not every output is a classifier; channel axis 1 for rank >= 3, one group per channel)"
        ]
        if len(infos) == 1 and len(infos[0].shape) in (3, 4):
            lines[0] += (
                "; unless the calibration data shows a YOLO-style detector (score rows in 0..1, boxes in "
                "pixels), a CTC recognizer (a Softmax whose argmax is mostly one class, the blank) or a "
                "Sigmoid probability map [N, 1, H, W]: then that task metric, decided at the start of the run"
            )
    lines += [f"suggested task metric: --metric {hint}" for hint in suggest(infos)]
    return lines


def smooth_proxy(metric, reference, outputs) -> float:
    """The additive error the allocation ranks layers by. For the classifier metrics the squared
    relative L2 of the whole output (as before); for fidelity, task metrics and plug-ins the mean over
    channel groups of the standardised squared error, so that a layer that only hurts a small-valued
    group (the class scores beside pixel boxes) is not ranked as harmless."""
    from tnopt.metrics import rel_l2

    guard = getattr(metric, "guard", None)
    if isinstance(metric, TaskMetric) and guard is not None and guard.layout.groups:
        return float(guard.layout.squared_errors(reference, outputs).mean())
    return rel_l2(reference, outputs) ** 2


def add_output_figures(report, original, reference, outputs, metric, say) -> None:
    """Every counted output's worst channel-group fidelity (and classifier agreement) in the report's
    table and JSON, budget or not; a collapse is flagged loudly."""
    collapsed, figures = output_figures(original, reference, outputs, metric)
    infos = output_infos(original, reference)
    if (
        "agreement" in report.metrics
        and infos
        and classifier_like(infos[0], reference[0], len(infos) == 1) is None
    ):
        # The generic agreement is the argmax of the first output's last axis: of a box regression or
        # an embedding it means nothing, and beside the charged metric it read as a loss (MTCNN R-Net:
        # "agreement 0.9531" of its box offsets while the face decisions agreed on every crop).
        del report.metrics["agreement"]
    for key, value in figures.items():
        report.metrics[key] = value
        report.metrics[f"{key}_original"] = 1.0
    if collapsed:
        message = f"the compressed model collapsed on the evaluation data: {'; '.join(collapsed)}"
        report.warnings.append(message)
        say(f"warning: {message}")
