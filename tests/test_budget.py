"""The pure allocation and rank arithmetic."""

import itertools

import numpy as np
import pytest
from tnopt.passes._method import scaled_rank

from tnopt.budget import Option, allocate, tau_grid, total_saving


def random_options(seed, layers=4, per_layer=5):
    rng = np.random.default_rng(seed)
    options = []
    for layer in range(layers):
        # Typical shape: more saving costs disproportionately more proxy loss.
        savings = np.sort(rng.uniform(1, 100, per_layer))
        proxies = np.sort(rng.uniform(0, 1, per_layer)) ** 2
        options += [
            Option(f"L{layer}", f"r{i}", float(s), float(p)) for i, (s, p) in enumerate(zip(savings, proxies))
        ]
    return options


@pytest.mark.parametrize("seed", range(20))
def test_allocation_respects_tau_and_is_near_the_exact_optimum(seed):
    options = random_options(seed)
    by_layer = {}
    for o in options:
        by_layer.setdefault(o.layer, [None]).append(o)
    for tau in tau_grid(options, points=8):
        plan = allocate(options, tau)
        assert sum(o.proxy for o in plan.values()) <= tau + 1e-12
        assert len({o.layer for o in plan.values()}) == len(plan)
        best = 0.0
        for combo in itertools.product(*by_layer.values()):
            chosen = [o for o in combo if o is not None]
            if sum(o.proxy for o in chosen) <= tau + 1e-12:
                best = max(best, sum(o.saving for o in chosen))
        # Never above the exact optimum (brute force), and within the DP rounding of it.
        assert total_saving(plan) <= best + 1e-9
        assert total_saving(plan) >= 0.95 * best - 1e-9


def test_zero_tau_takes_only_free_options():
    options = [Option("a", "x", 5.0, 0.0), Option("b", "y", 10.0, 0.1)]
    assert set(allocate(options, 0.0)) == {"a"}
    assert set(allocate(options, 0.1)) == {"a", "b"}


def test_dominated_option_is_never_chosen():
    options = [
        Option("a", "cheap", 10.0, 0.1),
        Option("a", "dominated", 8.0, 0.2),
        Option("a", "big", 20.0, 0.3),
    ]
    for tau in (0.1, 0.2, 0.25, 0.3, 1.0):
        chosen = allocate(options, tau).get("a")
        assert chosen is None or chosen.key != "dominated"


@pytest.mark.parametrize(
    "full,fraction,expected",
    [
        (120, 1.0, 120),
        (84, 1.0, 84),
        (84, 0.5, 40),
        (384, 0.5, 192),
        (64, 0.3, 24),
        (10, 0.5, 5),
        (3, 0.1, 1),
        (100, 0.99, 96),
        (100, 1.0, 100),
    ],
)
def test_scaled_rank(full, fraction, expected):
    assert scaled_rank(full, fraction) == expected


def test_cosine_gate_charges_the_spread_of_per_sample_losses():
    from tnopt.metrics import cosine, paired_standard_error

    rng = np.random.default_rng(0)
    reference = [rng.standard_normal((50, 16))]
    noisy = [reference[0] + rng.standard_normal((50, 16)) * rng.uniform(0, 0.5, (50, 1))]
    a, b = reference[0], noisy[0]
    losses = 1 - np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.isclose(cosine(reference, noisy), 1 - losses.mean())
    assert np.isclose(paired_standard_error("cosine", reference, noisy), losses.std(ddof=1) / np.sqrt(50))
    assert paired_standard_error("cosine", reference, reference) < 1e-12  # identical outputs: exact
