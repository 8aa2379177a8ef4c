"""A candidate's local output error, in closed form from the layer's input second moments.

For a linear layer y = x·W (+ b) and a rewrite Ŵ, the output error on the calibration rows X is
X·ΔW with ΔW = W − Ŵ (the bias is untouched), so with the input moment C = E[x xᵀ]

    local error  e = E‖x·ΔW‖² / E‖x·W‖² = tr(ΔWᵀ C ΔW) / tr(Wᵀ C W)

— the squared relative output error of the layer on its own captured input, with no runtime call.
A 2-D Conv is the same product on im2col rows: ΔW as (O, I·kh·kw) against the patch moment P (exact at
the sampled positions, padding included). Without a patch moment a Conv's taps are taken as
uncorrelated: e ≈ Σ_taps tr(ΔW_t C ΔW_tᵀ) / Σ_taps tr(W_t C W_tᵀ), C the channel moment (exact for
1x1 convs; grouped convs enter as their block-sparse dense kernel).

Ŵ comes from the method's own differentiable forward (the function its subgraph computes) applied
to unit inputs: for Gemm/MatMul the identity rows give Ŵ; for a Conv, one-hot patches of the kernel's
size with stride 1, no padding and no dilation give one output pixel each, Ŵ[:, i, taps]. Every
method with a forward gets a prediction; none needs a reconstruction of its own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

# One-hot probes pushed through a method's forward at a time (a 512-channel 3x3 conv has 4608).
PROBE_CHUNK = 1024


def predictable(layer, stats) -> bool:
    """Whether a local error can be computed: a Conv, Gemm or right-weight MatMul with moments."""
    if stats is None or layer.weight is None:
        return False
    if layer.op == "Conv":
        return True
    return layer.op in ("Gemm", "MatMul") and layer.attr("weight_side", "right") == "right"


def dense_weight(layer) -> np.ndarray:
    """The layer's weight as one dense map: (K, N) for Gemm/MatMul, (O, I, *k) for a Conv (a grouped
    Conv expanded to its block-sparse kernel over all I input channels)."""
    weight = np.asarray(layer.weight, dtype=np.float64)
    if layer.op != "Conv" or layer.group == 1:
        return weight
    groups, per_in = layer.group, weight.shape[1]
    per_out = weight.shape[0] // groups
    dense = np.zeros((weight.shape[0], per_in * groups, *weight.shape[2:]))
    for g in range(groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        dense[rows, g * per_in : (g + 1) * per_in] = weight[rows]
    return dense


def _cut_i(layer, a):
    # Conv 1x1 with Aᵀ (I → r), then the spatial conv with B as (r, O, *k) transposed:
    # Ŵ[o, i] = Σ_r A[i, r] B[r, o].
    b = a["B"].reshape(a["B"].shape[0], layer.weight_shape[0], *layer.weight_shape[2:])
    return np.einsum("ir,ro...->oi...", a["A"], b)


def _cut_spatial(layer, a):
    # The {O·kh | I·kw} cut: A·B is the kernel as (O, kh, I, kw).
    o, i, kh, kw = layer.weight_shape
    return (a["A"] @ a["B"]).reshape(o, kh, i, kw).transpose(0, 2, 1, 3)


def _mpo(layer, a):
    from tnopt.passes._tensor_train import tt_to_matrix

    matrix = tt_to_matrix([a[f"G{k + 1}"] for k in range(sum(key.startswith("G") for key in a))])
    return matrix.T.reshape(layer.weight_shape) if layer.op == "Conv" else matrix


# Closed forms of Ŵ for the common methods (each the product its forward computes; tests compare them
# with the probe): a probe costs one forward per input feature, these one contraction.
_DIRECT = {
    "svd": lambda layer, a: a["A"] @ a["B"],
    "tucker2": lambda layer, a: np.einsum(
        "ab...,oa,ib->oi...", a["core"], a["U_out"], a["U_in"], optimize=True
    ),
    # 1x1 to r, depthwise kh x 1 and 1 x kw, 1x1 to O:
    # Ŵ[o, i, h, w] = Σ_r A_out[o, r] A_in[i, r] A_h[h, r] A_w[w, r].
    "cp": lambda layer, a: np.einsum(
        "or,ir,hr,wr->oihw", a["A_out"], a["A_in"], a["A_h"], a["A_w"], optimize=True
    ),
    "cut-o": lambda layer, a: (a["A"] @ a["B"]).reshape(layer.weight_shape),
    "cut-i": _cut_i,
    "cut-spatial": _cut_spatial,
    "mpo": _mpo,
    "mpo-storage": _mpo,
}
# Methods whose closed form holds only for some layouts (CP: the 2-D conv it factorizes into 4 modes).
_DIRECT_NDIM = {"cp": 4}


def reconstructed_weight(layer, method, factors, *, probe: bool = False) -> np.ndarray:
    """Ŵ of `factors`, shaped as dense_weight(layer): a closed form for the common methods (ungrouped),
    else (or with `probe`) the method's forward on unit inputs, bias removed."""
    direct = _DIRECT.get(method.name)
    fits = _DIRECT_NDIM.get(method.name, len(layer.weight_shape)) == len(layer.weight_shape)
    if direct is not None and fits and not probe and layer.group == 1 and "bias" not in factors.arrays:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in factors.arrays.items()}
        return direct(layer, arrays)
    import torch

    arrays = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in factors.arrays.items()}
    arrays.pop("bias", None)  # a refitted intercept is not part of the weight
    if layer.op in ("Gemm", "MatMul"):
        rows = layer.weight_shape[0]
        with torch.no_grad():
            out = method.forward(layer, arrays, torch.eye(rows, dtype=torch.float64), None)
        return out.numpy()
    kernel = tuple(layer.weight_shape[2:])
    channels = layer.weight_shape[1] * layer.group
    n_spatial = len(kernel)
    # The same kernel without geometry: a kernel-sized input gives exactly one output pixel.
    probe_layer = replace(
        layer,
        attrs=tuple((k, v) for k, v in layer.attrs if k not in ("strides", "pads", "dilations", "auto_pad"))
        + (("strides", [1] * n_spatial), ("pads", [0] * (2 * n_spatial)), ("dilations", [1] * n_spatial)),
    )
    width = channels * int(np.prod(kernel))
    columns = []
    with torch.no_grad():
        for start in range(0, width, PROBE_CHUNK):
            stop = min(start + PROBE_CHUNK, width)
            probes = torch.zeros((stop - start, width), dtype=torch.float64)
            probes[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            out = method.forward(probe_layer, arrays, probes.reshape(stop - start, channels, *kernel), None)
            columns.append(out.reshape(stop - start, -1).numpy())  # (probes, O)
    return np.concatenate(columns).T.reshape(layer.weight_shape[0], channels, *kernel)


# The last moment widened to float64 and its source (held, so that `is` stays exact). A stored patch
# moment is float32 (tnopt/profile.py PATCH_MOMENT_DTYPE), and numpy's matmul of float64 by float32 is
# not one BLAS call: a (512, 4608) by 4608² product took 1.00 s against 0.66 s in float64, and the cast
# 0.03 s. Every candidate of a layer reads the same moment, one layer after another, so one widened
# copy serves them all (ResNet-50's row lost ~2 min to the mixed products).
_WIDENED: list = []


def widened(moment: np.ndarray) -> np.ndarray:
    """`moment` in float64: itself when it is already, else one copy kept while the same array comes."""
    if moment.dtype == np.float64:
        return moment
    if _WIDENED and _WIDENED[0] is moment:
        return _WIDENED[1]
    wide = moment.astype(np.float64)
    _WIDENED[:] = [moment, wide]
    return wide


def clear_widened() -> None:
    """Drop the widened copy (the search is over: its moments are released)."""
    _WIDENED.clear()


def output_energy(layer, stats, matrix: np.ndarray) -> float:
    """E‖x·M‖² over the calibration rows for a weight-shaped M (dense_weight's layout)."""
    m = np.asarray(matrix, dtype=np.float64)
    if layer.op in ("Gemm", "MatMul"):
        return float(np.sum((stats.input_moment @ m) * m))
    patch = getattr(stats, "patch_moment", None)
    if patch is not None and m.ndim == 4 and m.shape[1] * m.shape[2] * m.shape[3] == len(patch):
        flat = m.reshape(m.shape[0], -1)
        return float(np.sum((flat @ widened(patch)) * flat))
    taps = m.reshape(m.shape[0], m.shape[1], -1)  # (O, I, taps): taps taken as uncorrelated
    moment = stats.input_moment
    return float(sum(np.sum((taps[:, :, t] @ moment) * taps[:, :, t]) for t in range(taps.shape[2])))


def local_error(layer, stats, method, factors, dense_energy: float | None = None) -> float:
    """Squared relative output error e of `factors` on the layer's calibration input (see module doc).
    `dense_energy`: output_energy of the dense weight, when the caller already has it."""
    weight = dense_weight(layer)
    denominator = output_energy(layer, stats, weight) if dense_energy is None else dense_energy
    if denominator <= 0:
        return 0.0
    delta = weight - reconstructed_weight(layer, method, factors)
    return max(output_energy(layer, stats, delta), 0.0) / denominator
