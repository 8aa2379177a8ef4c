"""Each candidate rewrite timed against its dense node, alone, in onnxruntime on the target
provider, at the input shape the layer really sees (captured from TIMING_BATCH real samples).
FLOPs are a bound, not a result: the search's latency guard and objective read these numbers."""

from __future__ import annotations

import numpy as np

from tnopt.plan import Choice

TIMING_BATCH = 32


def measure_latency(runner, layers, options_by_layer, cache, factors_for, sample_inputs, bar) -> dict:
    """{(layer, None, None): dense seconds, (layer, method, rank): factorized seconds}."""
    runtime = runner.runtime
    first = {k: v[:TIMING_BATCH] for k, v in sample_inputs.items()}
    names = sorted({layer.input_name for layer in layers})
    shapes = {name: value.shape for name, value in runtime.capture(runner.original, names, first).items()}
    result = {}
    for layer in layers:
        shape = shapes[layer.input_name]
        dtype = layer.weight.dtype
        dense = runner.isolated(layer, shape)
        feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(dtype)}
        prefix = f"lat|{runtime.provider_name}|{layer.name}"
        suffix = "x".join(map(str, shape))
        result[(layer.name, None, None)] = _timed(cache, f"{prefix}|dense|{suffix}", runtime, dense, feed)
        bar.update(1)
        for method, rank in options_by_layer.get(layer.name, []):
            key = f"{prefix}|{method}|{runner.methods[method].rank_label(rank)}|{suffix}"
            if cache.get(key) is None:
                rewritten = runner.isolated(
                    layer, shape, [Choice(layer, method, factors_for(layer, method, rank))]
                )
                cache.put(key, runtime.latency(rewritten, feed))
            result[(layer.name, method, rank)] = cache.entries[key]
            bar.update(1)
    return result


def _timed(cache, key, runtime, model, feed) -> float:
    if cache.get(key) is None:
        cache.put(key, runtime.latency(model, feed))
    return cache.entries[key]
