"""Guards around the factor routines: they converge or refuse, and never see a non-finite number.

LAPACK's SVD does not converge on NaN and, on some builds, never returns on ±Inf, so finiteness is
checked before any decomposition (analyze already leaves non-finite weights dense; this also covers
calibration moments made non-finite by overflowing activations). A routine that does not converge
gives a *refused* `Factors` — the layer is left dense with that reason — and anything else that
goes wrong inside a method is tnopt's bug: an `InternalError` naming the layer and method.
"""

from __future__ import annotations

import numpy as np

from tnopt.errors import InternalError
from tnopt.passes import Refusal


def non_finite_count(array) -> int:
    values = np.asarray(array)
    if values.dtype.kind not in "fc":
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def refused(rank, reason: str) -> Refusal:
    return Refusal(reason)


def guarded_decompose(method, layer, rank, stats=None, *, estimate: bool = False):
    """`method.decompose(layer, rank, stats)` that converges or returns a Refusal (never hangs);
    any other failure is an InternalError naming the layer and method. `estimate`: the method's
    cheap `estimate` instead of its fit, under the same guards."""
    weight = layer.weight
    if weight is None:
        raise InternalError("asked to factorize a layer without a constant weight", layer.name, method.name)
    bad = non_finite_count(weight)
    if bad:
        return refused(rank, f"weight holds {bad} NaN/Inf values")
    notes = {}
    moments = (stats.input_moment, getattr(stats, "patch_moment", None)) if stats is not None else ()
    if any(non_finite_count(m) for m in moments if m is not None):
        # Activations overflowed on the calibration data: whitening by them would be garbage.
        stats, notes = None, {"data_aware_skipped": "calibration moments are not finite"}
    try:
        factors = (method.estimate if estimate else method.decompose)(layer, rank, stats)
    except np.linalg.LinAlgError as exc:
        return refused(rank, f"the decomposition did not converge ({exc})")
    except (ValueError, ArithmeticError, IndexError, TypeError, AssertionError) as exc:
        raise InternalError(f"{type(exc).__name__}: {exc}", layer.name, method.name) from exc
    if isinstance(factors, Refusal):
        return factors
    bad = sum(non_finite_count(a) for a in factors.arrays.values())
    if bad:
        return refused(rank, f"the factors hold {bad} NaN/Inf values (the weight's scale overflows them)")
    factors.notes.update(notes)
    return factors
