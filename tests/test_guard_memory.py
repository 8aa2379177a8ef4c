"""The latency guard's memory is one layer and one candidate (tnopt/latency.py, tnopt/footprint.py).

Real onnxruntime sessions on a MatMul shaped like PP-OCR rec-tiny's classifier, (…, 40, 80) ·
(80, 6906): 6906 = 2·3·1151, so an MPO of it puts the out mode 1151 first and a high bond holds
hundreds of times the layer's output (1.9 GB at 32 samples on the real model)."""

import weakref

import numpy as np
import onnx
import pytest
from onnx import helper
from tnopt.passes import METHODS

from tnopt import footprint
from tnopt import latency as L
from tnopt.analyze import analyze
from tnopt.cache import SensitivityCache
from tnopt.layout import largest_tensor_bytes
from tnopt.runner import PlanRunner
from tnopt.runtime import Runtime
from tnopt.stages import _reset_peak, _status_kib


def classifier(batch="N", steps=40, k=80, n=6906):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="head")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, steps, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, steps, n])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class Bar:
    def update(self, _n):
        pass


class CountingRuntime(Runtime):
    """Counts the sessions alive at once (each one's finalizer runs when it is released)."""

    def __init__(self):
        super().__init__("cpu")
        self.live = self.most = self.opened = 0

    def session(self, model, **kwargs):
        session = super().session(model, **kwargs)
        self.live += 1
        self.opened += 1
        self.most = max(self.most, self.live)
        weakref.finalize(session, self._closed)
        return session

    def _closed(self):
        self.live -= 1


def guard(model, options, runtime, batch=1, saving=None):
    runner = PlanRunner(model, runtime)
    (layer,) = analyze(model)
    x = np.random.default_rng(1).standard_normal((8, 40, 80)).astype(np.float32)
    return L.measure_latency(
        runner,
        [layer],
        {layer.name: options},
        SensitivityCache(None, "test"),
        lambda layer, method, rank: METHODS[method].decompose(layer, rank),
        {"x": x},
        Bar(),
        batch=batch,
        saving=saving,
    ), runtime


def test_the_guard_holds_the_dense_session_and_one_candidate_at_most():
    options = [("svd", 8), ("svd", 16), ("svd", 32), ("svd", 48), ("tucker2", 16)]
    (layer,) = analyze(classifier())
    options = [(m, r) for m, r in options if m in METHODS and METHODS[m].check(layer) is None]
    table, runtime = guard(classifier(), options, CountingRuntime())
    assert runtime.opened >= len(options)  # every option was timed, in its own session
    assert runtime.most <= L.MAX_LIVE_SESSIONS == 2
    assert runtime.live == 0  # all released after the layer
    assert set(table.verdicts) == {("head", m, r) for m, r in options}


def test_an_oversized_mpo_gets_a_skip_reason_and_no_session():
    model = classifier()
    (layer,) = analyze(model)
    mpo = METHODS["mpo"]
    assert mpo._modes(layer)[1][0] == 1151  # the large prime out mode comes first
    table, runtime = guard(model, [("mpo", 90), ("svd", 16)], CountingRuntime(), batch=4)
    verdict = table.verdicts[("head", "mpo", 90)]
    assert verdict.outcome == L.SKIPPED and not verdict.accepted
    assert "intermediate" in verdict.describe()
    assert table.verdicts[("head", "svd", 16)].outcome != L.SKIPPED
    assert runtime.opened == 3  # shape capture, the dense node and the SVD; none for the MPO
    # and so the latency objective sees no saving in it
    assert table[("head", "mpo", 90)] == np.inf


def test_the_size_rule_reads_the_emitted_graph():
    model = classifier(batch=4)
    (layer,) = analyze(model)
    runner = PlanRunner(model, Runtime("cpu"))
    from tnopt.plan import Choice

    dense = largest_tensor_bytes(runner.isolated(layer, (4, 40, 80)))
    assert dense == 4 * 40 * 6906 * 4  # the output
    wide = runner.isolated(layer, (4, 40, 80), [Choice(layer, "mpo", METHODS["mpo"].decompose(layer, 90))])
    large = largest_tensor_bytes(wide)
    assert large >= 4 * 40 * 16 * 1151 * 90 * 4  # after core 1: rows · i2·i3 · o1 · r1
    assert footprint.oversized_intermediate(large, dense) is not None
    assert footprint.oversized_intermediate(dense, dense) is None
    assert footprint.oversized_intermediate(None, dense) is None  # unknown: no claim


def test_options_no_plan_can_choose_are_not_timed():
    model = classifier()
    runtime = CountingRuntime()
    saves = {8: 1.0, 16: 0.0}
    table, _ = guard(model, [("svd", 8), ("svd", 16)], runtime, saving=lambda layer, m, r: saves[r])
    assert table.verdicts[("head", "svd", 16)].outcome == L.SKIPPED
    assert "no plan can choose it" in table.verdicts[("head", "svd", 16)].describe()
    assert table.verdicts[("head", "svd", 8)].outcome != L.SKIPPED
    assert runtime.opened == 3  # shape capture, the dense node, svd 8


def test_mpo_compute_ranks_save_flops():
    (layer,) = analyze(classifier())
    mpo = METHODS["mpo"]
    assert all(mpo.cost(layer, r).flops < layer.flops for r in mpo.candidate_ranks(layer))
    assert METHODS["mpo-storage"].candidate_ranks(layer)  # the parameter saving stays available


def test_peak_memory_of_the_guard_stays_under_its_bound():
    """At a batch of 4, timing the MPO at bond 90 would allocate 4·40·16·1151·90·4 B ≈ 1 GiB in one
    buffer; the guard's peak RSS growth stays under 256 MiB (the floor of the size rule and the
    sessions of the dense node and one SVD)."""
    model = classifier()
    runtime = Runtime("cpu")
    runtime.session(model)  # onnxruntime's own first-session cost is not the guard's
    if not _reset_peak():
        pytest.skip("this kernel refuses to reset the RSS high-water mark (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    guard(model, [("mpo", 90), ("svd", 16)], runtime, batch=4)
    grown_mib = (_status_kib("VmHWM") - before) / 1024
    assert grown_mib < 256, grown_mib


def test_a_skip_of_this_runs_objective_is_not_cached_for_another_objective():
    """Under the FLOPs objective a rewrite above the FLOPs cut is not timed; that skip follows from
    the objective, so a later run on the same cache whose objective reads its seconds times it."""
    model = classifier()
    runner = PlanRunner(model, Runtime("cpu"))
    (layer,) = analyze(model)
    x = np.random.default_rng(1).standard_normal((8, 40, 80)).astype(np.float32)
    cache = SensitivityCache(None, "shared")
    rank = 64  # (80 + 6906)·64 / (80·6906) ≈ 0.81 of the dense FLOPs: above the 0.5 cut

    def run(saving, flop_cut=L.MAX_FLOP_RATIO):
        return L.measure_latency(
            runner,
            [layer],
            {layer.name: [("svd", rank)]},
            cache,
            lambda layer, method, rank: METHODS[method].decompose(layer, rank),
            {"x": x},
            Bar(),
            saving=saving,
            flop_cut=flop_cut,
        ).verdicts[(layer.name, "svd", rank)]

    flops_run = run(lambda layer, method, rank: 1.0)
    assert flops_run.outcome == L.SKIPPED and "not timed" in flops_run.reason
    latency_run = run(None)  # the latency objective: timing is the objective
    assert latency_run.outcome != L.SKIPPED and latency_run.rounds > 0
    # the params objective: no FLOPs cut; a rewrite timed not slower is applied
    params_run = run(lambda layer, method, rank: 1.0, flop_cut=None)
    assert params_run.outcome != L.SKIPPED
    assert params_run.accepted == (params_run.outcome != L.SLOWER)
    assert "not slower" in params_run.describe() or params_run.outcome == L.SLOWER
