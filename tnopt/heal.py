"""Healing: train the factors of the rewritten layers so the compressed model reproduces the original.

    min over the factors (and refitted biases) of the rewritten layers, everything else frozen:
        Σ_outputs ‖f̂(x) − f(x)‖² / ‖f(x)‖²                       distillation, f from onnxruntime
      + λ_feat · mean_layers ‖ĥ_l(x) − h_l(x)‖² / ‖h_l(x)‖²      intermediate features (whole graph)
      + λ_label · CE(f̂(x), y)                                   only when labels are given

Whole-graph path: the original graph runs in torch (`tnopt.torch_graph`) with each rewritten node
replaced by its method's differentiable `forward` on trainable factors; the teacher (outputs and the
rewritten layers' outputs) is the original model in onnxruntime on the same, possibly augmented, batch.
Block-local path (graphs the interpreter cannot run): layer by layer in graph order, each layer's
factors are trained so that, fed with its inputs in the compressed model whose upstream layers are
already healed, it reproduces the original layer's output, on activations captured in onnxruntime.

Part of the calibration data is held out: the held-out distillation loss stops training early (the
best state is kept) and the budget gate is judged there, never on the samples healing saw. A fixed
seed gives identical factors. The trained arrays replace the factors' arrays; the rewrite builds the
same nodes from them, so every other initializer is byte-identical and the node list unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from tnopt.errors import TnoptError
from tnopt.passes import Factors
from tnopt.plan import Plan

AUGMENTATIONS = ("flip", "crop")
# Block-local captures of one layer (inputs and targets) are capped at this many bytes.
MAX_CAPTURE_BYTES = 384 * 2**20


@dataclass(frozen=True)
class HealConfig:
    steps: int = 300  # optimizer steps (whole graph), or per layer (block-local)
    batch_size: int = 64
    lr: float = 0.02  # Adam step as a fraction of each tensor's RMS (factors differ in scale by 1000x)
    holdout: float = 0.25  # fraction of the calibration data held out (early stopping, budget gate)
    augment: tuple[str, ...] = ()
    feature_weight: float = 0.1
    label_weight: float = 1.0
    eval_every: int = 25
    patience: int = 4  # evaluations without a better held-out loss before stopping
    seed: int = 0
    path: str = "auto"  # auto | graph | block
    max_samples: int = 8192


@dataclass
class HealResult:
    path: str  # "graph" or "block"
    reason: str = ""  # why the block-local path was taken
    steps: int = 0
    sample_steps: int = 0  # Σ batch sizes over all optimizer steps
    best_step: int = 0
    train_samples: int = 0
    holdout_samples: int = 0
    holdout_loss_before: float = 0.0
    holdout_loss_after: float = 0.0
    seconds: float = 0.0
    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer → why it was not trained

    def to_dict(self) -> dict:
        return asdict(self)


def parse_augment(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in AUGMENTATIONS]
    if unknown:
        raise TnoptError(f"--augment: unknown {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    return kinds


def augment_images(batch: dict[str, np.ndarray], kinds, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random horizontal flips and shifted crops (edge-padded by 1/8 of the size) of every 4-D float
    input (N, C, H, W); other inputs pass through."""
    out = {}
    for name, x in batch.items():
        if x.ndim != 4 or x.dtype.kind != "f" or not kinds:
            out[name] = x
            continue
        x = x.copy()
        if "flip" in kinds:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip][..., ::-1]
        if "crop" in kinds:
            h, w = x.shape[2:]
            ph, pw = max(1, h // 8), max(1, w // 8)
            padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="edge")
            dy = rng.integers(0, 2 * ph + 1, len(x))
            dx = rng.integers(0, 2 * pw + 1, len(x))
            x = np.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(x))])
        out[name] = x
    return out


def check_augment(model: onnx.ModelProto, kinds) -> None:
    if not kinds:
        return
    images = [
        i
        for i in model.graph.input
        if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(i.type.tensor_type.shape.dim) == 4
    ]
    if not images:
        raise TnoptError("--augment flips and crops images: the model has no 4-D float (N, C, H, W) input")


def split_for_healing(data, config: HealConfig):
    """(train, holdout) of the calibration data: the holdout is the last `config.holdout` part."""
    if len(data) < 8:
        raise TnoptError(f"healing needs at least 8 calibration samples, got {len(data)}")
    train, holdout = data.split(1.0 - config.holdout)
    return train.head(config.max_samples), holdout


def _nmse(student, teacher):
    import torch

    teacher = teacher.to(student.dtype)
    return torch.mean((student - teacher) ** 2) / (torch.mean(teacher**2) + 1e-12)


class _Trainer:
    """Adam on a dict of named tensors, each with a step size relative to its own RMS, cosine decay."""

    def __init__(self, arrays: dict[str, np.ndarray], config: HealConfig, total_steps: int):
        import torch

        self.params = {
            k: torch.tensor(np.asarray(v, np.float32), requires_grad=True) for k, v in arrays.items()
        }
        groups = []
        for tensor in self.params.values():
            rms = float(tensor.detach().pow(2).mean().sqrt()) or 1e-3
            groups.append({"params": [tensor], "lr": config.lr * rms})
        self.optimizer = torch.optim.Adam(groups)
        self.base = [g["lr"] for g in groups]
        self.total = max(1, total_steps)
        self.step_index = 0
        self.best = self.snapshot()

    def snapshot(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.params.items()}

    def step(self, loss) -> None:
        warm = min(1.0, (self.step_index + 1) / 10)
        decay = 0.5 * (1 + math.cos(math.pi * min(self.step_index, self.total) / self.total))
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * warm * max(decay, 0.02)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_index += 1


class _EarlyStop:
    def __init__(self, patience: int):
        self.patience, self.best, self.best_step, self.bad = patience, math.inf, 0, 0

    def update(self, loss: float, step: int) -> tuple[bool, bool]:
        """(improved, stop)."""
        if loss < self.best * (1 - 1e-4):
            self.best, self.best_step, self.bad = loss, step, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience


def heal(runner, plan, train, holdout, config: HealConfig, say=lambda m: None) -> tuple[Plan, HealResult]:
    """`plan` with healed factors (same layers, methods, ranks) and what healing did. `runner`: the
    run's PlanRunner (the original model, its runtime and method table)."""
    import torch

    started = time.perf_counter()
    plan = Plan.of(plan)
    torch.manual_seed(config.seed)
    check_augment(runner.original, config.augment)
    result, reason = None, "--heal-path block"
    if config.path in ("auto", "graph"):
        from tnopt.torch_graph import NotConvertible, TorchGraph

        try:
            graph = TorchGraph(runner.original, {c.layer.name: None for c in plan})
        except NotConvertible as exc:
            if config.path == "graph":
                raise TnoptError(f"--heal: the whole-graph path cannot run this model ({exc})") from None
            reason = str(exc)
            say(f"heal: whole graph not convertible ({reason}); healing layer by layer")
        else:
            healed, result = _heal_graph(runner, graph, plan, train, holdout, config, say)
    if result is None:
        healed, result = _heal_blocks(runner, plan, train, holdout, config, say)
        result.reason = reason
    result.seconds = time.perf_counter() - started
    return healed, result


def _writeback(plan: Plan, trained: dict[str, dict[str, np.ndarray]]) -> Plan:
    choices = []
    for choice in plan:
        arrays = trained.get(choice.layer.name)
        if arrays is None:
            choices.append(choice)
            continue
        like = choice.factors.arrays
        new = {k: np.ascontiguousarray(arrays[k].astype(like[k].dtype)) for k in like}
        notes = dict(choice.factors.notes, healed=True)
        choices.append(
            choice.with_factors(Factors(new, choice.factors.rank, choice.factors.rel_error, notes))
        )
    return Plan(tuple(choices))


class _Stream:
    """Batches handed to the runner one at a time: the teacher runs on exactly the (augmented) batch
    the student trains on, through one session, without holding more than that batch."""

    def __init__(self):
        self.batch = None

    def __iter__(self):
        while True:
            yield self.batch


def _effective_bias(layer, args):
    """The layer's bias as its node has it at run time (Conv B, Gemm beta·C; MatMul none)."""
    if layer.op == "MatMul" or len(args) < 3 or args[2] is None:
        return None
    return args[2] * float(layer.attr("beta", 1.0)) if layer.op == "Gemm" else args[2]


def _heal_graph(runner, graph, plan, train, holdout, config, say):
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
    held_reference = runner.run(Plan(), holdout.inputs)
    float_outputs = [i for i, r in enumerate(held_reference) if r.dtype.kind == "f"]
    rng = np.random.default_rng(config.seed)
    labels = train.labels

    def output_loss(student, targets):
        return sum(
            _nmse(student[outputs[i]], torch.from_numpy(np.asarray(targets[i]))) for i in float_outputs
        )

    def holdout_loss() -> float:
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(holdout), 256):
                feeds = {k: torch.from_numpy(v[start : start + 256]) for k, v in holdout.inputs.items()}
                student = graph.run(feeds, outputs)
                targets = [r[start : start + 256] for r in held_reference]
                n = len(next(iter(feeds.values())))
                total += float(output_loss(student, targets)) * n
        return total / max(len(holdout), 1)

    result = HealResult(
        "graph", layers=[c.layer.name for c in plan], train_samples=len(train), holdout_samples=len(holdout)
    )
    result.holdout_loss_before = holdout_loss()
    stopper = _EarlyStop(config.patience)
    stopper.update(result.holdout_loss_before, 0)
    n = len(train)
    batch = min(config.batch_size, n, runner.runtime.batch_size)
    order, cursor = rng.permutation(n), 0
    for step in range(1, config.steps + 1):
        if cursor + batch > n:
            order, cursor = rng.permutation(n), 0
        index = np.sort(order[cursor : cursor + batch])
        cursor += batch
        stream.batch = augment_images({k: v[index] for k, v in train.inputs.items()}, config.augment, rng)
        _, target = next(teacher)
        captured.clear()
        student = graph.run({k: torch.from_numpy(v) for k, v in stream.batch.items()}, outputs)
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
                    logits, torch.from_numpy(labels[index]).long()
                )
        trainer.step(loss)
        result.steps, result.sample_steps = step, result.sample_steps + batch
        if step % config.eval_every == 0 or step == config.steps:
            value = holdout_loss()
            improved, stop = stopper.update(value, step)
            if improved:
                trainer.best = trainer.snapshot()
            say(f"heal: step {step} held-out loss {value:.5f}{' *' if improved else ''}")
            if stop:
                break
    result.best_step, result.holdout_loss_after = stopper.best_step, stopper.best
    trained: dict[str, dict[str, np.ndarray]] = {}
    for key, value in trainer.best.items():
        layer_name, array_name = key.split("\x00")
        trained.setdefault(layer_name, {})[array_name] = value
    return _writeback(plan, trained), result


def _gather(batches, name) -> np.ndarray:
    return np.concatenate([values[name] for _, values in batches])


def _capture_rows(runner, names, inputs, limit_bytes) -> int:
    """How many samples of `inputs` fit the capture budget for these tensors (original model)."""
    probe = {k: v[:2] for k, v in inputs.items()}
    sizes = [_gather(runner.capture(Plan(), [name], probe, board=False), name).nbytes for name in names]
    return int(max(16, limit_bytes // max(1, sum(sizes) // 2)))


def _heal_blocks(runner, plan, train, holdout, config, say):
    """Layer by layer in graph order on captured activations (no graph conversion needed): each
    layer's inputs come from the compressed model with its upstream layers already healed."""
    import torch

    methods = runner.methods
    rng = np.random.default_rng(config.seed)
    train_inputs = dict(train.inputs)
    if config.augment:
        extra = augment_images(train_inputs, config.augment, rng)
        train_inputs = {k: np.concatenate([v, extra[k]]) for k, v in train_inputs.items()}
    result = HealResult(
        "block", train_samples=len(next(iter(train_inputs.values()))), holdout_samples=len(holdout)
    )
    healed = plan
    before, after = [], []
    for choice in plan:  # plans list their layers in graph order
        layer, method = choice.layer, methods[choice.method]
        if layer.has_bias and layer.bias is None:
            result.skipped[layer.name] = "bias is not a constant per-channel vector"
            continue
        names = [layer.input_name, layer.output_name]
        rows = _capture_rows(runner, names, train_inputs, MAX_CAPTURE_BYTES)
        feeds = {k: v[:rows] for k, v in train_inputs.items()}
        hold_feeds = {k: v[: min(len(holdout), rows)] for k, v in holdout.inputs.items()}
        x_train = _gather(runner.capture(healed, [layer.input_name], feeds, board=False), layer.input_name)
        t_train = _gather(runner.capture(Plan(), [layer.output_name], feeds, board=False), layer.output_name)
        x_hold = _gather(
            runner.capture(healed, [layer.input_name], hold_feeds, board=False), layer.input_name
        )
        t_hold = _gather(
            runner.capture(Plan(), [layer.output_name], hold_feeds, board=False), layer.output_name
        )
        x_hold, t_hold = torch.from_numpy(x_hold), torch.from_numpy(t_hold)
        bias = None if layer.bias is None else torch.from_numpy(np.asarray(layer.bias, np.float32))
        trainer = _Trainer(choice.factors.arrays, config, config.steps)

        def hold_loss():
            with torch.no_grad():
                return float(_nmse(method.forward(layer, trainer.params, x_hold, bias), t_hold))

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
            loss = _nmse(method.forward(layer, trainer.params, x, bias), torch.from_numpy(t_train[index]))
            trainer.step(loss)
            result.steps += 1
            result.sample_steps += batch
            if step % config.eval_every == 0 or step == config.steps:
                improved, stop = stopper.update(hold_loss(), step)
                if improved:
                    trainer.best = trainer.snapshot()
                if stop:
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


__all__ = [
    "AUGMENTATIONS",
    "HealConfig",
    "HealResult",
    "augment_images",
    "heal",
    "parse_augment",
    "split_for_healing",
]
