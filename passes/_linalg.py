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
# ... and at most this many bytes per memo (ResNet-50's patch whitenings are 170 MB each: 64 of
# them would hold gigabytes); the oldest entries go first.
_CACHE_BYTES = 512 * 2**20


def _nbytes(value) -> int:
    return sum(_nbytes(v) for v in value) if isinstance(value, tuple) else getattr(value, "nbytes", 0)


def _bound(cache: OrderedDict) -> None:
    """Drop the oldest entries beyond _SVD_CACHE_SIZE entries or _CACHE_BYTES (keeps the newest)."""
    while len(cache) > 1 and (
        len(cache) > _SVD_CACHE_SIZE or sum(_nbytes(v) for v in cache.values()) > _CACHE_BYTES
    ):
        cache.popitem(last=False)


def clear_memos() -> None:
    """Empty the SVD, whitening and whitened-kernel memos (up to ~1 GB): for when no more factors
    of this model will be fitted (the search is over)."""
    _SVD_CACHE.clear()
    _WHITENING_CACHE.clear()
    _WHITENED_KERNEL_CACHE.clear()


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64, memoised: the search factorizes one weight at many ranks, and every
    rank of a truncated SVD (and every HOSVD start) reuses the same decomposition."""
    w = np.ascontiguousarray(matrix, dtype=np.float64)
    key = (w.shape, hashlib.sha1(w.tobytes()).hexdigest())
    hit = _SVD_CACHE.get(key)
    if hit is None:
        hit = np.linalg.svd(w, full_matrices=False)
        _SVD_CACHE[key] = hit
        _bound(_SVD_CACHE)
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
    """The `rank` leading left singular vectors. A wide matrix (a HOOI unfolding: (O, r_in·k))
    goes through the eigenvectors of its (rows, rows) Gram: the same subspace (to round-off where
    it is well separated), ~3x faster than its SVD (a 512x512x3x3 HOOI fit: 18 s → 6 s)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[1] >= m.shape[0]:
        _, vectors = np.linalg.eigh(m @ m.T)
        return vectors[:, ::-1][:, :rank]
    u, _, _ = np.linalg.svd(m, full_matrices=False)
    return u[:, :rank]


def partial_tucker(weight: np.ndarray, ranks: tuple[int, int], n_iter: int = 10, tol: float = 1e-10):
    """Tucker-2 of a kernel (O, I, *k) on modes O and I: W ≈ core ×_0 U_out ×_1 U_in.

    HOSVD initialisation (exact when the planted rank is reached) refined by up to `n_iter` HOOI
    sweeps; deterministic. `n_iter=0` is the truncated HOSVD: its factors are the leading singular
    vectors of the two unfoldings, which the memoised `svd` computes once for every rank, so a
    whole rank ladder costs two SVDs (HOOI costs two SVDs per sweep per rank); HOOI only lowers the
    residual from there (the search estimates every rank by truncation, fits the few it uses).
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
        _bound(_WHITENING_CACHE)
    else:
        _WHITENING_CACHE.move_to_end(key)
    return _WHITENING_CACHE[key]


def _damped_cholesky(c: np.ndarray, damping: float) -> np.ndarray:
    scale = float(np.mean(np.diag(c))) or 1.0
    # Round-off can leave a rank-deficient moment slightly indefinite: raise the damping until it is not.
    for attempt in range(8):
        try:
            # The damping added to a copy's diagonal: no n×n identity beside it (170 MB for a 4608²
            # patch moment); the same sums as c + damping·scale·I.
            shifted = c.copy()
            shifted.flat[:: len(c) + 1] += damping * scale
            return np.linalg.cholesky(shifted)
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
    weight: np.ndarray,
    ranks: tuple[int, int],
    input_moment: np.ndarray,
    damping: float = DEFAULT_DAMPING,
    n_iter: int = 10,
):
    """Tucker-2 in the input-covariance-weighted norm: factorize W̃ = W ×_I Sᵀ, then map the
    input factor back, U_in = S⁻ᵀŨ_in, so the in-1x1 conv projects onto the directions that carry
    output energy on real inputs rather than weight energy. `n_iter` HOOI sweeps after the HOSVD
    start (0: the HOSVD truncation itself, see `partial_tucker`)."""
    w = np.asarray(weight, dtype=np.float64)
    s = whitening(input_moment, damping)
    u_out, core, u_in_white, _ = partial_tucker(_whitened_kernel(w, s), ranks, n_iter=n_iter)
    u_in = unwhiten(s, u_in_white)
    approx = mode_product(mode_product(core, u_out, 0), u_in, 1)
    return u_out, core, u_in, relative_error(w, approx)


_WHITENED_KERNEL_CACHE: OrderedDict = OrderedDict()


def _whitened_kernel(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W ×_I Sᵀ, memoised for the last few (W, S): a layer's every candidate rank whitens the same
    kernel, and the SVD memo behind the HOSVD start keys on these exact bytes."""
    key = (w.shape, hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest(), id(s))
    hit = _WHITENED_KERNEL_CACHE.get(key)
    if hit is None or hit[0] is not s:
        hit = (s, mode_product(w, s.T, 1))
        _WHITENED_KERNEL_CACHE[key] = hit
        if len(_WHITENED_KERNEL_CACHE) > 4:
            _WHITENED_KERNEL_CACHE.popitem(last=False)
    else:
        _WHITENED_KERNEL_CACHE.move_to_end(key)
    return hit[1]


def refit_last_factor(hidden_gram: np.ndarray, hidden_target: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Least squares B = argmin ‖T − H·B‖ from accumulated HᵀH and HᵀT (ridge-stabilised)."""
    g = np.asarray(hidden_gram, dtype=np.float64)
    scale = float(np.mean(np.diag(g))) or 1.0
    return np.linalg.solve(g + ridge * scale * np.eye(len(g)), np.asarray(hidden_target, dtype=np.float64))
