"""Deep-TN storage across layers: the budget shared by what each layer's output spans, and the
layer's bias trained beside the cores."""

from types import SimpleNamespace

import numpy as np
from conftest import MODELS
from onnx import numpy_helper
from tnopt.passes import METHODS, _deep_tn

import tnopt
from tnopt.heal import HealConfig

RNG = np.random.default_rng(0)


def test_effective_rank_counts_equal_directions():
    basis = np.linalg.qr(RNG.standard_normal((32, 32)))[0]
    for k in (1, 3, 8):
        samples = RNG.standard_normal((4000, k)) @ basis[:, :k].T
        assert abs(_deep_tn.effective_rank(samples) - k) < 0.1 * k
    # Unequal variances count for less than their number.
    uneven = RNG.standard_normal((4000, 4)) * np.array([10.0, 1.0, 1.0, 1.0])
    assert 1.0 < _deep_tn.effective_rank(uneven) < 2.0
    assert _deep_tn.effective_rank(np.ones((10, 3))) == 1.0


def test_shared_budget_respects_the_total_and_follows_the_needs():
    costs = [lambda chi, n=n: n * chi * chi for n in (10, 14, 12)]
    for total, needs in ((2000, (1, 1, 1)), (2000, (1, 8, 1)), (5000, (5, 1, 1)), (40, (1, 1, 1))):
        chis = _deep_tn.share_budget(needs, costs, total)
        used = sum(c(x) for c, x in zip(costs, chis))
        assert used <= total or all(x == 1 for x in chis)
        # Nothing left over that would buy one more step of any bond.
        assert all(used + c(x + 1) - c(x) > total for c, x in zip(costs, chis))
    even = _deep_tn.share_budget((1, 1, 1), costs, 2000)
    heavy = _deep_tn.share_budget((1, 8, 1), costs, 2000)
    assert heavy[1] > even[1] and heavy[0] <= even[0] and heavy[2] <= even[2]


def test_shared_ranks_give_the_budget_to_the_layer_whose_output_spans_more():
    method = METHODS["tt-storage"]
    layers = [
        SimpleNamespace(
            name=name, op="MatMul", weight_shape=(64, 64), flops=0, attr=lambda key, default=None: default
        )
        for name in ("narrow", "wide")
    ]
    outputs = {
        "narrow": RNG.standard_normal((512, 2)) @ RNG.standard_normal((2, 64)),
        "wide": RNG.standard_normal((512, 64)),
    }
    total = 2 * 64 * 64 / 10
    chis = method.shared_ranks(layers, outputs, total)
    assert chis["wide"] > chis["narrow"]
    assert sum(method.cost(x, chis[x.name]).params for x in layers) <= total


def test_healing_trains_the_layers_bias_and_nothing_else_changes():
    with np.load(MODELS / "calib.npz") as archive:
        data = {"input": archive["input"][:256]}
    kwargs = dict(ranks={"/1/Gemm": ("tt-storage", 4)}, methods="tt-storage", data=data, provider="cpu")
    kwargs["correct"] = False
    plain, _ = tnopt.compress(str(MODELS / "fc2.onnx"), **kwargs)
    healed, _ = tnopt.compress(
        str(MODELS / "fc2.onnx"), heal=HealConfig(steps=10, eval_every=5, lr=0.03), **kwargs
    )
    before = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in healed.graph.initializer}
    assert before.keys() == after.keys()
    changed = {k for k in before if before[k].tobytes() != after[k].tobytes()}
    assert changed and all(k.startswith("/1/Gemm/") for k in changed), changed
    bias = [k for k in changed if k.endswith("/bias")]
    assert bias and after[bias[0]].shape == (300,)
    # The dense bias is the layer's own, same size: the original's C is no longer stored apart.
    original = tnopt.io.load_model(str(MODELS / "fc2.onnx"))
    gemm = next(n for n in original.graph.node if n.name == "/1/Gemm")
    assert gemm.input[2] not in after


def test_healing_runs_torch_on_the_math_thread_count_and_restores_it(monkeypatch):
    import torch

    monkeypatch.setenv("TNOPT_MATH_THREADS", "1")
    calls, original, before = [], torch.set_num_threads, torch.get_num_threads()
    torch.set_num_threads(2)

    def record(n):
        calls.append(n)
        original(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    with np.load(MODELS / "calib.npz") as archive:
        data = {"input": archive["input"][:64]}
    tnopt.compress(
        str(MODELS / "fc2.onnx"),
        ranks={"/1/Gemm": ("tt-storage", 3)},
        methods="tt-storage",
        data=data,
        provider="cpu",
        correct=False,
        heal=HealConfig(steps=2, eval_every=1),
    )
    after = torch.get_num_threads()
    original(before)
    assert calls == [1, 2] and after == 2
