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


def _mttkrp(x: np.ndarray, factors: list[np.ndarray], mode: int) -> np.ndarray:
    """unfold(x, mode) · khatri_rao(other factors), without forming the Khatri-Rao product: the
    largest other mode is contracted first by one GEMM, leaving an intermediate |x|·r/d_max small
    enough for the remaining (Hadamard-shared) contractions; a kernel's kh, kw modes are tiny."""
    others = [m for m in range(x.ndim) if m != mode]
    big = max(others, key=lambda m: x.shape[m])
    y = np.tensordot(x, factors[big], axes=([big], [0]))  # axes: x's without `big`, then r
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
    for _ in range(n_iter):
        for n in range(x.ndim):
            others = [m for m in range(x.ndim) if m != n]
            v = np.ones((rank, rank))
            for m in others:
                v = v * grams[m]
            mttkrp = _mttkrp(x, factors, n)
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


# --- tensor train ---
# TT-matrix (MPO) of a weight W (K, N) with K = ∏ i_k and N = ∏ o_k: W[(i_1..i_d), (o_1..o_d)] =
# G_1[:, i_1, o_1, :] · G_2[:, i_2, o_2, :] ⋯ G_d[:, i_d, o_d, :], cores G_k (r_{k-1}, i_k, o_k, r_k),
# r_0 = r_d = 1. Row-major: i_1 (o_1) is the most significant digit of the row (column) index.


def balanced_factorization(n: int, d: int) -> tuple[int, ...]:
    """n as a product of d integer factors, as equal as possible (smallest largest factor, then
    the smallest second largest, ...), ordered largest at both ends and smallest in the middle:
    384, 3 → (8, 6, 8); 1536, 3 → (16, 8, 12); 4096, 3 → (16, 16, 16).

    The middle cores carry two bonds, so a small middle mode keeps them cheap. A prime (or a number
    with one large prime factor) cannot be balanced: 17, 3 → (17, 1, 1). The TT is still exact and
    correct, just degenerate (a mode of 1 caps the neighbouring bond), and rarely pays.
    """
    if n < 1 or d < 1:
        raise ValueError(f"cannot factor {n} into {d} factors")
    best = _most_balanced(int(n), int(d), 1)
    ordered = sorted(best, reverse=True)
    left, right = [], []
    for index, factor in enumerate(ordered):
        (left if index % 2 == 0 else right).append(factor)
    return tuple(left + right[::-1])


def _most_balanced(n: int, d: int, low: int) -> tuple[int, ...]:
    """Non-decreasing d-tuple of factors ≥ low with product n whose descending order is
    lexicographically least (so the largest factor is as small as it can be); () if none."""
    if d == 1:
        return (n,) if n >= low else ()
    best: tuple[int, ...] = ()
    factor = low
    # The smallest factor of a non-decreasing tuple is at most the d-th root of the product.
    while factor**d <= n:
        if n % factor == 0:
            rest = _most_balanced(n // factor, d - 1, factor)
            candidate = (factor, *rest)
            if rest and (not best or candidate[::-1] < best[::-1]):
                best = candidate
        factor += 1
    return best


def tt_bond_caps(in_modes, out_modes) -> tuple[int, ...]:
    """Largest useful bond r_k (k = 1..d-1): the rank bound min(∏_{j≤k} i_j o_j, ∏_{j>k} i_j o_j) of
    the k-th unfolding; a TT with these bonds is exact for every W."""
    pairs = [int(i) * int(o) for i, o in zip(in_modes, out_modes)]
    total = int(np.prod(pairs, dtype=np.int64))
    caps, left = [], 1
    for pair in pairs[:-1]:
        left *= pair
        caps.append(min(left, total // left))
    return tuple(caps)


def tt_bonds(in_modes, out_modes, ranks) -> tuple[int, ...]:
    """Full bond tuple (1, r_1, ..., r_{d-1}, 1): `ranks` is the max bond (int), applied to every
    bond, or the d-1 inner bonds; each is clipped to its cap and to at least 1."""
    caps = tt_bond_caps(in_modes, out_modes)
    inner = [int(ranks)] * len(caps) if np.isscalar(ranks) else [int(r) for r in ranks]
    if len(inner) != len(caps):
        raise ValueError(f"{len(caps) + 1} cores need {len(caps)} bonds, got {len(inner)}")
    return (1, *(max(1, min(r, cap)) for r, cap in zip(inner, caps)), 1)


def tt_param_count(in_modes, out_modes, bonds) -> int:
    """Σ_k r_{k-1}·i_k·o_k·r_k for the full bond tuple from `tt_bonds`."""
    return int(sum(bonds[k] * i * o * bonds[k + 1] for k, (i, o) in enumerate(zip(in_modes, out_modes))))


def tt_chain_flops(in_modes, out_modes, bonds, rows: int) -> int:
    """FLOPs of x (rows, K) · W contracted one core at a time, input modes consumed left to right:
    core k multiplies (rows·∏_{j>k} i_j·∏_{j<k} o_j, r_{k-1}·i_k) by (r_{k-1}·i_k, o_k·r_k)."""
    total = 0
    for k, (i, o) in enumerate(zip(in_modes, out_modes)):
        batch = int(np.prod(in_modes[k + 1 :], dtype=np.int64)) * int(np.prod(out_modes[:k], dtype=np.int64))
        total += 2 * rows * batch * bonds[k] * i * o * bonds[k + 1]
    return int(total)


def _tt_tensor(weight: np.ndarray, in_modes, out_modes) -> np.ndarray:
    """W (K, N) as the d-way tensor of paired indices (i_1·o_1, ..., i_d·o_d)."""
    d = len(in_modes)
    w = np.asarray(weight, dtype=np.float64).reshape(*in_modes, *out_modes)
    interleave = [axis for k in range(d) for axis in (k, d + k)]
    return w.transpose(interleave).reshape([int(i) * int(o) for i, o in zip(in_modes, out_modes)])


def tt_svd_matrix(weight: np.ndarray, in_modes, out_modes, ranks) -> list[np.ndarray]:
    """TT-SVD (Oseledets 2011) of W (K, N): sequential truncated SVDs of the paired-index tensor,
    left-orthonormal cores G_1..G_{d-1} with the norm on G_d. Deterministic; exact when every bond
    reaches the rank of its unfolding. `ranks`: max bond (int) or the d-1 inner bonds."""
    in_modes, out_modes = [int(i) for i in in_modes], [int(o) for o in out_modes]
    k_dim, n_dim = np.shape(weight)
    if int(np.prod(in_modes)) != k_dim or int(np.prod(out_modes)) != n_dim or len(in_modes) != len(out_modes):
        raise ValueError(f"modes {in_modes} × {out_modes} do not factor a {k_dim}×{n_dim} matrix")
    bonds = tt_bonds(in_modes, out_modes, ranks)
    tensor = _tt_tensor(weight, in_modes, out_modes)
    cores, rest = [], tensor.reshape(tensor.shape[0], -1)
    for k in range(len(in_modes) - 1):
        # The memoised SVD makes the first step free for every rank the search tries on this weight.
        u, s, vt = svd(rest)
        r = min(bonds[k + 1], len(s))
        cores.append(u[:, :r].reshape(bonds[k], in_modes[k], out_modes[k], r))
        rest = (s[:r, None] * vt[:r]).reshape(r * in_modes[k + 1] * out_modes[k + 1], -1)
    cores.append(rest.reshape(bonds[-2], in_modes[-1], out_modes[-1], 1))
    return cores


def tt_to_matrix(cores) -> np.ndarray:
    """Contract TT-matrix cores back to W (∏ i_k, ∏ o_k)."""
    d = len(cores)
    in_modes = [c.shape[1] for c in cores]
    out_modes = [c.shape[2] for c in cores]
    acc = np.asarray(cores[0]).reshape(-1, cores[0].shape[3])
    for core in cores[1:]:
        acc = (acc @ np.asarray(core).reshape(core.shape[0], -1)).reshape(-1, core.shape[3])
    acc = acc.reshape([m for pair in zip(in_modes, out_modes) for m in pair])
    order = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return acc.transpose(order).reshape(int(np.prod(in_modes)), int(np.prod(out_modes)))


def tt_unfolding_spectra(weight: np.ndarray, in_modes, out_modes) -> list[np.ndarray]:
    """Singular values of the d-1 unfoldings of the paired-index tensor: bond k's exact TT rank is
    the rank of unfolding k, and TT-SVD's squared error is at most Σ_k of the squared tails dropped."""
    tensor = _tt_tensor(weight, in_modes, out_modes)
    pairs = tensor.shape
    return [singular_values(tensor.reshape(int(np.prod(pairs[: k + 1])), -1)) for k in range(len(pairs) - 1)]


# --- data-aware (whitened) factorizations ---------------------------------------------------------
# With C = E[x xᵀ] the input second moment of y = x·W, ‖X(W − Ŵ)‖² / rows = ‖Sᵀ(W − Ŵ)‖² for
# C = S Sᵀ (Cholesky): truncating SᵀW is truncating the output error itself (SVD-LLM).

DEFAULT_DAMPING = 1e-2


_WHITENING_CACHE: OrderedDict = OrderedDict()


def whitening(moment: np.ndarray, damping: float = DEFAULT_DAMPING) -> np.ndarray:
    """Lower Cholesky factor S of moment + damping·mean(diag)·I. Damping keeps dead (all-zero)
    input channels from turning into huge entries of S⁻¹ that unseen data would then amplify.
    Memoised like `svd`: one layer's moment is whitened once for all its candidate ranks."""
    c = np.ascontiguousarray(moment, dtype=np.float64)
    key = (c.shape, damping, hashlib.sha1(c.tobytes()).hexdigest())
    if key not in _WHITENING_CACHE:
        _WHITENING_CACHE[key] = _damped_cholesky(c, damping)
        if len(_WHITENING_CACHE) > _SVD_CACHE_SIZE:
            _WHITENING_CACHE.popitem(last=False)
    return _WHITENING_CACHE[key]


def _damped_cholesky(c: np.ndarray, damping: float) -> np.ndarray:
    scale = float(np.mean(np.diag(c))) or 1.0
    # Round-off can leave a rank-deficient moment slightly indefinite: raise the damping until it is not.
    for attempt in range(8):
        try:
            return np.linalg.cholesky(c + damping * scale * np.eye(len(c)))
        except np.linalg.LinAlgError:
            damping = max(damping * 10, 1e-10)
    raise np.linalg.LinAlgError("input moment is not positive definite even after damping")


def unwhiten(s: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """S⁻ᵀ·factor by a triangular solve (never an explicit inverse)."""
    from scipy.linalg import solve_triangular

    return solve_triangular(s, factor, trans="T", lower=True)


def whitened_svd(matrix: np.ndarray, moment: np.ndarray, rank: int, damping: float = DEFAULT_DAMPING):
    """W (K, N) ≈ A·B minimising ‖Sᵀ(W − AB)‖: SVD of SᵀW = UΣVᵀ, A = S⁻ᵀU_r√Σ_r, B = √Σ_rV_rᵀ.

    Returns (A, B, weight relative error, output relative error); the last is
    √(Σ_{i>r} σ_i² / Σ σ_i²) of the whitened problem, which equals ‖X(W − AB)‖ / ‖XW‖ exactly
    when damping is 0."""
    w = np.asarray(matrix, dtype=np.float64)
    s = whitening(moment, damping)
    u, sigma, vt = svd(s.T @ w)
    rank = max(1, min(rank, len(sigma)))
    root = np.sqrt(sigma[:rank])
    a = unwhiten(s, u[:, :rank] * root)
    b = root[:, None] * vt[:rank]
    total = float(np.sum(sigma**2))
    output_error = float(np.sqrt(np.sum(sigma[rank:] ** 2) / total)) if total > 0 else 0.0
    return a, b, relative_error(w, a @ b), output_error


def whitened_partial_tucker(
    weight: np.ndarray, ranks: tuple[int, int], input_moment: np.ndarray, damping: float = DEFAULT_DAMPING
):
    """Tucker-2 in the input-covariance-weighted norm: factorize W̃ = W ×_I Sᵀ, then map the
    input factor back, U_in = S⁻ᵀŨ_in, so the in-1x1 conv projects onto the directions that carry
    output energy on real inputs rather than weight energy."""
    w = np.asarray(weight, dtype=np.float64)
    s = whitening(input_moment, damping)
    u_out, core, u_in_white, _ = partial_tucker(mode_product(w, s.T, 1), ranks)
    u_in = unwhiten(s, u_in_white)
    approx = mode_product(mode_product(core, u_out, 0), u_in, 1)
    return u_out, core, u_in, relative_error(w, approx)


def refit_last_factor(hidden_gram: np.ndarray, hidden_target: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Least squares B = argmin ‖T − H·B‖ from accumulated HᵀH and HᵀT (ridge-stabilised)."""
    g = np.asarray(hidden_gram, dtype=np.float64)
    scale = float(np.mean(np.diag(g))) or 1.0
    return np.linalg.solve(g + ridge * scale * np.eye(len(g)), np.asarray(hidden_target, dtype=np.float64))
