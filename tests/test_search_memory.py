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
