"""The only module that orders the stages:

load → analyze → (calibration data) → factorize candidates → choose ranks (fixed rule or budgeted
search with onnxruntime in the loop) → rewrite → validate on evaluation data → report.
Saving is the caller's (CLI) last step, through io.save_model_atomic.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from tnopt import io
from tnopt.analyze import Layer, analyze
from tnopt.correct import Corrector
from tnopt.data import Dataset, class_indices, input_specs, load_npz, random_inputs
from tnopt.errors import TnoptError, UnsupportedModelError
from tnopt.graph import op_counts, parameter_count
from tnopt.metrics import fidelity_report
from tnopt.passes import METHODS
from tnopt.profile import collect_stats, load_stats, save_stats
from tnopt.report import LayerReport, ModelSummary, Report
from tnopt.rewrite import Choice, apply_plan
from tnopt.runtime import Runtime
from tnopt.switchboard import board_if_faster

DEFAULT_RANDOM_SAMPLES = 64
# Calibration moments and the least-squares refit converge long before this many samples.
MAX_STATS_SAMPLES = 2048
MAX_REFIT_SAMPLES = 512
# Methods whose data-aware form needs the im2col (patch) moment of a Conv input.
PATCH_METHODS = ("cut-o",)


def resolve_methods(methods: str | list[str] | None) -> list[str]:
    if methods in (None, "auto"):
        return list(METHODS)
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise TnoptError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} or auto")
    return names


def applicable_methods(layer: Layer, methods: list[str]) -> tuple[list[str], str | None]:
    """Methods that accept `layer`, or the first skip reason when none does."""
    accepted, reasons = [], []
    for name in methods:
        reason = METHODS[name].check(layer)
        (reasons.append(reason) if reason else accepted.append(name))
    if accepted:
        return accepted, None
    handles = [n for n in methods if layer.op in METHODS[n].op_types]
    if not handles:
        return [], f"no selected method handles {layer.op} (selected: {', '.join(methods)})"
    return [], layer.skip_reason or reasons[0]


def load_data(data, model: onnx.ModelProto, *, seed: int = 0, role: str = "data") -> Dataset | None:
    if data is None:
        return None
    if isinstance(data, Dataset):
        return data
    specs = input_specs(model)
    if isinstance(data, dict):
        labels = data.get("labels")
        inputs = {k: np.asarray(v) for k, v in data.items() if k != "labels"}
        source = f"{role} (in memory)"
        return Dataset(inputs, None if labels is None else class_indices(labels, source), source)
    return load_npz(data, specs)


def summarize(model: onnx.ModelProto) -> ModelSummary:
    inferred = model
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        pass
    flops = sum(layer.flops for layer in analyze(inferred))
    return ModelSummary(op_counts(model), parameter_count(model), flops, model.ByteSize())


def factorize(layer: Layer, method: str, rank, stats=None):
    # One BLAS thread: these matrices are small, and a multi-threaded OpenBLAS fighting
    # onnxruntime's spinning worker threads for 2 cores was measured 200x slower (1.5 s per SVD).
    with threadpool_limits(1):
        return METHODS[method].decompose(layer.weight, rank, stats)


MPO_METHODS = ("mpo", "mpo-storage")


def _with_mpo_cores(compress_fn):
    """Give the MPO methods `mpo_cores` cores for one call (the registry holds one instance each)."""

    @functools.wraps(compress_fn)
    def wrapper(model, *, mpo_cores: int | None = None, **options):
        if mpo_cores is None:
            return compress_fn(model, mpo_cores=None, **options)
        saved = {name: METHODS[name].cores for name in MPO_METHODS}
        try:
            for name in MPO_METHODS:
                METHODS[name].cores = int(mpo_cores)
            return compress_fn(model, mpo_cores=mpo_cores, **options)
        finally:
            for name, cores in saved.items():
                METHODS[name].cores = cores

    return wrapper


@_with_mpo_cores
def compress(
    model: str | onnx.ModelProto,
    *,
    methods: str | list[str] | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    ranks: dict[str, object] | None = None,
    budget=None,
    data=None,
    eval_data=None,
    metric: str | Callable | None = None,
    provider: str = "auto",
    objective: str = "flops",
    cache_dir: str | None = None,
    seed: int = 0,
    progress: bool = False,
    latency_guard: bool | None = None,
    data_aware: bool | None = None,
    correct: bool | None = None,
    allow_growth: bool = False,
    mpo_cores: int | None = None,
    min_layer_params: int = 0,
    exclude: str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Compress `model`; returns (compressed ModelProto, Report). Nothing is written to disk.

    Exactly one rank rule applies: `budget` (budgeted search), `ranks` (layer name → rank, or →
    (method, rank) to choose the method per layer),
    `energy` (keep that fraction of singular-value energy) or `rank_ratio` (fraction of full rank;
    0.5 when nothing is given). `allow_growth` rewrites layers even where the factorized form has
    more parameters than the dense layer (used to test exactness at full rank).
    `data_aware` (whitened factors from calibration moments) and `correct` (sequential least-squares
    refit of each layer's last factor) default to on when real data is given, off on random inputs.
    `mpo_cores` sets the MPO methods' number of cores for this run; `min_layer_params` and
    `exclude` (a regular expression on node names) leave layers dense, with that reason reported.
    """
    try:
        excluded = re.compile(exclude) if exclude else None
    except re.error as exc:
        raise TnoptError(f"--exclude {exclude!r} is not a regular expression ({exc})") from None
    say = log or (lambda message: None)
    started = time.perf_counter()
    source = model if isinstance(model, str) else getattr(model.graph, "name", "model")
    original = io.load_model(model)
    runtime = Runtime(provider)
    method_names = resolve_methods(methods)
    layers = analyze(original)
    if not layers:
        raise UnsupportedModelError(f"{source}: no Conv, Gemm or constant-weight MatMul layers to compress")

    report = Report(model=str(source), provider=runtime.provider_name, before=summarize(original))

    candidates: dict[str, list[str]] = {}
    for layer in layers:
        accepted, reason = applicable_methods(layer, method_names)
        if accepted and layer.params < min_layer_params:
            accepted, reason = [], f"{layer.params:,} params < --min-layer-params {min_layer_params:,}"
        if accepted and excluded is not None and excluded.search(layer.name):
            accepted, reason = [], f"excluded by --exclude {exclude!r}"
        if accepted:
            candidates[layer.name] = accepted
        else:
            report.layers.append(_layer_entry(layer, "skipped", reason))
    if not candidates:
        raise UnsupportedModelError(
            f"{source}: none of the {len(layers)} layers can be factorized ({report.layers[0].reason})"
        )
    calib = load_data(data, original, seed=seed, role="calibration data")
    evaluation = load_data(eval_data, original, seed=seed, role="evaluation data")
    if calib is None and evaluation is None:
        calib = random_inputs(input_specs(original), DEFAULT_RANDOM_SAMPLES, seed)
        message = (
            f"no --data given: validating on {len(calib)} seeded random inputs; only fidelity "
            "metrics (agreement, cosine, rel-l2) mean anything on them"
        )
        report.warnings.append(message)
        warnings.warn(message, stacklevel=2)
        say(f"warning: {message}")
    if evaluation is None:
        if budget is not None and calib is not None and len(calib) >= 4 and not calib.synthetic:
            calib, evaluation = calib.split(0.5)
            report.warnings.append(
                f"no --eval-data: searched on {calib.source}, evaluated on {evaluation.source}"
            )
        else:
            evaluation = calib
    if calib is None:
        calib = evaluation
    report.data, report.eval_data = calib.source, evaluation.source
    by_name = {layer.name: layer for layer in layers}

    real_data = not calib.synthetic
    data_aware = real_data if data_aware is None else data_aware
    correct = real_data if correct is None else correct
    # With explicit ranks only the named layers are factorized: the others need no statistics.
    targets = [by_name[n] for n in candidates if budget is not None or ranks is None or n in ranks]
    if budget is not None:
        planned_methods = {m for n in candidates for m in candidates[n]}
    elif ranks is not None:
        planned_methods = {
            r[0] if isinstance(r, tuple) and r and isinstance(r[0], str) else candidates[n][0]
            for n, r in ranks.items()
            if n in candidates
        }
    else:
        planned_methods = {candidates[n][0] for n in candidates}
    stats = {}
    if data_aware and targets:
        stats_start = time.perf_counter()
        stats_data = calib.head(MAX_STATS_SAMPLES)
        want_patches = any(m in planned_methods for m in PATCH_METHODS)
        stats_file = None
        if cache_dir:
            model_hash = hashlib.sha256(original.SerializeToString()).hexdigest()[:16]
            stats_file = Path(cache_dir) / f"{model_hash}-{stats_data.fingerprint()}-stats2.npz"
            stats = load_stats(stats_file) if stats_file.exists() else {}
        missing = [
            layer
            for layer in targets
            if layer.name not in stats
            or (want_patches and layer.op == "Conv" and stats[layer.name].patch_moment is None)
        ]
        if missing:
            stats.update(
                collect_stats(original, missing, stats_data.inputs, runtime, want_patches=want_patches)
            )
            if stats_file is not None:
                stats_file.parent.mkdir(parents=True, exist_ok=True)
                save_stats(stats_file, stats)
        report.timings["stats_cached_layers"] = len(targets) - len(missing)
        report.timings["stats_s"] = time.perf_counter() - stats_start
        say(
            f"calibration statistics: {len(targets)} layers from {len(stats_data)} samples, "
            f"{len(targets) - len(missing)} from cache"
        )
    report.factors = {"data_aware": bool(stats), "correct": bool(correct)}

    def factor_fn(layer, method, rank):
        return factorize(layer, method, rank, stats.get(layer.name))

    corrector = (
        Corrector(original, targets, calib.head(MAX_REFIT_SAMPLES).inputs, runtime) if correct else None
    )

    if budget is not None:
        from tnopt.search import run_search

        choices, decisions = run_search(
            original,
            [by_name[n] for n in candidates],
            candidates,
            calib=calib,
            evaluation=evaluation,
            budget=budget,
            metric=metric,
            objective=objective,
            runtime=runtime,
            cache_dir=cache_dir,
            seed=seed,
            progress=progress,
            latency_guard=True if latency_guard is None else latency_guard,
            report=report,
            say=say,
            factorize=factor_fn,
            correct=corrector,
            # The sweep measures uncorrected layers, so corrected and uncorrected runs share its cache.
            factor_mode=("white" if stats else "weight") + (f"-mpo{mpo_cores}" if mpo_cores else ""),
        )
    else:
        choices, decisions = _fixed_rank_plan(
            [by_name[n] for n in candidates], candidates, rank_ratio, energy, ranks, allow_growth, factor_fn
        )
        if corrector is not None and choices:
            choices = _corrected_on_board(corrector, choices, original, runtime)
    report.timings["plan_s"] = time.perf_counter() - started

    compressed, _ = apply_plan(original, choices)
    compressed_eval_start = time.perf_counter()
    reference = runtime.run(original, evaluation.inputs)
    outputs = runtime.run(compressed, evaluation.inputs)
    report.metrics.update(fidelity_report(reference, outputs, evaluation.labels))
    report.timings["validate_s"] = time.perf_counter() - compressed_eval_start

    chosen = {c.layer.name: c for c in choices}
    for name in candidates:
        layer = by_name[name]
        decision = decisions.get(name, {})
        entry = _layer_entry(layer, "rewritten" if name in chosen else "kept", decision.get("reason", ""))
        entry.sensitivity = decision.get("sensitivity", {})
        entry.latency_before_ms = decision.get("latency_before_ms")
        entry.latency_after_ms = decision.get("latency_after_ms")
        if name in chosen:
            choice = chosen[name]
            cost = METHODS[choice.method].cost(layer, choice.factors.rank)
            entry.method, entry.rank = choice.method, choice.rank_label
            entry.params_after, entry.flops_after = cost.params, cost.flops
            entry.weight_error = choice.factors.rel_error
            entry.factor_notes = {
                k: v for k, v in choice.factors.notes.items() if isinstance(v, (bool, int, float, str))
            }
        report.layers.append(entry)
    order = {layer.name: i for i, layer in enumerate(layers)}
    report.layers.sort(key=lambda entry: order[entry.name])
    report.after = summarize(compressed)
    report.timings["total_s"] = time.perf_counter() - started
    return compressed, report


def _corrected_on_board(corrector: Corrector, choices, original, runtime):
    """Fixed ranks: the chosen rewrites on one switchboard where that is timed faster, so the
    correction refits every layer from one session instead of exporting the model cut after each."""
    paddable = [c for c in choices if METHODS[c.method].zero_paddable]
    corrector.board, _ = board_if_faster(
        original, paddable, runtime, corrector.inputs, corrector.hidden_tensors(paddable)
    )
    return corrector(choices)


def _layer_entry(layer: Layer, decision: str, reason: str | None) -> LayerReport:
    return LayerReport(
        layer.name,
        layer.op,
        list(layer.weight_shape),
        decision,
        reason or "",
        params_before=layer.params,
        flops_before=layer.flops,
    )


def _fixed_rank_plan(layers, candidates, rank_ratio, energy, ranks, allow_growth, factor_fn):
    """One method per layer (the first selected that accepts it) at a rank from the given rule."""
    if sum(x is not None for x in (rank_ratio, energy, ranks)) > 1:
        raise TnoptError("give only one of --rank-ratio, --energy, ranks")
    if rank_ratio is None and energy is None and ranks is None:
        rank_ratio = 0.5
    if rank_ratio is not None and not 0 < rank_ratio <= 1:
        raise TnoptError(f"--rank-ratio must be in (0, 1], got {rank_ratio}")
    if energy is not None and not 0 < energy <= 1:
        raise TnoptError(f"--energy must be in (0, 1], got {energy}")
    choices, decisions = [], {}
    for layer in layers:
        method_name = candidates[layer.name][0]
        if ranks is not None:
            if layer.name not in ranks:
                decisions[layer.name] = {"reason": "no rank given for this layer"}
                continue
            rank = ranks[layer.name]
            if isinstance(rank, tuple) and rank and isinstance(rank[0], str):
                method_name, rank = rank  # (method, rank): this layer's method chosen by the caller
                if method_name not in candidates[layer.name]:
                    raise TnoptError(f"{layer.name}: method {method_name} does not accept this layer")
        method = METHODS[method_name]
        if energy is not None:
            rank = method.rank_from_energy(layer, energy)
        elif rank_ratio is not None:
            rank = method.rank_from_ratio(layer, rank_ratio)
        cost = method.cost(layer, rank)
        if cost.params > layer.params and not allow_growth:
            decisions[layer.name] = {
                "reason": f"{method_name} at rank {method.rank_label(rank)} has "
                f"{cost.params:,} params > dense {layer.params:,}; kept dense"
            }
            continue
        factors = factor_fn(layer, method_name, rank)
        if factors.notes.get("refused"):
            decisions[layer.name] = {"reason": f"{method_name}: {factors.notes['refused']}"}
            continue
        choices.append(Choice(layer, method_name, factors))
    return choices, decisions
