"""Healing: train the factors of the rewritten layers so the compressed model reproduces the original.

    min over the factors (and refitted biases) of the rewritten layers, everything else frozen:
        Σ_outputs D(f̂(x), f(x))                                  distillation, f from onnxruntime
      + λ_feat · mean_layers ‖ĥ_l(x) − h_l(x)‖² / ‖h_l(x)‖²      intermediate features (whole graph)
      + λ_label · CE(f̂(x), y)                                   only when labels are given

    D matches the metric the budget charges: for top-1 / agreement, T²·KL(softmax(f/T) ‖ softmax(f̂/T))
    on the classifier output (the softmax is what decides the argmax; squared logit error spends its
    effort on logits that never flip); for cosine, the mean per-sample 1 − cos(f̂, f); otherwise the
    normalised squared error ‖f̂ − f‖² / ‖f‖².

Whole-graph path: the original graph runs in torch (`tnopt.torch_graph`) with each rewritten node
replaced by its method's differentiable `forward` on trainable factors; the teacher (outputs and the
rewritten layers' outputs) is the original model in onnxruntime on the same, possibly augmented, batch.
Block-local path (graphs the interpreter cannot run): layer by layer in graph order, each layer's
factors are trained so that, fed with its inputs in the compressed model whose upstream layers are
already healed, it reproduces the original layer's output, on activations captured in onnxruntime.

Part of the calibration data is held out for the budget gate, which healing never sees. A further
slice of the training part (the selection split) picks the checkpoint and stops training early: the
checkpoint kept is the one with the smallest drop in the charged metric there (drops within the
unhealed plan's standard error on that split are ties, broken by the smaller distillation loss), not
merely the smallest loss (measured with a squared logit loss: it fell while agreement on held-out
images did not improve), nor merely the smallest drop (single flips among 768 samples picked an
early checkpoint far worse on the gate). A fixed
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

AUGMENTATIONS = ("flip", "crop", "mixup")
# Block-local captures of one layer (inputs and targets) are capped at this many bytes.
MAX_CAPTURE_BYTES = 384 * 2**20


@dataclass(frozen=True)
class HealConfig:
    steps: int = 300  # optimizer steps (whole graph), or per layer (block-local)
    batch_size: int = 64
    # Adam step as a fraction of each tensor's RMS (factors differ in scale by 1000x). Measured on VGG's
    # ×4 proxy plan (bench/RESULTS.md): 0.02 first raised the drop (4.1% → 6.1% at step 25) and reached
    # 3.1% held-out in 200 steps; 0.005 reached 2.5% in 100.
    lr: float = 0.005
    holdout: float = 0.25  # fraction of the calibration data held out (early stopping, budget gate)
    augment: tuple[str, ...] = ()
    feature_weight: float = 0.1
    label_weight: float = 1.0
    eval_every: int = 25
    patience: int = 4  # evaluations without a better selection score before stopping
    temperature: float = 2.0  # of the softmax KL when the budget charges top-1 / agreement
    select_fraction: float = 0.125  # of the training part: picks the checkpoint, never trained on
    seed: int = 0
    # mixup: each image becomes λ·x + (1 − λ)·x' with x' another image of the same batch, λ ~
    # Beta(α, α) per image (α = 1: uniform), the teacher labelling the mixed image.
    mixup_alpha: float = 1.0
    path: str = "auto"  # auto | graph | block
    max_samples: int = 8192
    # With a budget: seconds for the whole heal-aware search (None: no limit). No further plan is
    # tried once the next one, judged by the slowest so far, would end past it.
    time_budget_s: float | None = None


@dataclass
class HealResult:
    path: str  # "graph" or "block"
    reason: str = ""  # why the block-local path was taken
    steps: int = 0
    sample_steps: int = 0  # Σ batch sizes over all optimizer steps
    best_step: int = 0
    stopped: str = ""  # why training ended before its steps ("time limit"), else empty
    train_samples: int = 0
    holdout_samples: int = 0
    select_samples: int = 0
    loss: str = "nmse"  # the distillation distance D: kl | cosine | nmse
    holdout_loss_before: float = 0.0  # the distillation loss on the selection split
    holdout_loss_after: float = 0.0
    select_drop_before: float | None = None  # the charged metric's drop on the selection split
    select_drop_after: float | None = None
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


def augment_images(
    batch: dict[str, np.ndarray], kinds, rng: np.random.Generator, mixup_alpha: float = 1.0
) -> dict[str, np.ndarray]:
    """Random horizontal flips, shifted crops (edge-padded by 1/8 of the size) and mixup (each image
    blended with another of the batch, λ ~ Beta(α, α)) of every 4-D float input (N, C, H, W), in
    that order; other inputs pass through. Mixup is "function matching" (Beyer et al. 2022): with the
    teacher labelling the very mixed image, a few thousand images become an unbounded stream of
    distinct inputs, each with the original's answer."""
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
        if "mixup" in kinds and len(x) > 1:
            partner = rng.permutation(len(x))
            weight = rng.beta(mixup_alpha, mixup_alpha, len(x)).astype(x.dtype)[:, None, None, None]
            x = weight * x + (1 - weight) * x[partner]
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
        raise TnoptError(
            f"--augment {','.join(kinds)} transforms images: the model has no 4-D float (N, C, H, W) input"
        )


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


def _softmax_kl(student, teacher, temperature: float):
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), mean over samples (classes on the last axis)."""
    import torch

    t = temperature
    teacher = teacher.to(student.dtype).reshape(-1, teacher.shape[-1])
    log_p = torch.log_softmax(teacher / t, dim=-1)
    log_q = torch.log_softmax(student.reshape(-1, student.shape[-1]) / t, dim=-1)
    return (t * t) * torch.sum(log_p.exp() * (log_p - log_q), dim=-1).mean()


def _cosine_distance(student, teacher):
    """Mean over samples of 1 − cos(student, teacher), each sample's output flattened."""
    import torch

    a = student.reshape(len(student), -1)
    b = teacher.to(student.dtype).reshape(len(teacher), -1)
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()


def loss_kind(metric_name: str | None) -> str:
    """The distillation distance that matches the charged metric (see the module docstring)."""
    if metric_name in ("top1", "agreement"):
        return "kl"
    return "cosine" if metric_name == "cosine" else "nmse"


def distillation_loss(kind: str, student, teacher, temperature: float = 2.0):
    """D(student, teacher) for one output tensor. KL needs class scores on the last axis of a tensor
    with more than one class; anything else falls back to the normalised squared error."""
    if kind == "kl" and student.dim() >= 2 and student.shape[-1] > 1:
        return _softmax_kl(student, teacher, temperature)
    if kind == "cosine" and student.dim() >= 2:
        return _cosine_distance(student, teacher)
    return _nmse(student, teacher)


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
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.apply()

    def accumulate(self, loss) -> None:
        """Adds `loss`'s gradient to the step being built (a batch in parts: its autograd graph is
        freed here, so memory holds one part); `apply` takes the step."""
        loss.backward()

    def apply(self) -> None:
        warm = min(1.0, (self.step_index + 1) / 10)
        decay = 0.5 * (1 + math.cos(math.pi * min(self.step_index, self.total) / self.total))
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * warm * max(decay, 0.02)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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


class CheckpointSelector:
    """Keeps the checkpoint with the smallest metric drop on the selection split; drops within
    `tolerance` of the smallest seen (the drop's standard error on that split) are ties, won by
    the smaller distillation loss. Stops after `patience` evaluations without a new best."""

    def __init__(self, patience: int, tolerance: float = 0.0):
        self.patience, self.tolerance = patience, tolerance
        self.best_drop, self.best_loss, self.best_step, self.bad = math.inf, math.inf, 0, 0
        self.chosen_drop = math.inf  # the drop of the kept checkpoint (≤ best_drop + tolerance)

    def update(self, drop: float | None, loss: float, step: int) -> tuple[bool, bool]:
        """(improved, stop). `drop` None (metric not measurable): the loss alone decides."""
        drop = 0.0 if drop is None else float(drop)
        clearly_better = drop < self.best_drop - self.tolerance - 1e-12
        tie = drop <= self.best_drop + self.tolerance + 1e-12
        if clearly_better or (tie and loss < self.best_loss * (1 - 1e-4)):
            self.best_drop = min(self.best_drop, drop)
            self.best_loss, self.best_step, self.bad, self.chosen_drop = loss, step, 0, drop
            return True, False
        self.best_drop = min(self.best_drop, drop)
        self.bad += 1
        return False, self.bad >= self.patience


def split_selection(train, config: HealConfig):
    """(train, selection): the selection split is the last `config.select_fraction` of the training
    part (at least 8 samples, leaving at least 8 to train on); without one, (train, None)."""
    n = len(train)
    count = int(round(n * config.select_fraction))
    if config.select_fraction <= 0 or n < 16:
        return train, None
    count = min(max(count, 8), n - 8)
    return train.split((n - count) / n)


def heal(
    runner, plan, train, holdout, config: HealConfig, say=lambda m: None, metric=None, deadline=None
) -> tuple[Plan, HealResult]:
    """`plan` with healed factors (same layers, methods, ranks) and what healing did. `runner`: the
    run's PlanRunner (the original model, its runtime and method table); `metric`: the metric the
    budget charges (a bound `tnopt.metrics.Metric`), which chooses the distillation distance and the
    checkpoint. `holdout` is the gate's: healing uses it only when the training part is too small
    to give a selection split. `deadline` (a perf_counter time, `--time-limit`): training stops
    there, keeping the best checkpoint so far (block-local: later layers stay as factorized)."""
    import torch

    from tnopt import threads

    # torch's own threads follow tnopt's BLAS policy (tnopt/threads.py): every core only while the
    # rest of the machine leaves them idle. On 2 cores under a load of ~4, fc2's 600 tt-storage
    # steps took 30 s on one thread and did not finish in 300 s on torch's default two.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads.choose_threads())
    try:
        return _heal(runner, plan, train, holdout, config, say, metric, deadline)
    finally:
        torch.set_num_threads(previous)


def _heal(runner, plan, train, holdout, config, say, metric, deadline=None):
    import torch

    started = time.perf_counter()
    plan = Plan.of(plan)
    torch.manual_seed(config.seed)
    check_augment(runner.original, config.augment)
    train, select = split_selection(train, config)
    select = holdout if select is None else select
    result, reason = None, "--heal-path block"
    if config.path in ("auto", "graph"):
        from tnopt.torch_graph import NotConvertible, TorchGraph

        try:
            _whole_graph_feeds(runner.original, train.inputs, plan)
            graph = TorchGraph(runner.original, {c.layer.name: None for c in plan})
            from tnopt.heal_paths import heal_graph

            healed, result = heal_graph(runner, graph, plan, train, select, config, say, metric, deadline)
        except NotConvertible as exc:
            if config.path == "graph":
                raise TnoptError(f"--heal: the whole-graph path cannot run this model ({exc})") from None
            result, reason = None, str(exc)
            say(f"heal: whole graph not convertible ({reason}); healing layer by layer")
    if result is None:
        from tnopt.heal_paths import heal_blocks

        healed, result = heal_blocks(runner, plan, train, select, config, say, deadline)
        result.reason = reason
    result.holdout_samples, result.select_samples = len(holdout), len(select)
    result.seconds = time.perf_counter() - started
    return healed, result


def _whole_graph_feeds(model, inputs, plan) -> None:
    """The whole-graph path feeds the model sample-major batches of any size and trains float32
    factors inside it: refuse (NotConvertible) a model whose batch sits on another axis (a Gemm's
    transposed A, [K, N]) or is fixed (a batch-1 export that squeezes it away), which it would run on
    misshapen tensors, and a float16 / float64 model, whose other ops would not take float32 values."""
    from tnopt.layout import fixed_batch_size
    from tnopt.torch_graph import NotConvertible

    other = next(
        (c.layer for c in plan if c.layer.weight is not None and c.layer.weight.dtype != np.float32), None
    )
    if other is not None:
        raise NotConvertible(f"layer {other.name!r} is {other.weight.dtype}; the factors train in float32")

    moved = [name for name in inputs.batched if inputs.axes[name]]
    if moved:
        raise NotConvertible(f"input {moved[0]!r} has its batch on axis {inputs.axes[moved[0]]}")
    fixed = fixed_batch_size(model, inputs)
    if fixed is not None:
        raise NotConvertible(f"the model's batch is fixed at {fixed}")


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


__all__ = [
    "AUGMENTATIONS",
    "HealConfig",
    "HealResult",
    "CheckpointSelector",
    "augment_images",
    "distillation_loss",
    "heal",
    "loss_kind",
    "split_selection",
    "parse_augment",
    "split_for_healing",
]
