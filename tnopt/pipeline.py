"""The only module that orders the stages:

load → analyze → (calibration data) → factorize candidates → choose ranks (fixed rule, tnopt/fixed.py,
or budgeted search with onnxruntime in the loop, tnopt/search.py) → refine → export → validate on
evaluation data → report. Saving is the caller's (CLI) last step, through io.save_model_atomic.

`compress(model, config)` runs one `RunConfig`; `compress(model, **keywords)` builds it from the
keywords (the Python API). One `PlanRunner` per run runs and exports every plan.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from functools import partial
from typing import Callable

import onnx
from threadpoolctl import threadpool_limits

from tnopt import allocator, gain, heal_budget, io, numerics, threads, validate
from tnopt import heal as healing
from tnopt.analyze import Layer, analyze, at_data_shapes
from tnopt.config import RunConfig, resolve_methods
from tnopt.data import Dataset, as_feeds, dataset_from_arrays, input_specs, load_npz, random_inputs
from tnopt.errors import TnoptError, UnsupportedModelError
from tnopt.fixed import fixed_rank_plan
from tnopt.graph import declare_outputs, op_counts, parameter_count
from tnopt.latency import whole_model_latency
from tnopt.layout import activation_bytes, bind_dims, restore_interface
from tnopt.metric_choice import add_output_figures
from tnopt.metrics import fidelity_report
from tnopt.passes import METHODS
from tnopt.plan import Plan
from tnopt.profile import MAX_MOMENT_FEATURES, calibration_stats, moment_width, split_by_moment_width
from tnopt.reference_tap import tapped_reference
from tnopt.refine import CROSS_FIT_FOLDS, apply_refiners, build_refiners, cross_fitted_refiners
from tnopt.report import LayerReport, ModelSummary, Report
from tnopt.runner import PlanRunner
from tnopt.runtime import Runtime, batch_size_for, batched_working_model
from tnopt.stages import StageClock
from tnopt.threads import math_threads

DEFAULT_RANDOM_SAMPLES = 64

__all__ = ["compress", "resolve_methods", "applicable_methods", "factorize"]


def applicable_methods(layer: Layer, methods: list[str], table=None) -> tuple[list[str], str | None]:
    """Methods that accept `layer`, or the first skip reason when none does."""
    table = table or METHODS
    accepted, reasons = [], []
    for name in methods:
        reason = table[name].check(layer)
        (reasons.append(reason) if reason else accepted.append(name))
    if accepted:
        return accepted, None
    handles = [n for n in methods if layer.op in table[n].op_types]
    if not handles:
        return [], f"no selected method handles {layer.op} (selected: {', '.join(methods)})"
    return [], layer.skip_reason or reasons[0]


def load_data(
    data, model: onnx.ModelProto, *, seed: int = 0, role: str = "data", batch_axes=None
) -> Dataset | None:
    """A Dataset from a .npz/.npy path or an in-memory dict of arrays in the model's own layout."""
    if data is None:
        return None
    if isinstance(data, Dataset):
        return data
    specs = input_specs(model)
    if isinstance(data, dict):
        return dataset_from_arrays(data, specs, f"{role} (in memory)", batch_axes)
    return load_npz(data, specs, batch_axes)


def summarize(model: onnx.ModelProto, feeds=None) -> ModelSummary:
    """Op counts, parameters and FLOPs per sample: with `feeds`, at the shapes the data binds the
    symbolic dims to (a fully convolutional model's FLOPs at its real resolution), else with
    symbolic dims counted as 1."""
    inferred = model
    if feeds is not None:
        inferred = bind_dims(model, as_feeds(feeds))
    else:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:
            pass
    flops = sum(layer.flops for layer in analyze(inferred))
    return ModelSummary(op_counts(model), parameter_count(model), flops, model.ByteSize())


def factorize(layer: Layer, method: str, rank, stats=None, table=None, *, estimate: bool = False):
    # One BLAS thread unless the machine has idle cores (tnopt/threads.py): a multi-threaded
    # OpenBLAS fighting onnxruntime's spinning worker threads for 2 cores was measured 200x slower.
    with math_threads(int(getattr(layer.weight, "size", 0) or 0)):
        return numerics.guarded_decompose((table or METHODS)[method], layer, rank, stats, estimate=estimate)


def fold_factors(stats: dict, table=None):
    """The gate's fold factors (tnopt/fold_stats.py) where the statistics kept per-fold moments;
    None when no layer has them."""
    with_folds = [item for item in stats.values() if item.fold_moments]
    if not with_folds:
        return None
    from tnopt.fold_stats import FoldFactors

    def fit(layer, method, rank, layer_stats):
        return factorize(layer, method, rank, layer_stats, table)

    return FoldFactors(stats, fit, len(with_folds[0].fold_moments))


def compress(
    model: str | onnx.ModelProto,
    config: RunConfig | None = None,
    /,
    *,
    log: Callable[[str], None] | None = None,
    **options,
) -> tuple[onnx.ModelProto, Report]:
    """Compress `model` under `config` (or a RunConfig made of the keyword `options`: see its
    docstring for each); returns (compressed ModelProto, Report). Nothing is written to disk."""
    if config is None:
        config = RunConfig(**options)
    elif options:
        raise TypeError(f"compress() takes a RunConfig or keyword options, not both ({', '.join(options)})")
    return _run(model, config, log or (lambda message: None))


def _candidates(layers, config: RunConfig, report: Report) -> dict[str, list[str]]:
    candidates: dict[str, list[str]] = {}
    report.layers = [entry for entry in report.layers if entry.decision != "skipped"]
    for layer in layers:
        accepted, reason = applicable_methods(layer, list(config.method_names), config.method_table)
        if accepted and layer.params < config.min_layer_params:
            accepted, reason = [], f"{layer.params:,} params < --min-layer-params {config.min_layer_params:,}"
        if accepted and config.exclude_pattern is not None and config.exclude_pattern.search(layer.name):
            accepted, reason = [], f"excluded by --exclude {config.exclude!r}"
        if accepted:
            candidates[layer.name] = accepted
        else:
            report.layers.append(_layer_entry(layer, "skipped", reason))
    return candidates


def _splits(original, config: RunConfig, report: Report, say):
    axes = config.batch_axes
    calib = load_data(config.data, original, seed=config.seed, role="calibration data", batch_axes=axes)
    evaluation = load_data(
        config.eval_data, original, seed=config.seed, role="evaluation data", batch_axes=axes
    )
    if calib is None and evaluation is None:
        calib = random_inputs(input_specs(original), DEFAULT_RANDOM_SAMPLES, config.seed, axes)
        message = (
            f"no --data given: validating on {len(calib)} seeded random inputs; only fidelity "
            "metrics (agreement, cosine, rel-l2) mean anything on them"
        )
        report.warnings.append(message)
        warnings.warn(message, stacklevel=4)
        say(f"warning: {message}")
    if evaluation is None:
        if config.budget is not None and calib is not None and len(calib) >= 4 and not calib.synthetic:
            calib, evaluation = calib.split(0.5)
            report.warnings.append(
                f"no --eval-data: searched on {calib.source}, evaluated on {evaluation.source}"
            )
        else:
            evaluation = calib
    if calib is None:
        calib = evaluation
    return calib, evaluation


def _run(model, config: RunConfig, say) -> tuple[onnx.ModelProto, Report]:
    started = time.perf_counter()
    math_before = dict(threads.counts)
    if config.budget is None:
        config.check_rank_rule()
    clock = StageClock()
    source = model if isinstance(model, str) else getattr(model.graph, "name", "model")
    clock.begin("load")
    original, declared_outputs, declared_value_info = io.load_model_declared(model)
    validate.check_model_outputs(original)
    clock.end()
    runtime = Runtime(config.provider)
    # The user's model must load in onnxruntime before any warning is printed or work is spent.
    runtime.session(original)
    clock.counter = lambda: runtime.sample_forwards
    table = config.method_table
    layers = analyze(original)
    if not layers:
        raise UnsupportedModelError(f"{source}: no Conv, Gemm or constant-weight MatMul layers to compress")

    report = Report(model=str(source), provider=runtime.provider_name, before=summarize(original))
    candidates = _candidates(layers, config, report)
    if not candidates:
        raise UnsupportedModelError(
            f"{source}: none of the {len(layers)} layers can be factorized ({report.layers[0].reason})"
        )
    clock.begin("data")
    calib, evaluation = _splits(original, config, report, say)
    heal_config, heal_holdout = config.heal_config, None
    if heal_config is not None:
        if calib.synthetic:
            raise TnoptError("--heal needs real calibration data (--data): it distils the original on it")
        # An augmentation the model's inputs cannot take is refused before the search, not after it.
        healing.check_augment(original, heal_config.augment)
        # Healing keeps part of the calibration data away from everything that fits (statistics,
        # refits, healing) for its early stopping and the budget gate.
        calib, heal_holdout = healing.split_for_healing(calib, heal_config)
    # The model as the search runs it: a fixed-batch model gets a dynamic-batch copy where that is
    # proven to give the same outputs (its interface is restored on the result); FLOPs, costs and
    # the batch size come from the shapes the data binds the symbolic dims to.
    interface = original
    original, batching = batched_working_model(original, calib.inputs, runtime)
    if batching:
        say(f"batching: {batching}")
    bound = bind_dims(original, calib.inputs)
    layers = at_data_shapes(analyze(original), analyze(bound) if bound is not original else [])
    sample_bytes = activation_bytes(bound)
    del bound  # a copy of the model (its weights too): read for its shapes only
    runtime.batch_size = batch_size_for(sample_bytes)
    candidates = _candidates(layers, config, report)
    report.before = summarize(interface, calib.inputs)
    report.batching = {
        "batch_size": runtime.batch_size,
        "sample_activation_bytes": sample_bytes,
        "batch_axes": dict(calib.inputs.axes),
        "fixed_batch": batching,
    }
    clock.end()
    report.data, report.eval_data = calib.source, evaluation.source
    by_name = {layer.name: layer for layer in layers}

    real_data = not calib.synthetic
    data_aware = real_data if config.data_aware is None else config.data_aware
    correct = real_data if config.correct is None else config.correct
    # With explicit ranks only the named layers are factorized: the others need no statistics.
    ranks = config.ranks
    targets = [by_name[n] for n in candidates if config.budget is not None or ranks is None or n in ranks]
    if config.budget is not None:
        planned_methods = {m for n in candidates for m in candidates[n]}
    elif ranks is not None:
        planned_methods = {
            r[0] if isinstance(r, tuple) and r and isinstance(r[0], str) else candidates[n][0]
            for n, r in ranks.items()
            if n in candidates
        }
    else:
        planned_methods = {candidates[n][0] for n in candidates}
    if config.budget is not None and config.sensitivity == "auto":
        from tnopt.predict import choose_sensitivity

        mode, why = choose_sensitivity(
            targets, candidates, table, len(calib), report.batching["sample_activation_bytes"]
        )
        config = replace(config, sensitivity=mode, sensitivity_reason=why)
        say(f"sensitivity: {mode} ({why})")
    stats = {}
    tapped: list = []  # the original's outputs per batch of the statistics pass (tnopt/reference_tap.py)
    # The statistics pass of this run (the data-aware factors' or the predictor's, below).
    moment_targets, too_wide = split_by_moment_width(targets)
    if too_wide and data_aware:
        widest = max(too_wide, key=moment_width)
        message = (
            f"{len(too_wide)} layer(s) read more than {MAX_MOMENT_FEATURES} input features ({widest.name}: "
            f"{moment_width(widest):,}, its input moment {8 * moment_width(widest) ** 2 / 2**30:.1f} GiB in "
            "float64): their factors are weight-only, not whitened by the calibration data"
        )
        report.warnings.append(message)
        say(f"note: {message}")
    deadline = None if config.time_limit is None else started + float(config.time_limit)
    statistics = partial(
        calibration_stats,
        original,
        moment_targets,
        calib,
        runtime,
        config.cache_dir,
        planned_methods,
        report,
        say,
        out_of_time=None if deadline is None else lambda: time.perf_counter() >= deadline,
    )
    clock.begin("statistics")
    if data_aware and targets:
        stats = statistics(
            # The budget's gate fits each fold's whitened factors without that fold's samples.
            folds=CROSS_FIT_FOLDS if config.budget is not None else None,
            # The original's outputs, for the budget's search or the fixed-rank correction's check.
            outputs_into=tapped if config.budget is not None or correct else None,
        )
    clock.end()
    report.factors = {"data_aware": bool(stats), "correct": bool(correct)}
    # The predicted sweep reads the moments even where the factors stay weight-only.
    predictor_stats = stats
    if config.budget is not None and config.sensitivity == "predicted" and not stats and targets:
        clock.begin("statistics")
        predictor_stats = statistics(outputs_into=tapped)
        clock.end()

    def factor_fn(layer, method, rank):
        return factorize(layer, method, rank, stats.get(layer.name), table)

    def estimate_fn(layer, method, rank):
        return factorize(layer, method, rank, stats.get(layer.name), table, estimate=True)

    runner = PlanRunner(original, runtime, table)
    refiners = build_refiners(config, runner, targets, calib, correct=correct)
    # The budget's gate scores each calibration sample under refits fitted without it.
    cross_fit = (
        cross_fitted_refiners(
            config,
            runner,
            targets,
            calib,
            correct=correct,
            fold_factors=fold_factors(stats, table),
            whitening_note="no layer kept per-fold moments (rows not split by sample, or past the byte cap)"
            if stats
            else "",
        )
        if config.budget is not None
        else []
    )
    decisions: dict[str, dict] = {}
    evaluated = None
    clock.begin("search" if config.budget is not None else "plan")
    reference = tapped_reference(tapped, original, calib.inputs, len(calib), runtime)
    del tapped
    # The sweep measures unrefined layers, so refined and unrefined runs share its cache.
    factor_mode = ("white" if stats else "weight") + config.method_options.cache_tag

    def search_at(budget):
        from tnopt.search import Search

        layers_searched = [by_name[n] for n in candidates]
        searched = Search(
            config if budget is config.budget else replace(config, budget=budget),
            runner,
            layers_searched,
            candidates,
            calib,
            evaluation,
            factorize=factor_fn,
            estimate=estimate_fn,
            refiners=refiners,
            factor_mode=factor_mode,
            say=say,
            stats=predictor_stats,
            deadline=deadline,
            cross_fit=cross_fit,
            reference=reference,
        )
        # One BLAS thread for the whole search (the correction's normal equations and solves, local
        # errors, metrics), as for the factorizations and statistics: beside onnxruntime's worker
        # threads, numpy's 2-thread OpenBLAS on 2 busy cores ran a refit's 145x145 solve 10-50x
        # slower (1.4 ms alone, 13-69 ms) — 127 of MiniLM's 730 s were grams and solves.
        with threadpool_limits(1, user_api="blas"):
            return searched.run()

    if config.budget is not None and heal_config is not None:
        plan, decisions = heal_budget.heal_budgeted_plan(
            runner, config, search_at, calib, heal_holdout, evaluation, report, say, deadline=deadline
        )
    elif config.budget is not None:
        result = search_at(config.budget)
        plan, decisions = result.plan, result.decisions
        evaluated = result.evaluation_outputs
        report.budget, report.budget_met, report.search = result.budget, result.budget_met, result.search
        report.warnings.extend(result.budget.get("metric_warnings", []))
        report.timings.update(result.timings)
    else:
        plan, decisions = fixed_rank_plan(
            [by_name[n] for n in candidates], candidates, config, table, factor_fn
        )
        if refiners and len(plan):
            _prepare_for_refiners(runner, plan, refiners, table)
            plan = _refined_if_better(
                runner, plan, apply_refiners(refiners, plan), calib, reference, report, say
            )
        if heal_config is not None and len(plan):
            plan = heal_budget.heal_fixed_plan(runner, config, plan, calib, heal_holdout, report, say)
    clock.end()
    reference = None  # the searches have it; the later stages do not hold it
    _release_search_memory(runner, stats, predictor_stats)
    report.timings["plan_s"] = time.perf_counter() - started

    clock.begin("rewrite")
    compressed = runner.export(plan)
    kept_inputs = {value.name for value in compressed.graph.input}
    gone = [value.name for value in original.graph.input if value.name not in kept_inputs]
    if gone:
        # Initializers listed as inputs by convention (every one of them was): rewritten weights go.
        report.warnings.append(
            f"graph input(s) {', '.join(gone[:5])} held weights of rewritten layers and are no longer inputs"
        )
    clock.begin("validate")
    compressed_eval_start = time.perf_counter()
    if evaluated is not None and evaluated[0] is plan:
        _, reference, outputs = evaluated  # the search's held-out check ran this plan, exported, on them
    else:
        reference = runtime.run(original, evaluation.inputs)
        outputs = runtime.run(runtime.session(compressed, own=True), evaluation.inputs)
    report.metrics.update(fidelity_report(reference, outputs, evaluation.labels))
    add_output_figures(report, original, reference, outputs, config.metric, say)
    clock.end()
    report.timings["validate_s"] = time.perf_counter() - compressed_eval_start
    if interface is not original:
        compressed = restore_interface(compressed, interface)
    declare_outputs(compressed, declared_outputs)
    if config.latency_batch:
        clock.begin("latency")
        report.latency = whole_model_latency(
            interface, compressed, evaluation.inputs, config.latency_batch, runtime
        )
        clock.end()
    _fill_layers(report, layers, candidates, by_name, plan, decisions, table)
    compressed = io.keep_declared_value_info(compressed, declared_value_info)
    report.after = summarize(compressed, calib.inputs)
    report.timings["total_s"] = time.perf_counter() - started
    # How tnopt's own math ran (tnopt/threads.py): sections on one BLAS thread / on every core.
    for count, key in ((1, "math_sections_one_thread"), (None, "math_sections_all_cores")):
        report.timings[key] = sum(
            n - math_before.get(t, 0) for t, n in threads.counts.items() if (t == 1) == (count == 1)
        )
    report.stages = clock.stages
    return compressed, report


def _release_search_memory(runner: PlanRunner, *stats: dict) -> None:
    """The plan is chosen and fitted: the runner's kept sessions, the factorizations' memos and the
    calibration moments (ResNet-50: 1.6 GB; the gate's fold factors and closures share the dicts)
    go, so that the stages after the search (export, validation, latency) start from what they need."""
    from tnopt.local_error import clear_widened
    from tnopt.passes._linalg import clear_memos

    runner.release()
    clear_memos()
    clear_widened()
    for moments in stats:
        moments.clear()
    # What was freed below glibc's mmap threshold (or before the CLI fixed it) stays in the heap
    # unless handed back: the stages after the search would start from the search's high-water mark.
    allocator.trim()


def _refined_if_better(
    runner: PlanRunner, plan: Plan, refined: Plan, calib, reference, report: Report, say
) -> Plan:
    """Fixed ranks: the refitted plan, unless its outputs are further from the original's than the
    plan's before the refits, on the very calibration data the refits were fitted on. A budget gates
    every plan it keeps; a fixed-rank plan is not gated, and the correction took PP-OCR det-tiny at
    rank 0.5 on 192 pages from relative L2 0.46 to 1.76 on the calibration pages in its economy mode
    (a few waves, the layers of a wave refitted together from an uncorrected upstream) and to 0.83 in
    its exact sequential one (bench/RESULTS.md, session 14: the economy's waves diverge, and the exact
    refits each lower their own layer's residual while the output worsens; not fixed).
    `reference`: the original's outputs on `calib` from the statistics pass, when it has them."""
    from tnopt.metrics import rel_l2

    if reference is None:  # the statistics pass's tap did not cover every sample
        reference = runner.run(Plan(), calib.inputs)
    before = rel_l2(reference, runner.run(plan, calib.inputs))
    after = rel_l2(reference, runner.run(refined, calib.inputs))
    if after <= before:
        return refined
    message = (
        f"the least-squares correction made the outputs worse on the calibration data (relative L2 "
        f"{before:.3f} -> {after:.3f}): the uncorrected factors are kept (--no-correct skips it)"
    )
    report.warnings.append(message)
    say(f"warning: {message}")
    return plan


def _prepare_for_refiners(runner: PlanRunner, plan: Plan, refiners, table) -> None:
    """Fixed ranks: the chosen rewrites on one switchboard where that is timed faster, so the
    correction refits every layer from one session instead of exporting the model cut after each."""
    paddable = [c for c in plan if table[c.method].zero_paddable]
    hidden = [n for r in refiners if hasattr(r, "hidden_tensors") for n in r.hidden_tensors(paddable)]
    inputs = next((r.inputs for r in refiners if hasattr(r, "inputs")), None)
    if inputs is not None:
        runner.prepare(paddable, inputs, hidden)


def _fill_layers(report: Report, layers, candidates, by_name, plan: Plan, decisions, table) -> None:
    chosen = {c.layer.name: c for c in plan}
    for name in candidates:
        layer = by_name[name]
        decision = decisions.get(name, {})
        entry = _layer_entry(layer, "rewritten" if name in chosen else "kept", decision.get("reason", ""))
        entry.sensitivity = decision.get("sensitivity", {})
        entry.latency_before_ms = decision.get("latency_before_ms")
        entry.latency_after_ms = decision.get("latency_after_ms")
        entry.latency_verdicts = decision.get("latency_verdicts", {})
        if name in chosen:
            choice = chosen[name]
            cost = table[choice.method].cost(layer, choice.factors.rank)
            entry.method, entry.rank = choice.method, choice.rank_label
            entry.params_after, entry.flops_after = cost.params, cost.flops
            entry.bytes_after = sum(int(a.nbytes) for a in choice.factors.arrays.values())
            growth = gain.flops_growth_note(layer.flops, cost.flops)
            if growth:
                entry.reason = f"{entry.reason}; {growth}" if entry.reason else growth
                report.warnings.append(f"{name}: {growth} ({choice.method} at rank {choice.rank_label})")
            entry.weight_error = choice.factors.rel_error
            entry.factor_notes = {
                k: v for k, v in choice.factors.notes.items() if isinstance(v, (bool, int, float, str))
            }
        report.layers.append(entry)
    order = {layer.name: i for i, layer in enumerate(layers)}
    report.layers.sort(key=lambda entry: order[entry.name])


def _layer_entry(layer: Layer, decision: str, reason: str | None) -> LayerReport:
    return LayerReport(
        layer.name,
        layer.op,
        list(layer.weight_shape),
        decision,
        reason or "",
        params_before=layer.params,
        params_after=layer.params,
        flops_before=layer.flops,
        flops_after=layer.flops,
        bytes_before=layer.weight_bytes,
        bytes_after=layer.weight_bytes,
    )
