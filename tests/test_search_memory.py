"""The search's memos hold one layer's worth of estimates, not the whole model's at every rank."""

from __future__ import annotations

import numpy as np
from tnopt.passes import Factors

from tnopt import search as S


class _Layer:
    def __init__(self, name):
        self.name = name


def _context(estimate, factorize):
    return S.SearchContext(
        runner=None,
        layers=[],
        metric=None,
        calib=None,
        sweep_data=None,
        reference=[],
        sweep_reference=[],
        baseline=0.0,
        sweep_baseline=0.0,
        max_drop=0.01,
        drop_type="absolute",
        cache=None,
        factorize=factorize,
        estimate=estimate,
    )


def test_estimates_that_are_fits_are_kept_within_a_byte_bound(monkeypatch):
    monkeypatch.setattr(S, "MAX_ESTIMATE_MEMO_BYTES", 10 * 2**20)
    calls = {"estimate": 0, "fit": 0}

    def estimate(layer, method, rank):  # a truncation method's estimate: the fit itself, 4 MiB
        calls["estimate"] += 1
        return Factors({"a": np.zeros(2**20, np.float32)}, rank, 0.1)

    def factorize(layer, method, rank):
        calls["fit"] += 1
        return Factors({"a": np.ones(2**20, np.float32)}, rank, 0.1)

    ctx = _context(estimate, factorize)
    layers = [_Layer(f"l{i}") for i in range(40)]
    for layer in layers:  # the predicted sweep: every layer at a rank, once
        ctx.estimate_for(layer, "svd", 8)
    held = sum(a.nbytes for f in ctx.estimates_memo.values() for a in f.arrays.values())
    assert held <= 10 * 2**20 and len(ctx.estimates_memo) == 2 and not ctx.factors_memo
    assert ctx.estimates_memo_bytes == held
    # A recent estimate is the fit: read again or fitted, nothing is recomputed.
    recent = ctx.estimate_for(layers[-1], "svd", 8)
    assert ctx.factors_for(layers[-1], "svd", 8) is recent and calls == {"estimate": 40, "fit": 0}
    assert (layers[-1].name, "svd", 8) in ctx.factors_memo
    # A dropped one is fitted when a plan needs it, and kept as the fit from then on.
    fitted = ctx.factors_for(layers[0], "svd", 8)
    assert calls["fit"] == 1 and ctx.fits == 1 and ctx.estimate_for(layers[0], "svd", 8) is fitted


def test_nothing_the_search_kept_outlives_it(tmp_path, monkeypatch):
    """When the plan is chosen, the sessions the runner kept (lifted plans, boards), the factorization
    memos and the calibration moments are released: the stages after the search (export, validation,
    latency) start from what they need, not from the search's peak."""
    import gc
    import weakref

    from conftest import MODELS, budgeted_cnn4, subset_npz
    from tnopt.passes import _linalg

    from tnopt import allocator, pipeline
    from tnopt.runtime import Runtime

    opened = []
    session = Runtime.session

    def tracked(self, model, **options):
        made = session(self, model, **options)
        opened.append(weakref.ref(made))
        return made

    seen = {}
    release = pipeline._release_search_memory

    def released(runner, *moments):
        seen["moments"] = [len(m) for m in moments]
        release(runner, *moments)
        gc.collect()
        seen["sessions"] = sum(ref() is not None for ref in opened)
        seen["lifted"], seen["memos"] = (
            len(runner._lifted),
            len(_linalg._SVD_CACHE) + len(_linalg._WHITENING_CACHE),
        )
        seen["left"] = [len(m) for m in moments]
        seen["trimmed"] = len(trims)

    trims = []  # the heap's freed pages handed back after the release (tnopt/allocator.py)
    monkeypatch.setattr(allocator, "trim", lambda: trims.append(1) or True)
    monkeypatch.setattr(Runtime, "session", tracked)
    monkeypatch.setattr(pipeline, "_release_search_memory", released)
    calib = subset_npz(MODELS / "calib.npz", tmp_path / "c.npz", 0, 96)
    evaluation = subset_npz(MODELS / "eval.npz", tmp_path / "e.npz", 0, 96)
    _, report = budgeted_cnn4(calib, evaluation)
    assert report.search["verifications"] > 0 and len(opened) > 3
    assert seen["moments"][0] > 0, "the run had calibration moments to release"
    assert seen == dict(seen, sessions=0, lifted=0, memos=0, left=[0] * len(seen["moments"]), trimmed=1)
