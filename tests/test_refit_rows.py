"""The correction's normal equations keep at most MAX_REFIT_ROWS_PER_SAMPLE output positions per
sample (a seeded subset), so a refit at high resolution costs what it costs at low."""

import numpy as np
from tnopt.passes._linalg import refit_last_factor
from tnopt.passes._method import RefitSpec

from tnopt import refit_equations

SPEC = RefitSpec(hidden_role="h", factor_key="m", channel_axis=1, transposed=False, intercept=True)


def planted(samples, side, rng):
    """H (N, r, side, side) and T = H·M + b exactly, on every position."""
    hidden = rng.standard_normal((samples, 6, side, side))
    m, b = rng.standard_normal((6, 4)), rng.standard_normal(4)
    target = np.einsum("nrhw,ro->nohw", hidden, m) + b[None, :, None, None]
    return hidden, target, m, b


def test_rows_per_sample_are_capped_and_the_refit_is_still_exact():
    side = 40  # 1600 positions per sample > the cap
    equations = refit_equations.NormalEquations(SPEC)
    for _ in range(3):  # three batches of 2 samples
        hidden, target, m, b = planted(2, side, np.random.default_rng(7))
        equations.add(hidden, target)
    assert equations.rows == 3 * 2 * refit_equations.MAX_REFIT_ROWS_PER_SAMPLE < 3 * 2 * side * side
    solution = refit_last_factor(equations.gram, equations.cross)
    np.testing.assert_allclose(solution[:-1], m, rtol=1e-5, atol=1e-6)  # ridge 1e-6
    np.testing.assert_allclose(solution[-1], b, rtol=1e-5, atol=1e-6)


def test_small_layers_keep_every_row_and_the_subset_is_reproducible():
    rng = np.random.default_rng(4)
    hidden, target, _, _ = planted(3, 28, rng)  # 784 positions: under the cap, all kept
    small = refit_equations.NormalEquations(SPEC)
    small.add(hidden, target)
    assert small.rows == 3 * 28 * 28
    big_hidden, big_target, _, _ = planted(2, 48, rng)
    first, second = refit_equations.NormalEquations(SPEC), refit_equations.NormalEquations(SPEC)
    first.add(big_hidden, big_target)
    second.add(big_hidden, big_target)
    np.testing.assert_array_equal(first.gram, second.gram)  # seeded: same rows every run
