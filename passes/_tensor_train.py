"""Tensor-train (MPO) factorization of a matrix: balanced mode factorization, TT-SVD, counts. Pure numpy."""

from __future__ import annotations

import numpy as np

from ._linalg import singular_values, svd

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
