"""Pure linear algebra behind every pass: truncated SVD, partial Tucker (HOSVD + HOOI), energy ranks.

Never imports onnx. Every decomposition is deterministic (no random init) and returns its relative
reconstruction error ‖W − Ŵ‖_F / ‖W‖_F so callers can report it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

_SVD_CACHE: OrderedDict = OrderedDict()
_SVD_CACHE_SIZE = 64


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64, memoised: the search factorizes one weight at many ranks, and every
    rank of a truncated SVD (and every HOSVD start) reuses the same decomposition."""
    w = np.ascontiguousarray(matrix, dtype=np.float64)
    key = (w.shape, hashlib.sha1(w.tobytes()).hexdigest())
    hit = _SVD_CACHE.get(key)
    if hit is None:
        hit = np.linalg.svd(w, full_matrices=False)
        _SVD_CACHE[key] = hit
        if len(_SVD_CACHE) > _SVD_CACHE_SIZE:
            _SVD_CACHE.popitem(last=False)
    else:
        _SVD_CACHE.move_to_end(key)
    return hit


def relative_error(original: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(original))
    return float(np.linalg.norm(original - approx)) / norm if norm > 0 else 0.0


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return svd(matrix)[1]


def rank_for_energy(values: np.ndarray, energy: float) -> int:
    """Smallest r whose leading singular values keep `energy` of Σσ² (energy in (0, 1])."""
    squares = np.asarray(values, dtype=np.float64) ** 2
    total = squares.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(squares) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(values)))


def truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """W (K, N) ≈ A·B with A = U_r·√Σ_r (K, r) and B = √Σ_r·V_rᵀ (r, N); balanced split keeps both
    factors at the same scale, which matters in fp16. Returns (A, B, relative error)."""
    u, s, vt = svd(matrix)
    rank = max(1, min(rank, len(s)))
    root = np.sqrt(s[:rank])
    a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
    total = float(np.sum(s**2))
    err = float(np.sqrt(np.sum(s[rank:] ** 2) / total)) if total > 0 else 0.0
    return a, b, err


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def mode_product(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """tensor ×_mode matrix, with matrix of shape (new, tensor.shape[mode])."""
    moved = np.moveaxis(tensor, mode, 0)
    out = np.tensordot(matrix, moved, axes=(1, 0))
    return np.moveaxis(out, 0, mode)


def leading_left_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def partial_tucker(weight: np.ndarray, ranks: tuple[int, int], n_iter: int = 10, tol: float = 1e-10):
    """Tucker-2 of a kernel (O, I, *k) on modes O and I: W ≈ core ×_0 U_out ×_1 U_in.

    HOSVD initialisation (exact when the planted rank is reached) refined by HOOI; deterministic.
    Returns (U_out (O, r_o), core (r_o, r_i, *k), U_in (I, r_i), relative error).
    """
    w = np.asarray(weight, dtype=np.float64)
    r_out, r_in = min(ranks[0], w.shape[0]), min(ranks[1], w.shape[1])
    u_out = svd(unfold(w, 0))[0][:, :r_out]
    u_in = svd(unfold(w, 1))[0][:, :r_in]
    previous = np.inf
    for _ in range(n_iter):
        # Each factor is the leading subspace of W projected on the other factor (HOOI step).
        u_out = leading_left_vectors(unfold(mode_product(w, u_in.T, 1), 0), r_out)
        u_in = leading_left_vectors(unfold(mode_product(w, u_out.T, 0), 1), r_in)
        core = mode_product(mode_product(w, u_out.T, 0), u_in.T, 1)
        residual = max(float(np.sum(w**2) - np.sum(core**2)), 0.0)
        if abs(previous - residual) <= tol * max(float(np.sum(w**2)), 1e-30):
            break
        previous = residual
    core = mode_product(mode_product(w, u_out.T, 0), u_in.T, 1)
    approx = mode_product(mode_product(core, u_out, 0), u_in, 1)
    return u_out, core, u_in, relative_error(w, approx)


def tucker2_mode_spectra(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of the O-mode and I-mode unfoldings (for energy-based ranks)."""
    w = np.asarray(weight, dtype=np.float64)
    return singular_values(unfold(w, 0)), singular_values(unfold(w, 1))


# --- cuts: parameter-ratio ranks and kept norm ------------------------------------------------------


def rank_for_param_ratio(m: int, n: int, factor: float) -> int:
    """Largest r with r·(m + n) ≤ m·n / factor: the rank at which an (m, n) matrix stored as two
    factors has `factor` times fewer parameters. 0 when even rank 1 is too large."""
    return int(min((m * n) // (factor * (m + n)), min(m, n)))


def kept_norm_fraction(values: np.ndarray, rank: int) -> float:
    """‖W_r‖_F / ‖W‖_F = sqrt(kept energy) for the rank-`rank` truncation with singular values `values`."""
    squares = np.asarray(values, dtype=np.float64) ** 2
    total = float(squares.sum())
    if total <= 0:
        return 1.0
    return float(np.sqrt(squares[: max(rank, 0)].sum() / total))


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


def _cp_sweeps(x: np.ndarray, factors: list[np.ndarray], n_iter: int, tol: float, damping: float):
    """Proximal ALS: each factor solves (V + μI) A = M + μ·A_old. The proximal (damping) term keeps
    the normal equations well posed when V is near singular, yet leaves the fixed points those of
    plain least squares, so an exact planted rank is still recovered exactly."""
    rank = factors[0].shape[1]
    norm2 = float(np.sum(x * x))
    letters = "abcdefghijklmnopq"[: x.ndim]
    specs = [f"{letters}," + ",".join(f"{letters[m]}z" for m in range(x.ndim) if m != n) + f"->{letters[n]}z"
             for n in range(x.ndim)]
    # Contracting mode by mode (einsum's path) avoids materialising the Khatri-Rao product: 3x faster.
    paths = [np.einsum_path(spec, x, *[factors[m] for m in range(x.ndim) if m != n], optimize="greedy")[0]
             for n, spec in enumerate(specs)]
    grams = [f.T @ f for f in factors]
    history = []
    for _ in range(n_iter):
        for n in range(x.ndim):
            others = [m for m in range(x.ndim) if m != n]
            v = np.ones((rank, rank))
            for m in others:
                v = v * grams[m]
            mttkrp = np.einsum(specs[n], x, *[factors[m] for m in others], optimize=paths[n])
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
        return (f"degenerate CP fit: components {ratio:.1f}x larger than the kernel cancel each other "
                "(rank above the kernel's border rank; use a lower rank or another method)")
    unit = [f / np.where(n > 0, n, 1.0) for f, n in zip(factors, norms)]
    congruence = np.ones((weights.size, weights.size))
    for u in unit:
        congruence = congruence * (u.T @ u)
    np.fill_diagonal(congruence, 1.0)
    worst = float(congruence.min()) if congruence.size else 1.0
    if worst < CP_MIN_CONGRUENCE and ratio > 2.0:
        return f"degenerate CP fit: two components nearly cancel (congruence {worst:.3f}, norm ratio {ratio:.1f})"
    return None


# Sweeps are capped so one fit costs about this many flops (the search fits every layer at many ranks).
CP_FLOP_BUDGET = 2e9


def cp_als(tensor: np.ndarray, rank: int, n_iter: int | None = None, tol: float = 1e-6, *,
           damping: float = 1e-4, n_refine: int = 10) -> tuple[list[np.ndarray], float, dict]:
    """Rank-`rank` CP of an N-way tensor: T ≈ Σ_r a¹_r ⊗ … ⊗ aᴺ_r.

    Deterministic: every mode larger than `rank` is first compressed onto its leading `rank` HOSVD
    vectors (exact for a planted rank, and it makes each ALS sweep cost O(rank^N) instead of O(|T|));
    ALS runs on that core from the HOSVD start (missing columns of small modes come from a fixed
    seed), the factors are lifted back and refined by a few ALS sweeps on the full tensor.

    Stops after `n_iter` sweeps (None: 500, fewer for large cores so a fit costs ≈ CP_FLOP_BUDGET) or when a sweep improves the relative error by less than `tol` of itself.
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
        n_iter = int(min(500, max(30, CP_FLOP_BUDGET / (2 * core.size * rank * core.ndim))))
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
