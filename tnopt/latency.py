"""Latency decisions that machine load moves little.

Each candidate rewrite is timed against its dense node, alone, in onnxruntime on the target
provider, at the input shape the layer really sees (captured from TIMING_BATCH real samples). The
timings are paired and interleaved: every round runs the dense node and each candidate once, in an
order that alternates between rounds, and the decision reads the per-round ratio candidate / dense.
Load that comes and goes slows both sides of a round alike, so the ratio keeps still where the raw
times follow the load. A rewrite counts as faster only when the upper end of the ratio's interval
(a sign-test interval of the median ratio) is below 1: a significance margin, not one noisy comparison.
The ratio is what the cache keeps; absolute times are re-derived from the dense time of this run.

The whole model is timed the same way, before against after, at the deployment batch.
FLOPs are a bound, not a result: the search's latency guard and objective read these numbers.
"""

from __future__ import annotations

import time

import numpy as np

from tnopt.data import as_feeds
from tnopt.plan import Choice

TIMING_BATCH = 32
# Rounds of a paired comparison: at least MIN_ROUNDS, more while under ROUND_TIME seconds in all.
MIN_ROUNDS, MAX_ROUNDS, ROUND_TIME = 9, 41, 0.4
# The median ratio's interval: a two-sided 90% sign-test interval (order statistics of the rounds).
Z_90 = 1.645


def paired_times(sessions, feed, *, min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS, budget_s=ROUND_TIME):
    """(rounds, len(sessions)) seconds: each round runs every session once, the order reversed on
    every other round so that neither side always runs first (warm caches) or last."""
    for session in sessions:
        for _ in range(2):
            session.run(None, feed)
    rows = []
    spent = 0.0
    while len(rows) < max_rounds and (len(rows) < min_rounds or spent < budget_s):
        order = range(len(sessions)) if len(rows) % 2 == 0 else reversed(range(len(sessions)))
        row = [0.0] * len(sessions)
        for index in order:
            start = time.perf_counter()
            sessions[index].run(None, feed)
            row[index] = time.perf_counter() - start
        rows.append(row)
        spent += sum(row)
    return np.asarray(rows)


def ratio_summary(times: np.ndarray, column: int, baseline: int = 0) -> dict:
    """The median of the per-round ratios column / baseline and its 90% interval: the k-th smallest
    and largest ratios with k from the sign test's normal approximation, so "the interval lies
    below 1" means the rewrite wins significantly more rounds than it loses."""
    ratios = np.sort(times[:, column] / np.maximum(times[:, baseline], 1e-12))
    n = len(ratios)
    k = int(max(0, np.floor(n / 2 - Z_90 * np.sqrt(n) / 2)))
    return {
        "ratio": float(np.median(ratios)),
        "ratio_low": float(ratios[k]),
        "ratio_high": float(ratios[n - 1 - k]),
        "rounds": n,
    }


def measure_latency(runner, layers, options_by_layer, cache, factors_for, sample_inputs, bar) -> dict:
    """{(layer, None, None): dense seconds, (layer, method, rank): factorized seconds}.

    A candidate's seconds are dense × its median paired ratio when the ratio's interval lies below
    1 (significantly faster); otherwise at least the dense time, so a guard never takes it."""
    runtime = runner.runtime
    first = as_feeds(sample_inputs).take(slice(0, TIMING_BATCH))
    names = sorted({layer.input_name for layer in layers})
    shapes = runtime.capture_shapes(runner.original, names, first)
    result = {}
    for layer in layers:
        shape = shapes[layer.input_name]
        dtype = layer.weight.dtype
        feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(dtype)}
        prefix = f"lat2|{runtime.provider_name}|{layer.name}"
        suffix = "x".join(map(str, shape))
        options = options_by_layer.get(layer.name, [])
        keys = [f"{prefix}|{m}|{runner.methods[m].rank_label(r)}|{suffix}" for m, r in options]
        missing = [i for i, key in enumerate(keys) if cache.get(key) is None]
        # Isolated layers and their rewrites are tnopt's graphs: a failure is an internal error.
        sessions = [runtime.session(runner.isolated(layer, shape), own=True)]
        for i in missing:
            method, rank = options[i]
            rewritten = runner.isolated(
                layer, shape, [Choice(layer, method, factors_for(layer, method, rank))]
            )
            sessions.append(runtime.session(rewritten, own=True))
        times = paired_times(sessions, feed)
        dense_s = float(np.median(times[:, 0]))
        for column, i in enumerate(missing, start=1):
            cache.put(keys[i], ratio_summary(times, column))
        result[(layer.name, None, None)] = dense_s
        bar.update(1)
        for (method, rank), key in zip(options, keys):
            summary = cache.entries[key]
            significant = summary["ratio_high"] < 1.0
            ratio = summary["ratio"] if significant else max(summary["ratio"], 1.0)
            result[(layer.name, method, rank)] = dense_s * ratio
            bar.update(1)
    return result


def whole_model_latency(before, after, feeds, batch: int, runtime) -> dict:
    """The original and the compressed model timed paired and interleaved on `batch` real samples
    (repeated when the data has fewer) in the model's layout. A model whose batch dim is fixed is
    timed at that batch instead, and the report says so."""
    from tnopt.runtime import fixed_batch

    feeds = as_feeds(feeds)
    session_before, session_after = runtime.session(before), runtime.session(after)
    fixed = fixed_batch(session_before, feeds)
    size = fixed or int(batch)
    index = np.arange(size) % feeds.samples()
    feed = feeds.for_model(dict(feeds.take(index)))
    times = paired_times([session_before, session_after], feed, min_rounds=15, max_rounds=61, budget_s=3.0)
    summary = ratio_summary(times, 1)
    before_s, after_s = float(np.median(times[:, 0])), float(np.median(times[:, 1]))
    return {
        "batch": size,
        "requested_batch": int(batch),
        "provider": runtime.provider_name,
        "before_ms": before_s * 1e3,
        "after_ms": after_s * 1e3,
        "speedup": 1.0 / summary["ratio"] if summary["ratio"] > 0 else float("inf"),
        **summary,
    }
