"""A float32 patch moment is widened once per layer for the local errors, not in every product."""

import numpy as np

from tnopt import local_error
from tnopt.local_error import clear_widened, output_energy, widened
from tnopt.profile import LayerStats


class _Conv:
    op = "Conv"


def test_widened_copy_is_reused_for_the_same_moment_and_dropped_on_clear():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6)).astype(np.float32)
    b = a.copy()
    wide = widened(a)
    assert wide.dtype == np.float64 and np.array_equal(wide, a.astype(np.float64))
    assert widened(a) is wide  # every candidate of the layer: one copy
    assert widened(b) is not wide  # another layer's moment (equal values, another array)
    exact = rng.standard_normal((4, 4))
    assert widened(exact) is exact  # float64 passes through
    clear_widened()
    assert local_error._WIDENED == []


def test_output_energy_on_a_float32_patch_moment_is_the_float64_energy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 3 * 3 * 3))
    moment = x.T @ x / len(x)
    weight = rng.standard_normal((5, 3, 3, 3))
    stats = LayerStats(len(x), np.eye(3), moment.astype(np.float32))
    flat = weight.reshape(5, -1)
    expected = float(np.sum((flat @ moment.astype(np.float32).astype(np.float64)) * flat))
    assert np.isclose(output_energy(_Conv(), stats, weight), expected, rtol=1e-12)
    assert local_error._WIDENED[0] is stats.patch_moment
    clear_widened()
