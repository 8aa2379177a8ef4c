"""Deep tensor network of a weight (the ADTN form, Qing et al.): pure math, numpy or torch, no onnx.

The weight is read as a tensor of axes (A_1, …, A_m) — its own axes, or a geometry the caller knows
(a conv's (O, I, kh, kw); a Gemm's (C, H, W, N) when its K inputs are a flattened (C, H, W) map) —
each axis zero-padded on its own to 2^{b_i} and split into b_i binary digits, most significant first.
The n = Σ b_i bits are the sites, ordered by groups of axes: inside a group the axes' bits interleave
by scale (coarsest first), groups follow one another. E.g. fc2's 784×300 Gemm, axes (28, 28, 300),
groups ((H, W), (N,)):

    sites:  h1 w1 h2 w2 h3 w3 h4 w4 h5 w5 | n1 n2 … n9        (h1 = the top bit of the row index)
    vec(W̃)[s_1 … s_n] = Σ  (L_D ⋯ L_1) · G_1[s_1] G_2[s_2] ⋯ G_n[s_n]
    layer 0 : a tensor train (MPS), cores G_k (χ_{k-1}, 2, χ_k), bonds ≤ χ
    layer ℓ : a brick wall of two-site gates U (4×4) on sites (k, k+1), k ≡ ℓ−1 (mod 2)

so neighbouring sites describe the same scale of the image's rows and columns: a smooth filter is
low-rank across every cut, which it is not when the flat index 28·r + c is split into bits as a
whole (the bits of a flat index mix rows and columns). The matrix layout (rows = first axis, cols =
the rest, two axes interleaved) is the case axes = (rows, cols), groups = ((rows, cols),).

Mixed radix (`radix="mixed"`): each axis is split into its prime factors ≤ 7 instead (28 → 7·2·2,
300 → 5·5·3·2·2, 3 → 3), so core k is (χ_{k-1}, d_k, χ_k) with d_k the digit's radix and an axis is
padded only when it has a larger prime factor; gates need binary sites (depth 0 only).
`radix="sized"`: by the axis's size — an axis of at most `SMALL_AXIS` entries (a 3x3 kernel's) is
padded to a power of two and split into bits, a larger one in mixed radix. The padded kernel entries
are free numbers the TT may use (VGG at 110x: 86.0% binary vs 79.9% mixed after 300 steps), while
padding 300 to 512 or 28 to 32 only costs bonds (fc2 at ≥ 100x: 85.7% mixed vs 84.7% binary).

Stored numbers ≈ 2nχ² + D·(n−1)/2·16 against ∏ A_i for the weight: exponentially fewer. A TT is the
depth-0 case; TT-SVD initialises it and the gates start as identities, so before training the network
is exactly the truncated TT, and gradient training (healing) moves every tensor. Padded entries are
sliced away by the contraction: their values are free; the TT-SVD start fills them by repeating each
axis's last entry (smoother than zeros, so lower rank across the cuts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._linalg import relative_error, svd

# Axes up to this size are padded to a power of two under radix "sized" (see the module docstring).
SMALL_AXIS = 4


def matrix_shape(weight_shape) -> tuple[int, int]:
    return int(weight_shape[0]), int(math.prod(weight_shape[1:]))


def bits_for(size: int) -> int:
    """Binary digits of an axis index: 0 for an axis of size 1 (it holds no site)."""
    return math.ceil(math.log2(size)) if size > 1 else 0


def radix_digits(size: int, max_radix: int = 7) -> tuple[int, ...]:
    """Mixed-radix digits of an axis index, most significant first: the prime factors of `size`
    (largest first) when none exceeds `max_radix`, else of the smallest larger size whose factors
    all do (the axis is padded up to it). () for an axis of size 1. E.g. 28 → (7, 2, 2),
    300 → (5, 5, 3, 2, 2), 3 → (3,), 11 → (3, 2, 2) (padded to 12)."""
    if size <= 1:
        return ()
    padded = size
    while True:
        rest, factors = padded, []
        for p in range(2, max_radix + 1):
            while rest % p == 0:
                factors.append(p)
                rest //= p
        if rest == 1:
            return tuple(sorted(factors, reverse=True))
        padded += 1


@dataclass(frozen=True)
class SiteLayout:
    """How the weight's entries map to sites. The digit tensor has axis 0's digits (most significant
    first), then axis 1's, …; site j holds digit `order[j]` of it. `radices` None: binary digits
    (`bits` of them per axis); else each axis's digits' radices (mixed radix, `bits` = their count)."""

    weight_shape: tuple[int, ...]
    axes: tuple[int, ...]
    bits: tuple[int, ...]
    order: tuple[int, ...]
    radices: tuple[tuple[int, ...], ...] | None = None

    @property
    def n(self) -> int:
        return len(self.order)

    @property
    def digits(self) -> tuple[tuple[int, ...], ...]:
        return self.radices if self.radices is not None else tuple((2,) * b for b in self.bits)

    @property
    def dims(self) -> tuple[int, ...]:
        """Each site's dimension (its digit's radix), in site order."""
        flat = [d for axis in self.digits for d in axis]
        return tuple(flat[j] for j in self.order)

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(math.prod(d) for d in self.digits)

    def site_names(self, names: str = "abcdefghijklmnopqrstuvwxyz") -> list[str]:
        """'a1', 'b1', … per site (axis letter, bit from the most significant): for tests and reports."""
        labels = [f"{names[axis]}{bit + 1}" for axis, b in enumerate(self.bits) for bit in range(b)]
        return [labels[j] for j in self.order]


def site_layout(weight_shape, axes=None, groups=None, radix: str = "binary") -> SiteLayout:
    """The layout of a weight read as `axes` (sizes, product = the weight's size; default the matrix
    (rows, cols)), with `groups` (tuples of axis indices covering every axis once; default one group
    of all axes): each group's digits interleave by scale, coarsest first, groups in order. `radix`
    "binary": each axis padded to a power of two, one site per bit; "mixed": one site per prime
    factor of the axis (`radix_digits`), so an axis of 28 or 300 or 3 is not padded to 32, 512, 4;
    "sized": binary for axes of at most `SMALL_AXIS` entries, mixed for the larger ones."""
    weight_shape = tuple(int(d) for d in weight_shape)
    axes = tuple(int(a) for a in (axes if axes is not None else matrix_shape(weight_shape)))
    if math.prod(axes) != math.prod(weight_shape):
        raise ValueError(f"axes {axes} do not hold a weight of shape {weight_shape}")
    groups = tuple(tuple(g) for g in (groups if groups is not None else (tuple(range(len(axes))),)))
    if sorted(i for g in groups for i in g) != list(range(len(axes))):
        raise ValueError(f"groups {groups} must name each of the {len(axes)} axes once")
    if radix not in ("binary", "mixed", "sized"):
        raise ValueError(f"radix {radix!r}: binary, mixed or sized")
    radices = None
    if radix in ("mixed", "sized"):
        radices = [
            (2,) * bits_for(a) if radix == "sized" and a <= SMALL_AXIS else radix_digits(a) for a in axes
        ]
        if not any(radices):
            radices[0] = (2,)
        bits = [len(d) for d in radices]
        radices = tuple(radices)
        if radix == "sized" and all(d == 2 for axis in radices for d in axis):
            radices = None  # every axis a power of two or small: exactly the binary layout
    else:
        bits = [bits_for(a) for a in axes]
    if sum(bits) == 0:
        bits[0] = 1  # a one-entry weight still needs one site
    offsets = np.concatenate([[0], np.cumsum(bits)[:-1]]).astype(int)
    order = []
    for group in groups:
        for level in range(max((bits[i] for i in group), default=0)):
            order += [int(offsets[i]) + level for i in group if level < bits[i]]
    return SiteLayout(weight_shape, axes, tuple(bits), tuple(order), radices)


def bond_caps(n: int, dims=None) -> list[int]:
    """Largest useful bond between site k and k+1 (k = 0..n-2): the rank bound of that unfolding
    (sites of dimension `dims`, default 2 each)."""
    dims = [2] * n if dims is None else list(dims)
    return [min(math.prod(dims[: k + 1]), math.prod(dims[k + 1 :])) for k in range(n - 1)]


def bonds(n: int, chi: int, dims=None) -> list[int]:
    """Full bond list (1, χ_1, …, χ_{n-1}, 1) with every inner bond min(χ, its cap)."""
    return [1] + [max(1, min(int(chi), cap)) for cap in bond_caps(n, dims)] + [1]


def chain_for(layout: "SiteLayout", rank) -> list[int]:
    """The bond chain (1, χ_1, …, χ_{n-1}, 1) of a rank: an int χ (every bond min(χ, its cap)) or an
    explicit chain (a tuple of n+1 bonds, ends 1, each within its cap)."""
    if isinstance(rank, (tuple, list)):
        chain = [int(r) for r in rank]
        caps = bond_caps(layout.n, layout.dims)
        if len(chain) != layout.n + 1 or chain[0] != 1 or chain[-1] != 1:
            raise ValueError(f"a chain of {layout.n} sites has {layout.n + 1} bonds, ends 1: {rank}")
        if any(not 1 <= c <= cap for c, cap in zip(chain[1:-1], caps)):
            raise ValueError(f"bond chain {rank} exceeds the unfoldings' ranks {caps}")
        return chain
    return bonds(layout.n, rank, layout.dims)


def fill_bonds(layout: "SiteLayout", chi: int, budget: float, spectra=None) -> list[int]:
    """Bonds (1, χ_1, …, 1) that spend `budget` stored numbers: every bond at the uniform χ (the
    largest uniform bond within the budget), then what the uniform bond leaves is spent one bond
    step at a time, level by level: among the bonds at the lowest level that can still rise within
    the budget, the one whose next singular value of its unfolding (`spectra`; without them the
    cheapest) buys the most squared norm per stored number. So no bond is two steps above another
    that could still rise (measured: spreading the bonds by the spectra alone, a few bonds high and
    others low, trained worse on fc2 — bench/RESULTS.md, issue 11 session 10)."""
    dims = list(layout.dims)
    chain = bonds(layout.n, chi, dims)
    caps = [1] + bond_caps(layout.n, dims) + [1]
    squares = None if spectra is None else [np.asarray(s, np.float64) ** 2 for s in spectra]
    used = mps_params(chain, dims)
    while True:
        options = []
        for k in range(1, layout.n):
            r = chain[k]
            extra = dims[k - 1] * chain[k - 1] + dims[k] * chain[k + 1]
            if r >= caps[k] or used + extra > budget:
                continue
            worth = 1.0 if squares is None else (squares[k - 1][r] if r < len(squares[k - 1]) else 0.0)
            options.append((r, -worth / extra, k, extra))
        if not options:
            return chain
        lowest = min(o[0] for o in options)
        _, _, best, extra = min(o for o in options if o[0] == lowest)
        used += extra
        chain[best] += 1


def mps_params(chain, dims=None) -> int:
    dims = [2] * (len(chain) - 1) if dims is None else list(dims)
    return int(sum(chain[k] * dims[k] * chain[k + 1] for k in range(len(chain) - 1)))


def spectral_bonds(spectra, budget: int) -> list[int]:
    """Bonds (1, χ_1, …, χ_{n-1}, 1) whose cores fit `budget` numbers, spread by the unfoldings'
    spectra: greedily raise the bond whose next singular value buys the most squared norm per
    stored number (Σ_k of the discarded σ² bounds the TT-SVD error). A bond above twice a
    neighbour's is never raised: the core between them could not use it."""
    n = len(spectra) + 1
    chain = [1] * (n + 1)
    squares = [np.asarray(s, np.float64) ** 2 for s in spectra]
    while True:
        best, best_gain = None, 0.0
        for k in range(1, n):
            r = chain[k]
            if r >= len(squares[k - 1]) or r + 1 > 2 * min(chain[k - 1], chain[k + 1]):
                continue
            extra = 2 * (chain[k - 1] + chain[k + 1])
            if mps_params(chain) + extra > budget:
                continue
            gain = squares[k - 1][r] / extra
            if gain > best_gain:
                best, best_gain = k, gain
        if best is None:
            return chain
        chain[best] += 1


def effective_rank(samples: np.ndarray) -> float:
    """exp(entropy) of the normalised eigenvalues of the centred covariance of `samples` (rows =
    observations, columns = channels; Roy & Vetterli's effective rank): how many directions the
    layer's output really spans on the data, without a threshold to choose."""
    z = np.asarray(samples, np.float64)
    z = z - z.mean(axis=0)
    eig = np.clip(np.linalg.eigvalsh(z.T @ z), 0.0, None)
    if eig.sum() <= 0:
        return 1.0
    p = eig[eig > 0] / eig.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def share_budget(needs, cost_at, total: float) -> list[int]:
    """One bond per layer whose stored numbers together fit `total`, shared in proportion to
    `needs` (each layer's need in numbers; e.g. the effective rank of its output times its fan-in
    plus fan-out, what a low-rank map of that rank stores). `cost_at[l](χ)` is layer l's stored
    numbers at bond χ (non-decreasing). Each layer takes the largest bond within its share (at least
    1); what rounding leaves is then spent raising, one step at a time, the bond of the layer
    furthest below its share, while the total fits. Never above `total` unless bond 1 everywhere is."""
    needs = np.asarray(needs, np.float64)
    shares = total * needs / needs.sum()
    chis = []
    for cost, share in zip(cost_at, shares):
        chi = 1
        while cost(chi + 1) <= share and cost(chi + 1) > cost(chi):
            chi += 1
        chis.append(chi)
    used = sum(cost(chi) for cost, chi in zip(cost_at, chis))
    while True:
        # Layers in order of how far their stored numbers are below their share.
        for layer in np.argsort([cost(chi) / share for cost, chi, share in zip(cost_at, chis, shares)]):
            cost, chi = cost_at[layer], chis[layer]
            extra = cost(chi + 1) - cost(chi)
            if extra > 0 and used + extra <= total:
                chis[layer], used = chi + 1, used + extra
                break
        else:
            return chis


def gate_sites(n: int, depth: int) -> list[list[int]]:
    """For each gate layer, the first site of each two-site gate (brick wall, alternating offsets)."""
    return [list(range(layer % 2, n - 1, 2)) for layer in range(depth)]


def param_count(layout: SiteLayout, chi: int, depth: int) -> int:
    n = layout.n
    if depth and layout.radices is not None:
        raise ValueError("gate layers act on binary sites: a mixed-radix layout takes depth 0")
    return int(
        mps_params(chain_for(layout, chi), layout.dims)
        + 16 * sum(len(sites) for sites in gate_sites(n, depth))
    )


def site_tensor(weight: np.ndarray, layout: SiteLayout) -> np.ndarray:
    """The weight as the padded (2,)*n tensor in site order, each axis padded by repeating its last
    entry (smoother than zeros; the contraction slices the padding away)."""
    w = np.asarray(weight, dtype=np.float64).reshape(layout.axes)
    widths = [(0, p - a) for p, a in zip(layout.padded, layout.axes)]
    padded = np.pad(w, widths, mode="edge")
    return padded.reshape([d for axis in layout.digits for d in axis]).transpose(layout.order)


def tt_svd_sites(tensor: np.ndarray, chi) -> list[np.ndarray]:
    """TT-SVD (Oseledets) of a (d_1, …, d_n) tensor with every bond ≤ χ (an int), or with the bonds
    of a full chain (1, χ_1, …, 1): cores (χ_{k-1}, d_k, χ_k)."""
    n, dims = tensor.ndim, tensor.shape
    chain = list(chi) if isinstance(chi, (list, tuple)) else bonds(n, chi, dims)
    cores, rest = [], tensor.reshape(dims[0], -1)
    for k in range(n - 1):
        u, s, vt = svd(rest)
        r = min(chain[k + 1], len(s))
        cores.append(u[:, :r].reshape(chain[k], dims[k], r))
        chain[k + 1] = r
        rest = (s[:r, None] * vt[:r]).reshape(r * dims[k + 1], -1)
    cores.append(rest.reshape(chain[n - 1], dims[n - 1], 1))
    return cores


def unfolding_spectra(weight: np.ndarray, layout: SiteLayout) -> list[np.ndarray]:
    """Singular values of the n-1 site unfoldings (bond k's exact rank is unfolding k's rank)."""
    return _site_spectra(site_tensor(weight, layout))


def _site_spectra(tensor: np.ndarray) -> list[np.ndarray]:
    dims = tensor.shape
    # Values only (no singular vectors, no memo): 10–20 unfoldings of up to ~500 x 600.
    return [
        np.linalg.svd(tensor.reshape(math.prod(dims[: k + 1]), -1), compute_uv=False)
        for k in range(tensor.ndim - 1)
    ]


def identity_gates(n: int, depth: int) -> list[np.ndarray]:
    return [np.tile(np.eye(4), (len(sites), 1, 1)) for sites in gate_sites(n, depth)]


def _permute(t, order):
    return t.permute(order) if hasattr(t, "permute") else t.transpose(order)


def contract(cores, gates, layout: SiteLayout):
    """Weight (in layout.weight_shape) from MPS cores and gate layers; numpy or torch (autograd) alike."""
    n = layout.n
    if gates and layout.radices is not None:
        raise ValueError("gate layers act on binary sites: a mixed-radix layout takes depth 0")
    vector = cores[0].reshape(-1, cores[0].shape[2])
    for core in cores[1:]:
        vector = (vector @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])
    for layer, sites in zip(gates, gate_sites(n, len(gates))):
        for index, k in enumerate(sites):
            # U acts on the pair of sites (k, k+1): one (4×4)·(4 × rest) product, not 2^k tiny
            # batched ones (those made a 2^19-entry contraction ~30x slower, forward and backward).
            split = vector.reshape(2**k, 4, -1).swapaxes(0, 1).reshape(4, -1)
            vector = (layer[index] @ split).reshape(4, 2**k, -1).swapaxes(0, 1).reshape(-1)
    inverse = [int(i) for i in np.argsort(layout.order)]
    padded = _permute(vector.reshape(layout.dims), inverse).reshape(layout.padded)
    return padded[tuple(slice(0, a) for a in layout.axes)].reshape(layout.weight_shape)


def decompose(weight: np.ndarray, layout: SiteLayout, chi: int, depth: int, spread: str = "uniform"):
    """(cores, identity gates, relative weight error): TT-SVD at bond χ ("uniform"), or at bonds
    spread by the unfoldings' spectra within the same stored numbers ("spectral"), then `depth`
    identity gate layers."""
    tensor = site_tensor(weight, layout)
    if spread == "spectral":
        if layout.radices is not None:
            raise ValueError("the spectral bond spread takes binary sites")
        chi = spectral_bonds(_site_spectra(tensor), mps_params(bonds(layout.n, chi)))
    if depth and layout.radices is not None:
        raise ValueError("gate layers act on binary sites: a mixed-radix layout takes depth 0")
    cores = tt_svd_sites(tensor, chain_for(layout, chi) if isinstance(chi, (tuple, list)) else chi)
    gates = identity_gates(tensor.ndim, depth)
    approx = contract(cores, gates, layout)
    return cores, gates, relative_error(weight, approx)
