"""CP-ALS sweeps share the big contraction of the modes that repeat it (passes/_cp_als.py `_mttkrp`'s
memo): half the GEMMs of a 4-way kernel's sweep, the same factors bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from tnopt.passes import _cp_als


def _counting_tensordot(monkeypatch):
    calls = []
    plain = np.tensordot

    def counted(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    monkeypatch.setattr(np, "tensordot", counted)
    return calls


@pytest.mark.parametrize("shape, rank", [((24, 16, 3, 3), 40), ((16, 24, 3, 3), 12), ((20, 12, 6), 8)])
def test_shared_contraction_gives_the_same_fit_bit_for_bit(monkeypatch, shape, rank):
    x = np.random.default_rng(3).standard_normal(shape)
    shared = _cp_als.cp_als(x, rank, n_iter=15, n_refine=0)
    plain_mttkrp = _cp_als._mttkrp
    monkeypatch.setattr(
        _cp_als, "_mttkrp", lambda x, factors, mode, memo=None: plain_mttkrp(x, factors, mode)
    )
    unshared = _cp_als.cp_als(x, rank, n_iter=15, n_refine=0)
    assert shared[1] == unshared[1] and shared[2] == unshared[2]
    for a, b in zip(shared[0], unshared[0]):
        np.testing.assert_array_equal(a, b)


def test_a_kernel_sweep_contracts_its_big_modes_twice_not_four_times(monkeypatch):
    """(O, I, kh, kw) with O ≥ I: mode 0 contracts I first, modes 1-3 all contract O with the factor
    just updated at mode 0 — one GEMM for the three."""
    x = np.random.default_rng(4).standard_normal((32, 16, 3, 3))
    factors = [np.random.default_rng(5).standard_normal((d, 20)) for d in x.shape]
    calls = _counting_tensordot(monkeypatch)
    _, history = _cp_als._cp_sweeps(x, [f.copy() for f in factors], n_iter=5, tol=0.0, damping=1e-4)
    assert len(history) == 5
    assert len(calls) == 2 * 5
