"""Latency decisions that machine load moves little.

Each candidate rewrite is timed against its dense node, alone, in onnxruntime on the target
provider, at the input shape the layer really sees at the deployment batch (--latency-batch,
default 1; captured from that many real samples). The timings are paired and interleaved: every
round runs the dense node and the candidate once, in an order that alternates between rounds, and
the decision reads the per-round ratio candidate / dense. Candidates are timed one after another
against the layer's one dense session, so the guard holds one layer's dense node and one candidate
(MAX_LIVE_SESSIONS) at a time; options no plan can choose, and rewrites whose intermediates are far
larger than the dense layer's (tnopt.footprint), get a skip reason instead of a session. Load that comes
and goes slows both sides of a round alike, so the ratio keeps still where the raw times follow the
load. A small node is run several times back to back per round and its time in that round is its
fastest run, not the mean: load only adds time, and one preemption (milliseconds) inside a sample of
30 µs runs made the mean, and so the ratio, a draw of the machine's load — beside a busy loop a rewrite
0.71x the dense time was measured 1.96x [1.27, 5.33], "slower", by the mean and 0.71x by the minimum
(VGG on Fashion-MNIST, 2 cores). Timing sessions do not spin their worker threads between
runs: interleaved, an idle session's spinning threads would take the cores from the timed one.

The timing has three outcomes, read from the exact sign-test interval of the median ratio:

    faster     the interval lies below 1 and the median ratio ≤ LATENCY_MARGIN
    slower     the interval lies above 1 and the median ratio ≥ 1 / LATENCY_MARGIN
    undecided  anything else (a noisy or a small difference)

and the rule that applies a rewrite reads FLOPs first: a rewrite is applied when its FLOPs are
≤ MAX_FLOP_RATIO × the dense layer's and timing did not call it slower. Timing vetoes; it does not
admit. Load does not only add noise that a significance test can absorb, it biases the ratio: on 2
cores beside a busy loop (VGG at 28x28, batch 1) multi-node rewrites of 100 µs convs read 0.2-0.35
higher than on the quieter machine minutes before (0.79 → 1.13, 0.72 → 0.94; median shift +14% over
85 candidates), so "faster" admitting rewrites above the FLOPs cut made the plan follow the load
(2.04x vs 1.58x FLOPs). A veto needs a rewrite with half the FLOPs to read slower, which load did
not produce there, while the cases the guard exists for (MPO chains of a Gemm read 10-170x
slower) stay refused. Under the FLOPs objective a rewrite above the cut cannot be applied, so it is
not timed either (a skip reason in the report).

Undecided candidates get more rounds first (a look every LOOK_EVERY rounds, up to MAX_ROUNDS or
LAYER_TIME seconds per candidate); each look uses a 95% interval, so with at most five looks the chance
that a rewrite of equal speed is called faster (or slower) stays under 5 × 2.5%. A rewrite that
timing shows slower is never applied ("fewer FLOPs often do not run faster"); one that timing cannot
tell apart from the dense node, or that it times faster, is judged by what does not depend on the
machine's load, its FLOPs, and only a large cut (half) counts. So load changes a decision only where a
rewrite with half the FLOPs reads slower.
The summary of the rounds is what the cache keeps; absolute times are re-derived from the dense
time of this run.

The whole model is timed the same way, before against after, at the deployment batch.
FLOPs are a bound, not a result: the search's latency guard and objective read these numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from tnopt.data import as_feeds
from tnopt.plan import Choice

# Rounds of a paired comparison: a first look after MIN_ROUNDS, then one every LOOK_EVERY rounds
# while the candidate is undecided, up to MAX_ROUNDS or LAYER_TIME seconds of timing per candidate
# (the dense node's runs included).
MIN_ROUNDS, LOOK_EVERY, MAX_ROUNDS, LAYER_TIME = 9, 8, 41, 0.5
# Two-sided level of the median ratio's sign-test interval at each look.
ALPHA = 0.05
# A rewrite that timing calls faster must be at least this much faster (median ratio) to be worth it;
# one called slower at least 1 / LATENCY_MARGIN slower: between the two, the FLOPs rule decides, so a
# tight interval around a ratio near 1 does not flip a verdict with the run.
LATENCY_MARGIN = 0.97
# Applied only when the cost model promises a large cut (and timing did not call it slower).
MAX_FLOP_RATIO = 0.5
FASTER, SLOWER, UNDECIDED, SKIPPED = "faster", "slower", "undecided", "skipped"
# One timed sample lasts about MIN_SAMPLE_S seconds: a faster node is run back to back up to
# MAX_REPEATS times per sample (the same count on both sides of a pair).
MIN_SAMPLE_S, MAX_REPEATS = 0.002, 64
# The guard's open sessions at any time: the dense node and one candidate.
MAX_LIVE_SESSIONS = 2


@dataclass(frozen=True)
class Verdict:
    """The latency guard's decision on one rewrite, and why."""

    outcome: str  # faster | slower | undecided | skipped
    accepted: bool
    ratio: float  # median per-round time ratio rewritten / dense
    ratio_low: float
    ratio_high: float
    rounds: int
    flop_ratio: float
    reason: str = ""  # why a skipped candidate was not timed
    cut: float | None = MAX_FLOP_RATIO  # the FLOPs cut that admits (None: timing only vetoes)

    def describe(self) -> str:
        if self.outcome == SKIPPED:
            return self.reason
        interval = f"[{self.ratio_low:.2f}, {self.ratio_high:.2f}]"
        timing = f"time ratio {self.ratio:.2f} {interval} in {self.rounds} rounds"
        if self.outcome == SLOWER:
            return f"slower ({timing})"
        verdict = "applied" if self.accepted else "kept dense"
        if self.cut is None:
            return f"{self.outcome} ({timing}); not slower: {verdict}"
        rule = "≤" if self.flop_ratio <= self.cut else ">"
        return f"{self.outcome} ({timing}); FLOPs {self.flop_ratio:.2f}x {rule} {self.cut:g}x: {verdict}"


def decide(summary: dict, flop_ratio: float, flop_cut: float | None = MAX_FLOP_RATIO) -> Verdict:
    """The timing's outcome and the rule of the module docstring (FLOPs admit, timing vetoes) on one
    candidate's round summary; a candidate that was not timed (`{"skipped": reason}`) is refused
    with its reason. `flop_cut` None (the params objective: a rewrite may cost FLOPs to save
    values): timing only vetoes, nothing is admitted by FLOPs."""
    if "skipped" in summary:
        nan = math.nan
        return Verdict(SKIPPED, False, nan, nan, nan, 0, float(flop_ratio), summary["skipped"], flop_cut)
    low, high, ratio = summary["ratio_low"], summary["ratio_high"], summary["ratio"]
    if high < 1.0 and ratio <= LATENCY_MARGIN:
        outcome = FASTER
    elif low > 1.0 and ratio * LATENCY_MARGIN >= 1.0:
        outcome = SLOWER
    else:
        outcome = UNDECIDED
    accepted = outcome != SLOWER and (flop_cut is None or flop_ratio <= flop_cut)
    rounds = int(summary["rounds"])
    return Verdict(outcome, accepted, ratio, low, high, rounds, float(flop_ratio), cut=flop_cut)


class LatencyTable(dict):
    """{(layer, None, None): dense seconds, (layer, method, rank): rewritten seconds (dense × the
    median ratio)}, plus `verdicts[(layer, method, rank)]`: the guard's `Verdict`."""

    def __init__(self):
        super().__init__()
        self.verdicts: dict[tuple, Verdict] = {}


def _round(sessions, feed, active, rows, repeats: int = 1) -> float:
    """One round over the `active` session indices (index 0, the dense node, always first in the
    list): the order is reversed on every other round, so that neither side always runs first
    (warm caches) or last. Each session runs `repeats` times back to back, each run timed alone,
    and its time is their minimum: load only ever adds time (a preemption, a scheduler slice of
    several ms on a 30 µs node), so the least disturbed run is the node's own cost, where a mean
    takes in every preemption that fell inside the sample and turns the ratio into a draw of the
    machine's load. Appends the round's times (NaN for inactive) to `rows`; returns seconds spent."""
    order = active if len(rows) % 2 == 0 else active[::-1]
    row = [math.nan] * len(sessions)
    spent = 0.0
    for index in order:
        fastest = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            sessions[index].run(None, feed)
            elapsed = time.perf_counter() - start
            fastest = min(fastest, elapsed)
            spent += elapsed
        row[index] = fastest
    rows.append(row)
    return spent


def _warm(sessions, feed) -> float:
    """Two runs of each session; returns the first session's faster run, in seconds (a preempted
    run would set the repeats per sample from the load, not from the node)."""
    fastest = math.inf
    for position, session in enumerate(sessions):
        for _ in range(2):
            start = time.perf_counter()
            session.run(None, feed)
            if position == 0:
                fastest = min(fastest, time.perf_counter() - start)
    return fastest


def repeats_for(run_s: float) -> int:
    """Back-to-back runs per timed sample so that one sample lasts about MIN_SAMPLE_S: a 30 µs
    conv at batch 1 is timed as the fastest of many runs, where one run alone is often the
    scheduler's noise."""
    return int(min(MAX_REPEATS, max(1, int(MIN_SAMPLE_S / max(run_s, 1e-9)))))


def paired_times(sessions, feed, *, min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS, budget_s=0.4):
    """(rounds, len(sessions)) seconds, every session in every round: at least `min_rounds`, more
    while under `budget_s` seconds in all."""
    _warm(sessions, feed)
    rows: list = []
    spent, everyone = 0.0, list(range(len(sessions)))
    while len(rows) < max_rounds and (len(rows) < min_rounds or spent < budget_s):
        spent += _round(sessions, feed, everyone, rows)
    return np.asarray(rows)


def sign_test_rank(n: int, alpha: float = ALPHA) -> int:
    """The largest i ≥ 1 whose order-statistic interval [r_(i), r_(n+1−i)] covers the median with
    probability ≥ 1 − alpha (exact binomial: 1 − 2·P(Bin(n, ½) ≤ i − 1)); 1 when none does."""
    best, tail = 1, 0.0
    for i in range(1, n // 2 + 1):
        tail += math.comb(n, i - 1) / 2.0**n
        if 2 * tail > alpha:
            break
        best = i
    return best


def ratio_summary(times: np.ndarray, column: int, baseline: int = 0, alpha: float = ALPHA) -> dict:
    """The median of the per-round ratios column / baseline (rounds where both ran) and its exact
    sign-test interval: "the interval lies below 1" means the rewrite wins significantly more
    rounds than it loses."""
    times = np.asarray(times, dtype=float)
    both = ~np.isnan(times[:, column]) & ~np.isnan(times[:, baseline])
    ratios = np.sort(times[both, column] / np.maximum(times[both, baseline], 1e-12))
    n = len(ratios)
    i = sign_test_rank(n, alpha)
    return {
        "ratio": float(np.median(ratios)),
        "ratio_low": float(ratios[i - 1]),
        "ratio_high": float(ratios[n - i]),
        "rounds": n,
    }


def sequential_summaries(sessions, feed, flop_ratios, *, layer_time=LAYER_TIME) -> tuple[list[dict], float]:
    """Round summaries of sessions[1:] against sessions[0], and sessions[0]'s median seconds: a
    candidate leaves the rounds once a look decides it (faster or slower); undecided ones keep
    being timed."""
    repeats = repeats_for(_warm(sessions, feed))
    rows: list = []
    active, spent = list(range(len(sessions))), 0.0
    summaries: dict[int, dict] = {}
    while True:
        spent += _round(sessions, feed, active, rows, repeats)
        n = len(rows)
        if n < MIN_ROUNDS or (n - MIN_ROUNDS) % LOOK_EVERY:
            continue
        table = np.asarray(rows)
        for column in active[1:]:
            summaries[column] = ratio_summary(table, column)
            if decide(summaries[column], flop_ratios[column - 1]).outcome != UNDECIDED:
                active = [c for c in active if c != column]
        if len(active) == 1 or n + LOOK_EVERY > MAX_ROUNDS or spent >= layer_time:
            break
    dense_s = float(np.median(np.asarray(rows)[:, 0]))
    return [summaries[column] for column in range(1, len(sessions))], dense_s


def measure_latency(
    runner,
    layers,
    options_by_layer,
    cache,
    factors_for,
    sample_inputs,
    bar,
    stop=None,
    *,
    batch: int = 1,
    saving=None,
    flop_cut: float | None = MAX_FLOP_RATIO,
) -> LatencyTable:
    """Dense seconds per layer and each candidate's seconds and verdict (`LatencyTable`), at the
    deployment `batch` (the layer's input captured from that many real samples). `saving(layer,
    method, rank)`: the objective's saving (None where timing itself is the objective); an option
    that saves nothing cannot be in any plan and is not timed. `stop()` true (the search's time
    limit) ends the timing before the next layer: layers not timed have no verdicts, so the guard
    applies none of their rewrites.

    Memory is one layer and one candidate: the dense node's session is opened once per layer and
    shared by its candidates (the paired baseline); each candidate's session is opened, timed
    against it and released before the next one, so at most MAX_LIVE_SESSIONS sessions are open at
    any time. A candidate whose subgraph holds an intermediate far larger than the dense layer's
    (tnopt.footprint) gets a skip reason and no session."""
    from tnopt.footprint import cannot_be_chosen, oversized_intermediate
    from tnopt.layout import largest_tensor_bytes

    runtime = runner.runtime
    first = as_feeds(sample_inputs).take(slice(0, max(int(batch or 1), 1)))
    names = sorted({layer.input_name for layer in layers})
    shapes = runtime.capture_shapes(runner.original, names, first)
    result = LatencyTable()
    for layer in layers:
        if stop is not None and stop():
            break
        shape = shapes[layer.input_name]
        dtype = layer.weight.dtype
        feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(dtype)}
        prefix = f"lat5|{runtime.provider_name}|{layer.name}"
        suffix = "x".join(map(str, shape))
        options = options_by_layer.get(layer.name, [])
        keys = [f"{prefix}|{m}|{runner.methods[m].rank_label(r)}|{suffix}" for m, r in options]
        flop_ratios = [runner.methods[m].cost(layer, r).flops / max(layer.flops, 1) for m, r in options]
        dense_model = runner.isolated(layer, shape)
        dense_largest = largest_tensor_bytes(dense_model)
        # Isolated layers and their rewrites are tnopt's graphs: a failure is an internal error.
        dense = runtime.session(dense_model, own=True, timing=True)
        del dense_model
        dense_rounds: list[float] = []
        # Skips that follow from this run's objective, not from the rewrite: kept out of the cache,
        # which is shared by runs of other objectives (a later --objective latency run must time them).
        untimed: dict[str, dict] = {}
        for i, ((method, rank), key) in enumerate(zip(options, keys)):
            if cache.get(key) is not None:
                continue
            reason = cannot_be_chosen(None if saving is None else saving(layer, method, rank))
            if reason is None and saving is not None and flop_cut is not None and flop_ratios[i] > flop_cut:
                # Only the latency objective reads the seconds of a rewrite the guard cannot apply.
                reason = (
                    f"FLOPs {flop_ratios[i]:.2f}x > {flop_cut:g}x of the dense layer: not timed, kept dense"
                )
            if reason is not None:
                untimed[key] = {"skipped": reason}
                continue
            rewritten = None
            if reason is None:
                choice = Choice(layer, method, factors_for(layer, method, rank))
                rewritten = runner.isolated(layer, shape, [choice])
                reason = oversized_intermediate(largest_tensor_bytes(rewritten), dense_largest)
            if reason is not None:
                cache.put(key, {"skipped": reason})
                continue
            candidate = runtime.session(rewritten, own=True, timing=True)
            del rewritten
            summaries, dense_s = sequential_summaries([dense, candidate], feed, [flop_ratios[i]])
            del candidate  # released before the next candidate's session opens
            dense_rounds.append(dense_s)
            cache.put(key, summaries[0])
        if dense_rounds:
            dense_s = float(np.median(dense_rounds))
        else:
            dense_s = float(np.median(paired_times([dense], feed, min_rounds=5, budget_s=0.1)[:, 0]))
        del dense
        result[(layer.name, None, None)] = dense_s
        bar.update(1)
        for (method, rank), key, flop_ratio in zip(options, keys, flop_ratios):
            summary = untimed.get(key) or cache.entries[key]
            verdict = decide(summary, flop_ratio, flop_cut)
            result.verdicts[(layer.name, method, rank)] = verdict
            # Not timed: no time either; as seconds (the latency objective) it saves nothing.
            seconds = math.inf if verdict.outcome == SKIPPED else dense_s * summary["ratio"]
            result[(layer.name, method, rank)] = seconds
            bar.update(1)
    return result


def whole_model_latency(before, after, feeds, batch: int, runtime) -> dict:
    """The original and the compressed model timed paired and interleaved on `batch` real samples
    (repeated when the data has fewer) in the model's layout. A model whose batch dim is fixed is
    timed at that batch instead, and the report says so."""
    from tnopt.runtime import fixed_batch

    feeds = as_feeds(feeds)
    session_before = runtime.session(before, timing=True)
    session_after = runtime.session(after, timing=True)
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
