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
from tnopt.passes import METHODS, Factors
from tnopt.rewrite import Choice, apply_plan

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


def heal(
    original: onnx.ModelProto,
    choices: list[Choice],
    train,
    holdout,
    runtime,
    config: HealConfig,
    say=lambda m: None,
) -> tuple[list[Choice], HealResult]:
    """Healed copies of `choices` (same layers, methods, ranks) and what healing did."""
    import torch

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    check_augment(original, config.augment)
    result, reason = None, "--heal-path block"
    if config.path in ("auto", "graph"):
        from tnopt.torch_graph import NotConvertible, TorchGraph

        try:
            graph = TorchGraph(original, {c.layer.name: None for c in choices})
        except NotConvertible as exc:
            if config.path == "graph":
                raise TnoptError(f"--heal: the whole-graph path cannot run this model ({exc})") from None
            reason = str(exc)
            say(f"heal: whole graph not convertible ({reason}); healing layer by layer")
        else:
            healed, result = _heal_graph(original, graph, choices, train, holdout, runtime, config, say)
    if result is None:
        healed, result = _heal_blocks(original, choices, train, holdout, runtime, config, say)
        result.reason = reason
    result.seconds = time.perf_counter() - started
    return healed, result


def _writeback(choices: list[Choice], trained: dict[str, dict[str, np.ndarray]]) -> list[Choice]:
    out = []
    for choice in choices:
        arrays = trained.get(choice.layer.name)
        if arrays is None:
            out.append(choice)
            continue
        like = choice.factors.arrays
        new = {k: np.ascontiguousarray(arrays[k].astype(like[k].dtype)) for k in like}
        notes = dict(choice.factors.notes, healed=True)
        out.append(
            Choice(
                choice.layer,
                choice.method,
                Factors(new, choice.factors.rank, choice.factors.rel_error, notes),
            )
        )
    return out


def _heal_graph(original, graph, choices, train, holdout, runtime, config, say):
    import torch

    by_layer = {c.layer.name: c for c in choices}
    trainers = {}
    names = []
    flat = {}
    for choice in choices:
        names.append(choice.layer.output_name)
        for key, value in choice.factors.arrays.items():
            flat[(choice.layer.name, key)] = value
    trainer = _Trainer({f"{n}\x00{k}": v for (n, k), v in flat.items()}, config, config.steps)
    for choice in choices:
        prefix = f"{choice.layer.name}\x00"
        trainers[choice.layer.name] = {
            k[len(prefix) :]: v for k, v in trainer.params.items() if k.startswith(prefix)
        }
    captured: dict[str, torch.Tensor] = {}

    def replacement(choice):
        layer, method = choice.layer, METHODS[choice.method]

        def run(args):
            x = args[layer.data_index]
            bias = args[2] if len(args) > 2 and layer.op != "MatMul" else None
            if bias is not None and layer.op == "Gemm":
                bias = bias * float(layer.attr("beta", 1.0))
            y = method.forward(layer, trainers[layer.name], x, bias)
            captured[layer.output_name] = y
            return y

        return run

    graph.replacements = {name: replacement(c) for name, c in by_layer.items()}
    teacher = runtime.with_outputs(original, names)
    out_names = [o.name for o in teacher.get_outputs()]
    graph_outputs = graph.outputs
    float_out = [out_names.index(n) for n in graph_outputs if n in out_names]
    float_out = [i for i in float_out if "float" in teacher.get_outputs()[i].type]
    feature_idx = [out_names.index(n) for n in names]
    rng = np.random.default_rng(config.seed)
    labels = train.labels

    def losses(feeds_np, with_features):
        targets = teacher.run(None, feeds_np)
        captured.clear()
        student = graph.run({k: torch.from_numpy(v) for k, v in feeds_np.items()}, graph_outputs)
        out_loss = sum(
            _nmse(student[out_names[i]], torch.from_numpy(np.asarray(targets[i]))) for i in float_out
        )
        feat = 0.0
        if with_features and config.feature_weight and feature_idx:
            feat = sum(
                _nmse(captured[out_names[i]], torch.from_numpy(targets[i])) for i in feature_idx
            ) / len(feature_idx)
        return out_loss, feat, student

    def holdout_loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(holdout), 256):
                feeds = {k: v[start : start + 256] for k, v in holdout.inputs.items()}
                loss, _, _ = losses(feeds, False)
                n = len(next(iter(feeds.values())))
                total, count = total + float(loss) * n, count + n
        return total / max(count, 1)

    result = HealResult(
        "graph",
        layers=[c.layer.name for c in choices],
        train_samples=len(train),
        holdout_samples=len(holdout),
    )
    result.holdout_loss_before = holdout_loss()
    stopper = _EarlyStop(config.patience)
    stopper.update(result.holdout_loss_before, 0)
    order = rng.permutation(len(train))
    cursor = 0
    n = len(train)
    batch = min(config.batch_size, n)
    for step in range(1, config.steps + 1):
        if cursor + batch > n:
            order, cursor = rng.permutation(n), 0
        index = np.sort(order[cursor : cursor + batch])
        cursor += batch
        feeds = augment_images({k: v[index] for k, v in train.inputs.items()}, config.augment, rng)
        out_loss, feat, student = losses(feeds, True)
        loss = out_loss + config.feature_weight * feat
        if labels is not None and config.label_weight and float_out:
            logits = student[out_names[float_out[0]]]
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
        layer, name = key.split("\x00")
        trained.setdefault(layer, {})[name] = value
    return _writeback(choices, trained), result


def _capture_rows(runtime, model, names, inputs, limit_bytes) -> int:
    """How many samples of `inputs` fit the capture budget for these tensors."""
    probe = runtime.capture(model, names, {k: v[:2] for k, v in inputs.items()})
    per_sample = max(1, sum(v.nbytes for v in probe.values()) // 2)
    return int(max(16, limit_bytes // per_sample))


def _heal_blocks(original, choices, train, holdout, runtime, config, say):
    """Layer by layer in graph order on captured activations (no graph conversion needed)."""
    import torch

    from tnopt.graph import truncate

    order = {c.layer.name: i for i, c in enumerate(choices)}
    rng = np.random.default_rng(config.seed)
    train_inputs = dict(train.inputs)
    if config.augment:
        extra = augment_images(train_inputs, config.augment, rng)
        train_inputs = {k: np.concatenate([v, extra[k]]) for k, v in train_inputs.items()}
    result = HealResult(
        "block", train_samples=len(next(iter(train_inputs.values()))), holdout_samples=len(holdout)
    )
    healed = list(choices)
    before, after = [], []
    for choice in sorted(choices, key=lambda c: order[c.layer.name]):
        layer, method = choice.layer, METHODS[choice.method]
        if layer.has_bias and layer.bias is None:
            result.skipped[layer.name] = "bias is not a constant per-channel vector"
            continue
        current, _ = apply_plan(original, healed)
        head = truncate(current, [layer.input_name])
        target_head = truncate(original, [layer.output_name])
        rows = _capture_rows(
            runtime, original, [layer.input_name, layer.output_name], train_inputs, MAX_CAPTURE_BYTES
        )
        feeds = {k: v[:rows] for k, v in train_inputs.items()}
        x_train = runtime.run(head, feeds)[0]
        t_train = runtime.run(target_head, feeds)[0]
        hold_rows = min(len(holdout), rows)
        hold_feeds = {k: v[:hold_rows] for k, v in holdout.inputs.items()}
        x_hold = torch.from_numpy(runtime.run(head, hold_feeds)[0])
        t_hold = torch.from_numpy(runtime.run(target_head, hold_feeds)[0])
        bias = None if layer.bias is None else torch.from_numpy(np.asarray(layer.bias, np.float32))
        trainer = _Trainer(choice.factors.arrays, config, config.steps)

        def hold_loss():
            with torch.no_grad():
                return float(_nmse(method.forward(layer, trainer.params, x_hold, bias), t_hold))

        stopper = _EarlyStop(config.patience)
        start_loss = hold_loss()
        stopper.update(start_loss, 0)
        n, batch = len(x_train), min(config.batch_size, len(x_train))
        perm, cursor = rng.permutation(n), 0
        for step in range(1, config.steps + 1):
            if cursor + batch > n:
                perm, cursor = rng.permutation(n), 0
            index = np.sort(perm[cursor : cursor + batch])
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
    # Block-local losses are per layer: report their mean.
    result.holdout_loss_before = float(np.mean(before)) if before else 0.0
    result.holdout_loss_after = float(np.mean(after)) if after else 0.0
    return healed, result


def clone_config(config: HealConfig, **changes) -> HealConfig:
    values = asdict(config)
    values.update(changes)
    return HealConfig(**values)


@dataclass
class Trial:
    """One plan of the heal-aware budget: searched under budget × looseness, healed, gated."""

    looseness: float
    saving: float
    drop_before: float  # held-out, before healing
    drop_after: float  # held-out, after healing
    margin: float  # standard error of drop_after
    passed: bool
    heal: dict
    seconds: float
    choices: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "choices"}


def budgeted_heal(
    search_at,
    heal_plan,
    gate,
    saving,
    max_drop: float,
    say=lambda m: None,
    looseness=(1.0, 4.0),
    max_looseness: float = 16.0,
    refine_steps: int = 1,
):
    """The largest-saving plan that still meets the budget after healing.

    `search_at(f)` → choices searched under the budget × f (a looser proxy budget lets the search
    cut deeper, trusting healing to recover); `heal_plan(choices)` → (choices, HealResult);
    `gate(choices)` → (drop, margin) on held-out calibration data neither the search's correction
    nor healing saw; `saving(choices)` → the objective's saving. Looseness doubles (×4) from the
    starting points while healed plans pass, then bisects geometrically between the last pass and
    the first failure. Returns (best passing trial or the smallest-drop one, all trials)."""
    trials: list[Trial] = []

    def run(factor: float) -> Trial:
        started = time.perf_counter()
        choices = search_at(factor)
        drop_before, _ = gate(choices)
        healed, result = heal_plan(choices) if choices else (choices, None)
        drop_after, margin = gate(healed)
        trial = Trial(
            factor,
            saving(healed),
            drop_before,
            drop_after,
            margin,
            drop_after + margin <= max_drop,
            result.to_dict() if result else {},
            time.perf_counter() - started,
            healed,
        )
        say(
            f"heal budget: looseness {factor:g}: drop {drop_before:.4f} -> {drop_after:.4f} healed "
            f"(± {margin:.4f}), {'pass' if trial.passed else 'fail'}, saving {trial.saving:,.0f}"
        )
        trials.append(trial)
        return trial

    low, high = None, None
    for factor in looseness:
        if run(factor).passed:
            low = factor
        else:
            high = factor
            break
    while high is None and low is not None and low * 4 <= max_looseness:
        factor = low * 4
        if run(factor).passed:
            low = factor
        else:
            high = factor
    for _ in range(refine_steps if low is not None and high is not None else 0):
        factor = math.sqrt(low * high)
        if run(factor).passed:
            low = factor
        else:
            high = factor
    passing = [t for t in trials if t.passed]
    best = max(passing, key=lambda t: t.saving) if passing else min(trials, key=lambda t: t.drop_after)
    return best, trials


__all__ = [
    "AUGMENTATIONS",
    "HealConfig",
    "HealResult",
    "Trial",
    "augment_images",
    "budgeted_heal",
    "clone_config",
    "heal",
    "parse_augment",
    "split_for_healing",
]


# --- the pipeline's entry points ---------------------------------------------------------------------


def config_from(heal, seed: int = 0) -> HealConfig | None:
    """None (no healing), True (default steps), a step count, or a HealConfig."""
    if heal is None or heal is False:
        return None
    if isinstance(heal, HealConfig):
        return heal
    if heal is True:
        return HealConfig(seed=seed)
    steps = int(heal)
    if steps < 1:
        raise TnoptError(f"--heal STEPS must be ≥ 1, got {heal}")
    return HealConfig(steps=steps, seed=seed)


def _gate(original, data, runtime, metric_choice, drop_type: str):
    """A function choices → (metric drop, its standard error) on `data`, and the metric used."""
    from tnopt.graph import output_producer
    from tnopt.metrics import choose_metric, paired_standard_error

    reference = runtime.run(original, data.inputs)
    metric = choose_metric(metric_choice, data.labels, data.synthetic, reference, output_producer(original))
    measurable = metric.name != "top1" or data.labels is not None
    baseline = metric(reference, reference, data.labels) if measurable else None

    def gate(choices) -> tuple[float | None, float]:
        if not measurable:
            return None, 0.0
        model, _ = apply_plan(original, choices)
        outputs = runtime.run(model, data.inputs)
        value = metric(reference, outputs, data.labels)
        margin = paired_standard_error(metric.name, reference, outputs, data.labels) if choices else 0.0
        if drop_type == "relative" and baseline:
            margin /= abs(baseline)
        return metric.drop(value, baseline, drop_type), margin

    return gate, metric


def heal_fixed_plan(original, choices, train, holdout, runtime, config, metric, report, say):
    """Fixed ranks: heal the plan; the report gets the held-out drop before and after."""
    gate, used = _gate(original, holdout, runtime, metric, "absolute")
    started = time.perf_counter()
    before, _ = gate(choices)
    healed, result = heal(original, choices, train, holdout, runtime, config, say)
    after, margin = gate(healed)
    report.heal = {
        "config": asdict(config),
        "metric": used.name,
        "holdout": holdout.source,
        "plans": [
            {
                "looseness": None,
                "drop_before": before,
                "drop_after": after,
                "margin": margin,
                "seconds": time.perf_counter() - started,
                "heal": result.to_dict(),
            }
        ],
        "seconds": time.perf_counter() - started,
    }
    say(f"heal: held-out {used.name} drop {before:.4f} -> {after:.4f} in {result.seconds:.1f} s")
    return healed


def heal_budgeted_plan(original, layers, candidates, *, budget, search_options, holdout, config, report):
    """Budgeted search that judges plans after healing (see `budgeted_heal`); fills report.budget,
    report.search (of the chosen plan's search) and report.heal (every plan tried)."""
    from tnopt import budget as B
    from tnopt.report import Report
    from tnopt.search import run_search

    started = time.perf_counter()
    max_drop, drop_type = B.parse_budget(budget)
    runtime, say = search_options["runtime"], search_options["say"]
    gate, used = _gate(original, holdout, runtime, search_options["metric"], drop_type)
    searched: dict[float, tuple] = {}

    def search_at(factor: float):
        scratch = Report(model=report.model, provider=report.provider, before=report.before)
        loose = {"max_drop": max_drop * factor, "drop_type": drop_type}
        choices, decisions = run_search(
            original, layers, candidates, budget=loose, report=scratch, **search_options
        )
        searched[factor] = (scratch, decisions)
        return choices

    def heal_plan(choices):
        return heal(original, choices, search_options["calib"], holdout, runtime, config, say)

    flops = search_options["objective"] != "params"

    def saving(choices) -> float:
        total = 0
        for c in choices:
            cost = METHODS[c.method].cost(c.layer, c.factors.rank)
            total += (c.layer.flops - cost.flops) if flops else (c.layer.params - cost.params)
        return float(total)

    best, trials = budgeted_heal(search_at, heal_plan, gate, saving, max_drop, say)
    scratch, decisions = searched[best.looseness]
    report.search = dict(scratch.search)
    report.warnings.extend(w for w in scratch.warnings if w not in report.warnings)
    evaluation = search_options["evaluation"]
    eval_gate, _ = _gate(original, evaluation, runtime, used.name if used.name != "user" else used, drop_type)
    eval_drop, eval_margin = eval_gate(best.choices)
    report.budget = dict(scratch.budget or {})
    report.budget.update(
        {
            "max_drop": max_drop,
            "proxy_max_drop": max_drop * best.looseness,
            "drop_holdout_healed": best.drop_after,
            "margin_holdout_healed": best.margin,
            "drop_evaluation": eval_drop,
        }
    )
    miss = None
    if not best.passed:
        miss = (
            f"no healed plan meets a {used.name} drop ≤ {max_drop:g} on the held-out calibration data "
            f"(smallest {best.drop_after:.4f} ± {best.margin:.4f})"
        )
    elif eval_drop is not None and eval_drop > max_drop + 1e-12:
        miss = f"{used.name} drop on the evaluation data {eval_drop:.4f} exceeds the budget {max_drop:g}"
    report.search["miss_reason"] = miss or ""
    report.budget_met = miss is None
    if miss:
        say(f"budget not met: {miss}")
    report.heal = {
        "config": asdict(config),
        "metric": used.name,
        "holdout": holdout.source,
        "chosen_looseness": best.looseness,
        "plans": [t.to_dict() for t in trials],
        "seconds": time.perf_counter() - started,
    }
    return best.choices, decisions
