"""Deep tensor network of a weight (the ADTN form, Qing et al.): pure math, numpy or torch, no onnx.

The weight, as the matrix M (rows = its first axis, cols = the rest), is zero-padded to 2^a × 2^b and
read as a tensor of n = a + b binary indices ("sites"), row and column bits interleaved from the most
significant (r1 c1 r2 c2 …), so neighbouring sites describe the same scale of rows and columns:

    vec(M̃)[s_1 … s_n] = Σ  (L_D ⋯ L_1) · G_1[s_1] G_2[s_2] ⋯ G_n[s_n]
    layer 0 : a tensor train (MPS), cores G_k (χ_{k-1}, 2, χ_k), bonds ≤ χ
    layer ℓ : a brick wall of two-site gates U (4×4) on sites (k, k+1), k ≡ ℓ−1 (mod 2)

Stored numbers ≈ 2nχ² + D·(n−1)/2·16 against 2^n for the weight: exponentially fewer. A TT is the
depth-0 case; TT-SVD initialises it and the gates start as identities, so before training the network
is exactly the truncated TT, and gradient training (healing) moves every tensor.
"""

from __future__ import annotations

import math

import numpy as np

from ._linalg import relative_error, singular_values, svd


def matrix_shape(weight_shape) -> tuple[int, int]:
    return int(weight_shape[0]), int(math.prod(weight_shape[1:]))


def bits_for(size: int) -> int:
    return max(1, math.ceil(math.log2(size))) if size > 1 else 1


def site_layout(weight_shape) -> tuple[int, int, list[int]]:
    """(row bits a, column bits b, site order): site j holds axis site_order[j] of the (2,)*(a+b)
    tensor whose first a axes are the row bits and last b the column bits, most significant first."""
    rows, cols = matrix_shape(weight_shape)
    a, b = bits_for(rows), bits_for(cols)
    order = []
    for k in range(max(a, b)):
        if k < a:
            order.append(k)
        if k < b:
            order.append(a + k)
    return a, b, order


def bond_caps(n: int) -> list[int]:
    """Largest useful bond between site k and k+1 (k = 0..n-2): the rank bound of that unfolding."""
    return [min(2 ** (k + 1), 2 ** (n - k - 1)) for k in range(n - 1)]


def bonds(n: int, chi: int) -> list[int]:
    """Full bond list (1, χ_1, …, χ_{n-1}, 1) with every inner bond min(χ, its cap)."""
    return [1] + [max(1, min(int(chi), cap)) for cap in bond_caps(n)] + [1]


def gate_sites(n: int, depth: int) -> list[list[int]]:
    """For each gate layer, the first site of each two-site gate (brick wall, alternating offsets)."""
    return [list(range(layer % 2, n - 1, 2)) for layer in range(depth)]


def param_count(weight_shape, chi: int, depth: int) -> int:
    a, b, _ = site_layout(weight_shape)
    n = a + b
    chain = bonds(n, chi)
    mps = sum(chain[k] * 2 * chain[k + 1] for k in range(n))
    return int(mps + 16 * sum(len(sites) for sites in gate_sites(n, depth)))


def site_tensor(weight: np.ndarray) -> np.ndarray:
    """The weight as the zero-padded (2,)*n tensor in site order."""
    rows, cols = matrix_shape(weight.shape)
    a, b, order = site_layout(weight.shape)
    padded = np.zeros((2**a, 2**b), dtype=np.float64)
    padded[:rows, :cols] = np.asarray(weight, dtype=np.float64).reshape(rows, cols)
    return padded.reshape((2,) * (a + b)).transpose(order)


def tt_svd_sites(tensor: np.ndarray, chi: int) -> list[np.ndarray]:
    """TT-SVD (Oseledets) of a (2,)*n tensor with every bond ≤ χ: cores (χ_{k-1}, 2, χ_k)."""
    n = tensor.ndim
    chain = bonds(n, chi)
    cores, rest = [], tensor.reshape(2, -1)
    for k in range(n - 1):
        u, s, vt = svd(rest)
        r = min(chain[k + 1], len(s))
        cores.append(u[:, :r].reshape(chain[k], 2, r))
        chain[k + 1] = r
        rest = (s[:r, None] * vt[:r]).reshape(r * 2, -1)
    cores.append(rest.reshape(chain[n - 1], 2, 1))
    return cores


def unfolding_spectra(weight: np.ndarray) -> list[np.ndarray]:
    """Singular values of the n-1 site unfoldings (bond k's exact rank is unfolding k's rank)."""
    tensor = site_tensor(weight)
    return [singular_values(tensor.reshape(2 ** (k + 1), -1)) for k in range(tensor.ndim - 1)]


def identity_gates(n: int, depth: int) -> list[np.ndarray]:
    return [np.tile(np.eye(4), (len(sites), 1, 1)) for sites in gate_sites(n, depth)]


def _permute(t, order):
    return t.permute(order) if hasattr(t, "permute") else t.transpose(order)


def contract(cores, gates, weight_shape):
    """Weight (in `weight_shape`) from MPS cores and gate layers; numpy or torch (autograd) alike."""
    rows, cols = matrix_shape(weight_shape)
    a, b, order = site_layout(weight_shape)
    n = a + b
    vector = cores[0].reshape(-1, cores[0].shape[2])
    for core in cores[1:]:
        vector = (vector @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])
    for layer, sites in zip(gates, gate_sites(n, len(gates))):
        for index, k in enumerate(sites):
            # U acts on the pair of sites (k, k+1): one (4×4)·(4 × rest) product, not 2^k tiny
            # batched ones (those made a 2^19-entry contraction ~30x slower, forward and backward).
            split = vector.reshape(2**k, 4, -1).swapaxes(0, 1).reshape(4, -1)
            vector = (layer[index] @ split).reshape(4, 2**k, -1).swapaxes(0, 1).reshape(-1)
    inverse = list(np.argsort(order))
    padded = _permute(vector.reshape((2,) * n), inverse).reshape(2**a, 2**b)
    return padded[:rows, :cols].reshape(tuple(weight_shape))


def decompose(weight: np.ndarray, chi: int, depth: int):
    """(cores, identity gates, relative weight error): TT-SVD at bond χ, then `depth` identity layers."""
    tensor = site_tensor(weight)
    cores = tt_svd_sites(tensor, chi)
    gates = identity_gates(tensor.ndim, depth)
    approx = contract(cores, gates, weight.shape)
    return cores, gates, relative_error(weight, approx)
