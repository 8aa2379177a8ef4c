"""CP (canonical polyadic) decomposition by damped ALS, with degeneracy diagnosis. Pure numpy."""

from __future__ import annotations

import numpy as np

from ._linalg import mode_product, relative_error, svd, unfold

# --- CP (canonical polyadic) by damped ALS -----------------------------------------------------------

# Σλ² may exceed ‖W‖² by at most this factor (in norm): beyond it the components cancel each other,
# the signature of a degenerate (border-rank) fit whose factors diverge and lose fp32 precision.
CP_MAX_NORM_RATIO = 10.0
# Two components whose congruence (product of per-mode cosines) is below this cancel each other.
CP_MIN_CONGRUENCE = -0.95


def khatri_rao(matrices: list[np.ndarray]) -> np.ndarray:
    """Column-wise Kronecker product, first matrix varying slowest (matches `unfold`'s column order)."""
    out = matrices[0]
    for m in matrices[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_reconstruct(factors: list[np.ndarray]) -> np.ndarray:
    shape = tuple(f.shape[0] for f in factors)
    return (factors[0] @ khatri_rao(factors[1:]).T).reshape(shape)


def _mttkrp(x: np.ndarray, factors: list[np.ndarray], mode: int, memo: list | None = None) -> np.ndarray:
    """unfold(x, mode) · khatri_rao(other factors), without forming the Khatri-Rao product: the
    largest other mode is contracted first by one GEMM, leaving an intermediate |x|·r/d_max small
    enough for the remaining (Hadamard-shared) contractions; a kernel's kh, kw modes are tiny.
    `memo` (a list the caller keeps across modes): that GEMM's result, reused while the factor it
    contracted is the same array — within an ALS sweep of a 4-way kernel, modes 1, 2 and 3 all
    contract the output mode first with the factor updated at mode 0, so one GEMM serves three
    (the same values: the same product, computed once)."""
    others = [m for m in range(x.ndim) if m != mode]
    big = max(others, key=lambda m: x.shape[m])
    if memo and memo[0] == big and memo[1] is factors[big]:
        y = memo[2]
    else:
        y = np.tensordot(x, factors[big], axes=([big], [0]))  # axes: x's without `big`, then r
        if memo is not None:
            # One entry: holding the factor keeps `is` exact (its id cannot be reused while held).
            memo[:] = [big, factors[big], y]
    axes = [m for m in range(x.ndim) if m != big]
    for m in others:
        if m == big:
            continue
        at = axes.index(m)
        shape = [1] * (len(axes) + 1)
        shape[at], shape[-1] = x.shape[m], -1
        y = (y * factors[m].reshape(shape)).sum(axis=at)
        axes.pop(at)
    return y


def _cp_sweeps(x: np.ndarray, factors: list[np.ndarray], n_iter: int, tol: float, damping: float):
    """Proximal ALS: each factor solves (V + μI) A = M + μ·A_old. The proximal (damping) term keeps
    the normal equations well posed when V is near singular, yet leaves the fixed points those of
    plain least squares, so an exact planted rank is still recovered exactly."""
    rank = factors[0].shape[1]
    norm2 = float(np.sum(x * x))
    grams = [f.T @ f for f in factors]
    history = []
    memo: list = []  # the last big contraction (_mttkrp), shared by the modes that repeat it
    for _ in range(n_iter):
        for n in range(x.ndim):
            others = [m for m in range(x.ndim) if m != n]
            v = np.ones((rank, rank))
            for m in others:
                v = v * grams[m]
            mttkrp = _mttkrp(x, factors, n, memo)
            scale = max(float(np.trace(v)) / rank, 1e-300)
            mu = damping * scale
            lhs = v + (mu + 1e-12 * scale) * np.eye(rank)
            factors[n] = np.linalg.solve(lhs, (mttkrp + mu * factors[n]).T).T
            grams[n] = factors[n].T @ factors[n]
        fit = np.ones((rank, rank))
        for g in grams:
            fit = fit * g
        residual = norm2 - 2 * float(np.sum(mttkrp * factors[-1])) + float(fit.sum())
        err = float(np.sqrt(max(residual, 0.0) / norm2))
        history.append(err)
        if not np.isfinite(err) or err < 1e-9:
            break
        if len(history) > 1 and history[-2] - err <= tol * history[-2]:
            break
    return factors, history


def cp_diagnose(factors: list[np.ndarray], norm: float) -> str | None:
    """A reason when a CP fit is degenerate (diverging, mutually cancelling components), else None."""
    if not all(np.all(np.isfinite(f)) for f in factors):
        return "CP-ALS diverged (non-finite factors)"
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])
    weights = np.prod(norms, axis=0)
    ratio = float(np.sqrt(np.sum(weights**2)) / norm) if norm > 0 else 0.0
    if ratio > CP_MAX_NORM_RATIO:
        return (
            f"degenerate CP fit: components {ratio:.1f}x larger than the kernel cancel each other "
            "(rank above the kernel's border rank; use a lower rank or another method)"
        )
    unit = [f / np.where(n > 0, n, 1.0) for f, n in zip(factors, norms)]
    congruence = np.ones((weights.size, weights.size))
    for u in unit:
        congruence = congruence * (u.T @ u)
    np.fill_diagonal(congruence, 1.0)
    worst = float(congruence.min()) if congruence.size else 1.0
    if worst < CP_MIN_CONGRUENCE and ratio > 2.0:
        return (
            f"degenerate CP fit: two components nearly cancel (congruence {worst:.3f}, "
            f"norm ratio {ratio:.1f})"
        )
    return None


# Sweeps are capped so one fit costs about this many flops (the search fits every layer at many ranks).
CP_FLOP_BUDGET = 3e8


def cp_als(
    tensor: np.ndarray,
    rank: int,
    n_iter: int | None = None,
    tol: float = 1e-6,
    *,
    damping: float = 1e-4,
    n_refine: int = 10,
) -> tuple[list[np.ndarray], float, dict]:
    """Rank-`rank` CP of an N-way tensor: T ≈ Σ_r a¹_r ⊗ … ⊗ aᴺ_r.

    Deterministic: every mode larger than `rank` is first compressed onto its leading `rank` HOSVD
    vectors (exact for a planted rank, and it makes each ALS sweep cost O(rank^N) instead of O(|T|));
    ALS runs on that core from the HOSVD start (missing columns of small modes come from a fixed
    seed), the factors are lifted back and refined by a few ALS sweeps on the full tensor.

    Stops after `n_iter` sweeps (None: 500, fewer for large cores so a fit costs ≈ CP_FLOP_BUDGET)
    or when a sweep improves the relative error by less than `tol` of itself.
    Returns (factors with the component norms shared equally between modes and sorted by weight,
    relative error, notes); notes["refused"] is set with a reason when the fit is degenerate or
    does not fit at all, so the caller can refuse the rewrite instead of emitting a bad one.
    """
    x = np.asarray(tensor, dtype=np.float64)
    rank = int(rank)
    norm = float(np.linalg.norm(x))
    notes: dict = {}
    if norm == 0:
        return [np.zeros((d, rank)) for d in x.shape], 0.0, notes
    bases, core = [], x
    for mode, dim in enumerate(x.shape):
        if dim > rank:
            basis = svd(unfold(x, mode))[0][:, :rank]
            core = mode_product(core, basis.T, mode)
            bases.append(basis)
        else:
            bases.append(None)
    rng = np.random.default_rng(0)
    factors = []
    for mode, dim in enumerate(core.shape):
        u = svd(unfold(core, mode))[0][:, : min(rank, dim)]
        if u.shape[1] < rank:
            u = np.concatenate([u, rng.standard_normal((dim, rank - u.shape[1])) / np.sqrt(dim)], axis=1)
        factors.append(u)
    # The HOSVD start has unit columns; give the first factor the scale of the data.
    factors[0] = factors[0] * (norm / np.sqrt(rank))
    if n_iter is None:
        n_iter = int(min(500, max(20, CP_FLOP_BUDGET / (2 * core.size * rank * core.ndim))))
    factors, history = _cp_sweeps(core, factors, n_iter, tol, damping)
    factors = [f if b is None else b @ f for f, b in zip(factors, bases)]
    if n_refine and any(b is not None for b in bases) and history and history[-1] > 1e-7:
        factors, refine = _cp_sweeps(x, factors, n_refine, tol, damping)
        history += refine
    err = relative_error(x, cp_reconstruct(factors))
    notes["iterations"] = len(history)
    reason = cp_diagnose(factors, norm)
    if reason is None and not (np.isfinite(err) and err < 1.0):
        reason = f"CP-ALS found no fit (relative error {err:.3g})"
    if reason is not None:
        notes["refused"] = reason
        if reason.startswith("degenerate") or "diverged" in reason:
            notes["degenerate"] = reason
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])
    weights = np.prod(norms, axis=0)
    notes["norm_ratio"] = float(np.sqrt(np.sum(weights**2)) / norm)
    order = np.argsort(-weights, kind="stable")
    share = np.where(weights > 0, weights, 0.0) ** (1.0 / x.ndim)
    balanced = [(f / np.where(n > 0, n, 1.0)) * share for f, n in zip(factors, norms)]
    return [f[:, order] for f in balanced], err, notes
