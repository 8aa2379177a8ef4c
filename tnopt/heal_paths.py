"""The two ways healing trains a plan's factors (see `tnopt.heal` for the loss and the protocol).

heal_graph:  the whole original graph in torch (`tnopt.torch_graph`), each rewritten node replaced
             by its method's differentiable forward; teacher outputs streamed from onnxruntime.
heal_blocks: layer by layer in graph order, on activations captured in onnxruntime from the
             compressed model whose upstream layers are already healed (graphs that do not convert).
"""

from __future__ import annotations

import time

import numpy as np

from tnopt.data import Feeds
from tnopt.heal import (
    MAX_CAPTURE_BYTES,
    CheckpointSelector,
    HealResult,
    _EarlyStop,
    _nmse,
    _Trainer,
    _writeback,
    augment_images,
    distillation_loss,
    loss_kind,
)
from tnopt.plan import Plan


class _Stream:
    """Batches handed to the runner one at a time: the teacher runs on exactly the (augmented) batch
    the student trains on, through one session, without holding more than that batch."""

    def __init__(self):
        self.batch = None

    def __iter__(self):
        while True:
            yield self.batch


def _teacher_rows(teacher, count: int) -> dict[str, np.ndarray]:
    """The teacher's values for the `count` samples just put on the stream (onnxruntime may hand a
    stream batch back in several pieces: a model run at a fixed batch)."""
    pieces, got = [], 0
    while got < count:
        rows, values = next(teacher)
        pieces.append(values)
        got += rows.stop - rows.start
    if len(pieces) == 1:
        return pieces[0]
    return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}


def _sample_major_input(layer, x_train, x_hold):
    """(x_train, x_hold, the layer as the forward reads them). Block training indexes captures by
    sample on axis 0; a Gemm with transA=1 holds A as (K, M), so its capture is read as (M, K) rows
    and trained as the plain x·W it computes (transA 0): its forward would transpose them again."""
    if not (layer.op == "Gemm" and layer.attr("transA")):
        return x_train, x_hold, layer
    from dataclasses import replace

    from tnopt.layer_rows import input_rows

    attrs = tuple((key, 0 if key == "transA" else value) for key, value in layer.attrs)
    return (
        np.ascontiguousarray(input_rows(layer, x_train)),
        np.ascontiguousarray(input_rows(layer, x_hold)),
        replace(layer, attrs=attrs),
    )


def _effective_bias(layer, args):
    """The layer's bias as its node has it at run time (Conv B, Gemm beta·C; MatMul none)."""
    if layer.op == "MatMul" or len(args) < 3 or args[2] is None:
        return None
    return args[2] * float(layer.attr("beta", 1.0)) if layer.op == "Gemm" else args[2]


def _selection_scorer(runner, metric, select):
    """score(outputs) → (drop of the charged metric on the selection split, its paired standard
    error), and the teacher's outputs there; (None, reference) when no metric is given or it cannot
    be measured."""
    from tnopt.metrics import paired_standard_error

    reference = runner.run(Plan(), select.inputs)
    if metric is None or (getattr(metric, "needs_labels", False) and select.labels is None):
        return None, reference
    baseline = metric(reference, reference, select.labels)

    def score(outputs) -> tuple[float, float]:
        drop = float(metric.drop(metric(reference, outputs, select.labels), baseline, "absolute"))
        return drop, paired_standard_error(metric, reference, outputs, select.labels)

    return score, reference


def _past(deadline) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def heal_graph(runner, graph, plan, train, select, config, say, metric=None, deadline=None):
    """Whole-graph distillation; `select` picks the checkpoint (see `CheckpointSelector`). Past
    `deadline` the step in progress is the last: it is evaluated and the best checkpoint kept."""
    import torch

    methods = runner.methods
    trainer = _Trainer(
        {f"{c.layer.name}\x00{k}": v for c in plan for k, v in c.factors.arrays.items()}, config, config.steps
    )
    by_layer: dict[str, dict] = {}
    for key, tensor in trainer.params.items():
        layer_name, array_name = key.split("\x00")
        by_layer.setdefault(layer_name, {})[array_name] = tensor
    captured: dict = {}

    def replacement(choice):
        layer, method = choice.layer, methods[choice.method]

        def run(args):
            y = method.forward(
                layer, by_layer[layer.name], args[layer.data_index], _effective_bias(layer, args)
            )
            captured[layer.output_name] = y
            return y

        return run

    graph.replacements = {c.layer.name: replacement(c) for c in plan}
    outputs = list(graph.outputs)
    features = [c.layer.output_name for c in plan if c.layer.output_name not in outputs]
    stream = _Stream()
    # The teacher: the original model in onnxruntime, its outputs and the rewritten layers' outputs.
    teacher = iter(runner.capture(Plan(), outputs + features, stream, board=False))
    score, select_reference = _selection_scorer(runner, metric, select)
    float_outputs = [i for i, r in enumerate(select_reference) if r.dtype.kind == "f"]
    kind = loss_kind(getattr(metric, "name", None))
    rng = np.random.default_rng(config.seed)
    labels = train.labels

    def output_loss(student, targets):
        return sum(
            distillation_loss(
                kind, student[outputs[i]], torch.from_numpy(np.asarray(targets[i])), config.temperature
            )
            for i in float_outputs
        )

    def evaluate() -> tuple[float | None, float, float]:
        """(metric drop, its standard error, distillation loss) of the current factors on the
        selection split."""
        total, pieces = 0.0, {name: [] for name in outputs}
        with torch.no_grad():
            # In parts of the run's onnxruntime batch (sized to the activation budget), as training:
            # a fixed part of 256 held 256 samples' activations whatever the model.
            for start, student in _run_in_parts(graph, select.inputs, len(select), part, outputs):
                targets = [r[start : start + part] for r in select_reference]
                n = min(part, len(select) - start)
                total += float(output_loss(student, targets)) * n
                for name in outputs:
                    pieces[name].append(student[name].numpy())
        drop, error = score([np.concatenate(pieces[name]) for name in outputs]) if score else (None, 0.0)
        return drop, error, total / max(len(select), 1)

    part = max(1, runner.runtime.batch_size)
    result = HealResult("graph", layers=[c.layer.name for c in plan], train_samples=len(train), loss=kind)
    try:
        _check_same_values(graph, select, select_reference, outputs, float_outputs, part)
        result.select_drop_before, error, result.holdout_loss_before = evaluate()
    except (RuntimeError, ValueError, IndexError) as exc:
        # The first run of the whole graph in torch, before any training: a graph the converter
        # took but torch does not run (shapes an exporter computed for another input) heals by blocks.
        from tnopt.torch_graph import NotConvertible

        raise NotConvertible(
            f"the whole graph does not run in torch ({str(exc).splitlines()[0][:120]})"
        ) from exc
    # Drops within the unhealed plan's standard error on this split are ties, decided by the loss
    # (which matches the charged metric): with 768 samples, single flips made the selection pick
    # a step-25 checkpoint (2.7%) whose loss was far above the later ones.
    selector = CheckpointSelector(config.patience, error)
    selector.update(result.select_drop_before, result.holdout_loss_before, 0)
    n = len(train)
    # The step's batch is the config's; onnxruntime (the teacher) and torch (the student's autograd
    # graph) see it in parts of at most the run's onnxruntime batch, whose gradients add up before
    # the step: memory holds one part, whatever the batch.
    batch = min(config.batch_size, n)
    order, cursor = rng.permutation(n), 0
    for step in range(1, config.steps + 1):
        if cursor + batch > n:
            order, cursor = rng.permutation(n), 0
        index = np.sort(order[cursor : cursor + batch])
        cursor += batch
        for offset in range(0, batch, part):
            rows = index[offset : offset + part]
            stream.batch = Feeds(
                augment_images(dict(train.inputs.take(rows)), config.augment, rng, config.mixup_alpha),
                train.inputs.axes,
            )
            target = _teacher_rows(teacher, len(rows))
            captured.clear()
            student = graph.run({k: torch.from_numpy(v) for k, v in stream.batch.items()}, outputs)
            if result.steps == 0:
                _check_same_shapes({**captured, **student}, target)
            loss = output_loss(student, [target[name] for name in outputs])
            if config.feature_weight and plan.choices:
                feature = sum(
                    _nmse(captured[c.layer.output_name], torch.from_numpy(target[c.layer.output_name]))
                    for c in plan
                ) / len(plan)
                loss = loss + config.feature_weight * feature
            if labels is not None and config.label_weight and float_outputs:
                logits = student[outputs[float_outputs[0]]]
                if logits.dim() == 2 and logits.shape[1] > int(labels.max()):
                    loss = loss + config.label_weight * torch.nn.functional.cross_entropy(
                        logits, torch.from_numpy(labels[rows]).long()
                    )
            # Each part's mean loss weighted by its share: the step's gradient is the batch mean's.
            trainer.accumulate(loss * (len(rows) / batch))
        trainer.apply()
        result.steps, result.sample_steps = step, result.sample_steps + batch
        out_of_time = _past(deadline) and step < config.steps
        if out_of_time:
            result.stopped = "time limit"
            say(f"heal: the time limit ran out at step {step} of {config.steps}")
        if step % config.eval_every == 0 or step == config.steps or out_of_time:
            drop, _, value = evaluate()
            improved, stop = selector.update(drop, value, step)
            if improved:
                trainer.best = trainer.snapshot()
            shown = "" if drop is None else f" drop {drop:.4f}"
            say(f"heal: step {step} selection loss {value:.5f}{shown}{' *' if improved else ''}")
            if stop or out_of_time:
                break
    result.best_step, result.holdout_loss_after = selector.best_step, selector.best_loss
    result.select_drop_after = None if score is None else selector.chosen_drop
    trained: dict[str, dict[str, np.ndarray]] = {}
    for key, value in trainer.best.items():
        layer_name, array_name = key.split("\x00")
        trained.setdefault(layer_name, {})[array_name] = value
    return _writeback(plan, trained), result


def _run_in_parts(graph, inputs, count: int, part: int, outputs):
    """(start, the graph's `outputs` on samples [start, start + part)) over the first `count` samples
    of `inputs` (inputs fed whole stay whole), `part` at a time; the caller sets the grad mode."""
    import torch

    for start in range(0, count, part):
        piece = inputs.take(slice(start, min(start + part, count)))
        yield start, graph.run({k: torch.from_numpy(np.asarray(v)) for k, v in piece.items()}, outputs)


# How far the original graph run in torch may be from onnxruntime (relative L2 of each float output)
# before the whole-graph path is judged to compute another function. Well above float32 round-off
# and the small differences of equivalent kernels (1e-6 … 1e-4), well below a misread op (a softmax
# or a transpose on the wrong axis: order 1): distilling through a slightly different graph still
# heals (the gate judges the written model in onnxruntime), distilling through a wrong one does not.
SAME_VALUES_TOLERANCE = 1e-2
_VALUE_CHECK_SAMPLES = 16


def _check_same_values(graph, select, reference, outputs, float_outputs, part: int = 256) -> None:
    """The original graph in torch (no node replaced) against onnxruntime's outputs on the first few
    selection samples: a graph the converter takes but computes differently (same shapes, other
    values) would train the factors toward another function, so it heals by blocks instead. Skipped
    where a rewritten node's op has no torch form of its own (it runs only through its factors)."""
    import torch

    from tnopt.torch_graph import NotConvertible
    from tnopt.torch_ops import OPS

    if any(op not in OPS for name, op, *_ in graph.nodes if name in graph.replacements):
        return
    count = min(_VALUE_CHECK_SAMPLES, len(select))
    saved, graph.replacements = graph.replacements, {}
    pieces = {name: [] for name in outputs}
    try:
        with torch.no_grad():
            # `part` samples at a time (the run's onnxruntime batch): 16 pages of det-tiny at once
            # would hold 16 pages' activations.
            for _, values in _run_in_parts(graph, select.inputs, count, part, outputs):
                for name in outputs:
                    pieces[name].append(values[name])
    finally:
        graph.replacements = saved
    got = {name: torch.cat(values) if len(values) > 1 else values[0] for name, values in pieces.items()}
    for i in float_outputs:
        want = np.asarray(reference[i][:count], dtype=np.float64)
        value = got[outputs[i]].double().numpy()
        if value.shape != want.shape:
            raise NotConvertible(
                f"the whole graph computes {outputs[i]!r} as {value.shape} in torch, "
                f"{want.shape} in onnxruntime"
            )
        scale = float(np.linalg.norm(want))
        # an all-zero output is compared on an absolute scale of 1e-6 per element
        gap = float(np.linalg.norm(value - want)) / max(scale, 1e-6 * np.sqrt(want.size))
        if not np.isfinite(gap) or gap > SAME_VALUES_TOLERANCE:
            raise NotConvertible(
                f"the whole graph computes {outputs[i]!r} differently in torch (relative difference "
                f"{gap:.2g} from onnxruntime on {count} samples)"
            )


def _check_same_shapes(student: dict, teacher: dict) -> None:
    """The first step's tensors in torch against onnxruntime's: a graph the converter took but torch
    computes differently (shapes an exporter computed for its example input) heals by blocks."""
    from tnopt.torch_graph import NotConvertible

    for name, value in student.items():
        if name in teacher and tuple(value.shape) != tuple(np.shape(teacher[name])):
            raise NotConvertible(
                f"the whole graph computes {name!r} as {tuple(value.shape)} in torch, "
                f"{tuple(np.shape(teacher[name]))} in onnxruntime"
            )


def _gather(batches, name) -> np.ndarray:
    return np.concatenate([values[name] for _, values in batches])


def _capture_rows(runner, names, inputs, limit_bytes) -> int:
    """How many samples of `inputs` fit the capture budget for these tensors (original model)."""
    probe = inputs.take(slice(0, 2))
    sizes = [_gather(runner.capture(Plan(), [name], probe, board=False), name).nbytes for name in names]
    return int(max(16, limit_bytes // max(1, sum(sizes) // 2)))


def heal_blocks(runner, plan, train, holdout, config, say, deadline=None):
    """Layer by layer in graph order on captured activations (no graph conversion needed): each
    layer's inputs come from the compressed model with its upstream layers already healed.
    `holdout`: the selection split (per-layer early stopping on the layer's loss). Past `deadline`
    the layer in training stops at its best checkpoint and later layers stay as factorized."""
    import torch

    methods = runner.methods
    rng = np.random.default_rng(config.seed)
    train_inputs = train.inputs
    if config.augment:
        extra = augment_images(dict(train_inputs), config.augment, rng, config.mixup_alpha)
        batched = set(train_inputs.batched)  # inputs fed whole are not repeated
        train_inputs = Feeds(
            {k: np.concatenate([v, extra[k]]) if k in batched else v for k, v in train_inputs.items()},
            train_inputs.axes,
        )
    result = HealResult("block", train_samples=train_inputs.samples())
    healed = plan
    before, after = [], []
    for choice in plan:  # plans list their layers in graph order
        layer, method = choice.layer, methods[choice.method]
        if _past(deadline):
            result.skipped[layer.name] = "not trained: --time-limit ran out"
            result.stopped = "time limit"
            continue
        if layer.has_bias and layer.bias is None:
            result.skipped[layer.name] = "bias is not a constant per-channel vector"
            continue
        from tnopt.passes._torch import no_torch_form

        refused = no_torch_form(layer.op, dict(layer.attrs))
        if refused:
            result.skipped[layer.name] = refused
            continue
        names = [layer.input_name, layer.output_name]
        rows = _capture_rows(runner, names, train_inputs, MAX_CAPTURE_BYTES)
        feeds = train_inputs.take(slice(0, rows))
        hold_feeds = holdout.inputs.take(slice(0, min(len(holdout), rows)))
        x_train = _gather(runner.capture(healed, [layer.input_name], feeds, board=False), layer.input_name)
        t_train = _gather(runner.capture(Plan(), [layer.output_name], feeds, board=False), layer.output_name)
        x_hold = _gather(
            runner.capture(healed, [layer.input_name], hold_feeds, board=False), layer.input_name
        )
        t_hold = _gather(
            runner.capture(Plan(), [layer.output_name], hold_feeds, board=False), layer.output_name
        )
        x_train, x_hold, trained_layer = _sample_major_input(layer, x_train, x_hold)
        # The factors train in float32 (written back in the layer's dtype): so do the activations.
        x_train, x_hold, t_train, t_hold = (
            np.asarray(a, np.float32) for a in (x_train, x_hold, t_train, t_hold)
        )
        x_hold, t_hold = torch.from_numpy(x_hold), torch.from_numpy(t_hold)
        bias = None if layer.bias is None else torch.from_numpy(np.asarray(layer.bias, np.float32))
        trainer = _Trainer(choice.factors.arrays, config, config.steps)

        def hold_loss():
            with torch.no_grad():
                return float(_nmse(method.forward(trained_layer, trainer.params, x_hold, bias), t_hold))

        stopper = _EarlyStop(config.patience)
        start_loss = hold_loss()
        stopper.update(start_loss, 0)
        n, batch = len(x_train), min(config.batch_size, len(x_train))
        order, cursor = rng.permutation(n), 0
        for step in range(1, config.steps + 1):
            if cursor + batch > n:
                order, cursor = rng.permutation(n), 0
            index = np.sort(order[cursor : cursor + batch])
            cursor += batch
            x = torch.from_numpy(x_train[index])
            loss = _nmse(
                method.forward(trained_layer, trainer.params, x, bias), torch.from_numpy(t_train[index])
            )
            trainer.step(loss)
            result.steps += 1
            result.sample_steps += batch
            out_of_time = _past(deadline)
            if step % config.eval_every == 0 or step == config.steps or out_of_time:
                improved, stop = stopper.update(hold_loss(), step)
                if improved:
                    trainer.best = trainer.snapshot()
                if out_of_time:
                    result.stopped = "time limit"
                if stop or out_of_time:
                    break
        before.append(start_loss)
        after.append(stopper.best)
        say(f"heal: {layer.name} held-out layer loss {start_loss:.5f} -> {stopper.best:.5f}")
        healed = _writeback(healed, {layer.name: trainer.best})
        result.layers.append(layer.name)
    # Block-local losses are per layer: the report gets their mean.
    result.holdout_loss_before = float(np.mean(before)) if before else 0.0
    result.holdout_loss_after = float(np.mean(after)) if after else 0.0
    return healed, result
