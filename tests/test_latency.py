"""The latency guard's three-outcome decision (tnopt/latency.py) on simulated timings.

Sessions are fakes whose run() advances a fake clock by a drawn duration, so the tests control the
true speed ratio and the noise exactly; nothing here times real work."""

import numpy as np
import pytest
from scipy.stats import binom

from tnopt import latency as L
from tnopt.verify import faster


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeSession:
    """run() takes `base` seconds, plus a 4 ms preemption (a scheduler slice) with probability `p`."""

    def __init__(self, clock, base, rng, p=0.0, jitter=0.0):
        self.clock, self.base, self.rng, self.p, self.jitter = clock, base, rng, p, jitter
        self.calls = 0

    def run(self, _names, _feed):
        self.calls += 1
        spent = self.base * (1 + self.jitter * self.rng.standard_normal() ** 2)
        if self.rng.random() < self.p:
            spent += 0.004 * self.rng.integers(1, 4)
        self.clock.now += spent


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(L.time, "perf_counter", fake)
    return fake


@pytest.mark.parametrize("n", [5, 9, 17, 25, 33, 41])
def test_sign_test_interval_is_exact_binomial(n):
    i = L.sign_test_rank(n)
    coverage = 1 - 2 * binom.cdf(i - 1, n, 0.5)
    # Too few rounds for the level: the widest interval (min, max), which then decides nothing
    # unless every round agrees.
    assert coverage >= 1 - L.ALPHA or i == 1
    if i + 1 <= n // 2:
        assert 1 - 2 * binom.cdf(i, n, 0.5) < 1 - L.ALPHA  # i is the largest such rank


def test_ratio_summary_skips_rounds_a_candidate_sat_out():
    times = np.array([[1.0, 0.5, 2.0]] * 9 + [[1.0, np.nan, 2.0]] * 8)
    assert L.ratio_summary(times, 1)["rounds"] == 9
    assert L.ratio_summary(times, 2)["rounds"] == 17
    assert L.ratio_summary(times, 1)["ratio"] == pytest.approx(0.5)


def summary(ratio, low, high, rounds=9):
    return {"ratio": ratio, "ratio_low": low, "ratio_high": high, "rounds": rounds}


def test_three_outcomes_and_the_rule_for_undecided():
    assert L.decide(summary(0.6, 0.5, 0.8), flop_ratio=0.4).outcome == L.FASTER
    assert L.decide(summary(0.6, 0.5, 0.8), flop_ratio=0.4).accepted
    # Timed faster does not admit a small FLOPs cut: load biases the ratio (the module docstring).
    small_cut_faster = L.decide(summary(0.6, 0.5, 0.8), flop_ratio=0.9)
    assert small_cut_faster.outcome == L.FASTER and not small_cut_faster.accepted
    assert "kept dense" in small_cut_faster.describe()
    # Measured slower: refused however far the FLOPs fall ("fewer FLOPs often do not run faster").
    slower = L.decide(summary(1.3, 1.1, 1.6), flop_ratio=0.1)
    assert slower.outcome == L.SLOWER and not slower.accepted
    # Timing cannot tell: the cost model decides, and only a large FLOPs cut is applied.
    big_cut = L.decide(summary(0.9, 0.4, 1.8), flop_ratio=0.3)
    small_cut = L.decide(summary(0.9, 0.4, 1.8), flop_ratio=0.8)
    assert big_cut.outcome == small_cut.outcome == L.UNDECIDED
    assert big_cut.accepted and not small_cut.accepted
    assert "applied" in big_cut.describe() and "kept dense" in small_cut.describe()
    # Significantly but negligibly faster (under the margin) is no clear gain: the FLOPs decide.
    marginal = L.decide(summary(0.99, 0.98, 0.995), flop_ratio=0.8)
    assert marginal.outcome == L.UNDECIDED and not marginal.accepted


def run_guard(clock, bases, seed, p=0.0, jitter=0.0, flop_ratios=None):
    rng = np.random.default_rng(seed)
    sessions = [FakeSession(clock, b, rng, p, jitter) for b in bases]
    flop_ratios = flop_ratios or [0.9] * (len(bases) - 1)
    summaries, dense_s = L.sequential_summaries(sessions, {}, flop_ratios)
    return summaries, sessions, dense_s


def test_clear_differences_are_decided_at_the_first_look(clock):
    summaries, sessions, dense_s = run_guard(clock, [0.002, 0.001, 0.004], seed=0, jitter=0.05)
    assert [L.decide(s, 0.9).outcome for s in summaries] == [L.FASTER, L.SLOWER]
    assert [s["rounds"] for s in summaries] == [L.MIN_ROUNDS, L.MIN_ROUNDS]
    assert summaries[0]["ratio"] == pytest.approx(0.5, rel=0.1)
    assert dense_s == pytest.approx(0.002, rel=0.1)


def test_an_undecided_candidate_gets_more_rounds_a_decided_one_leaves(clock):
    # Equal speed: no look can decide it; it is timed until MAX_ROUNDS (the fake time budget is ample).
    summaries, sessions, _ = run_guard(clock, [0.002, 0.001, 0.002], seed=1, jitter=0.3)
    assert summaries[0]["rounds"] == L.MIN_ROUNDS
    assert summaries[1]["rounds"] == L.MAX_ROUNDS
    assert L.decide(summaries[1], 0.9).outcome == L.UNDECIDED
    # The decided candidate stopped running once decided (2 warm-up runs + its rounds).
    assert sessions[1].calls == 2 + L.MIN_ROUNDS
    assert sessions[0].calls == 2 + L.MAX_ROUNDS


def test_layer_time_bounds_the_extra_rounds(clock):
    summaries, _, _ = run_guard(clock, [0.5, 0.5], seed=2, jitter=0.3)
    assert summaries[0]["rounds"] == L.MIN_ROUNDS  # 9 rounds of 1 s already exceed LAYER_TIME


def test_load_moves_the_verdicts_little(clock):
    """Preemptions of 4-12 ms (longer than the runs) hit either side at random, as under machine load:
    a rewrite twice as fast stays accepted and one 1.6x slower stays refused, for every seed."""
    for seed in range(20):
        summaries, _, _ = run_guard(
            clock, [0.002, 0.001, 0.0032], seed=seed, p=0.25, jitter=0.1, flop_ratios=[0.3, 0.3]
        )
        fast, slow = (L.decide(s, 0.3) for s in summaries)
        assert fast.accepted and fast.outcome in (L.FASTER, L.UNDECIDED), seed
        assert slow.outcome == L.SLOWER and not slow.accepted, seed


def test_guard_reads_the_verdict():
    class Impl:
        folded_at_load = False

    table = L.LatencyTable()
    table[("a", None, None)] = 1.0
    table[("a", "svd", 4)] = 1.2  # seconds are the objective's; the guard reads the verdict
    table.verdicts[("a", "svd", 4)] = L.decide(summary(1.2, 0.5, 2.0), flop_ratio=0.2)
    table[("a", "svd", 8)] = 0.5
    table.verdicts[("a", "svd", 8)] = L.decide(summary(0.5, 0.45, 1.2), flop_ratio=0.7)
    assert faster(Impl(), table, "a", "svd", 4)  # undecided, large FLOPs cut
    assert not faster(Impl(), table, "a", "svd", 8)  # undecided, small FLOPs cut
    assert not faster(Impl(), table, "a", "svd", 16)  # never timed


def test_timing_sessions_do_not_spin():
    from tnopt.runtime import _quiet_options

    assert _quiet_options(spinning=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    key = "session.intra_op.allow_spinning"
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default (spinning) applies
        _quiet_options().get_session_config_entry(key)


def test_preemptions_inside_a_repeated_sample_do_not_flip_verdicts(clock):
    """A 30 µs node is timed as many back-to-back runs per round; under load a 4-12 ms preemption
    falls inside most samples. Each round reads the fastest run, so a rewrite 0.7x the dense time
    stays faster and one 1.3x stays slower for every seed, as on a quiet machine — where the mean of
    the sample made the verdicts a draw of the preemptions (undecided, or faster/slower at random).
    Both have a large FLOPs cut, so only a timed "slower" keeps one dense."""
    quiet = run_guard(clock, [30e-6, 21e-6, 39e-6], seed=0, jitter=0.05, flop_ratios=[0.4, 0.4])[0]
    assert [L.decide(s, 0.4).outcome for s in quiet] == [L.FASTER, L.SLOWER]
    for seed in range(10):
        summaries, sessions, _ = run_guard(
            clock, [30e-6, 21e-6, 39e-6], seed=seed, p=0.05, jitter=0.05, flop_ratios=[0.4, 0.4]
        )
        assert sessions[0].calls > 2 + L.MIN_ROUNDS * 10  # several runs per timed sample
        fast, slow = (L.decide(s, 0.4) for s in summaries)
        assert fast.outcome == L.FASTER and fast.accepted, (seed, summaries)
        assert slow.outcome == L.SLOWER and not slow.accepted, (seed, summaries)
        assert summaries[0]["ratio"] == pytest.approx(0.7, rel=0.1)


def test_a_ratio_near_one_is_left_to_the_flops_rule():
    # Significant but within the margin on either side: the machine-independent rule decides.
    for ratio in (0.99, 1.01):
        near = L.decide(summary(ratio, ratio - 0.005, ratio + 0.005), flop_ratio=0.4)
        assert near.outcome == L.UNDECIDED and near.accepted
    assert L.decide(summary(1.05, 1.04, 1.06), flop_ratio=0.4).outcome == L.SLOWER
