"""Peer rank rules, run by the benchmarks beside tnopt's search on the same model and data.

- uniform: one rank ratio for every layer (tltorch / torch-mpo style), bisected to the budget.
- VBMF: weight-only ranks from Empirical Variational Bayes Matrix Factorization (Nakajima et al.,
  JMLR 2013) on each weight unfolding — the rule of jacobgil's pytorch-tensor-decompositions and
  MUSCO: Tucker-2 ranks from the O- and I-mode unfoldings, SVD rank from the matrix.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from tnopt.passes import _linalg

import tnopt
import tnopt.io
from tnopt.analyze import analyze


def _tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2, rows, cols, s, residual, x_ubar):
    h = len(s)
    alpha = rows / cols
    x = s**2 / (cols * sigma2)
    z1, z2 = x[x > x_ubar], x[x <= x_ubar]
    tau_z1 = _tau(z1, alpha)
    return (
        np.sum(z2 - np.log(z2))
        + np.sum(z1 - tau_z1)
        + np.sum(np.log((tau_z1 + 1) / z1))
        + alpha * np.sum(np.log(tau_z1 / alpha + 1))
        + residual / (cols * sigma2)
        + (rows - h) * np.log(sigma2)
    )


def evbmf_rank(matrix: np.ndarray) -> int:
    """Number of components EVBMF keeps, with the noise variance estimated (no prior given)."""
    y = np.asarray(matrix, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = rows / cols
    tau_ubar = 2.5129 * np.sqrt(alpha)
    x_ubar = (1 + tau_ubar) * (1 + alpha / tau_ubar)
    eh_ub = int(min(np.ceil(rows / (1 + alpha)) - 1, rows)) - 1
    upper = np.sum(s**2) / (rows * cols)
    lower = (
        max(s[eh_ub + 1] ** 2 / (cols * x_ubar), np.mean(s[eh_ub + 1 :] ** 2) / cols)
        if eh_ub + 1 < len(s)
        else s[-1] ** 2 / (cols * x_ubar)
    )
    if not lower < upper:
        return len(s)
    sigma2 = minimize_scalar(
        _evb_objective, args=(rows, cols, s, 0.0, x_ubar), bounds=[lower, upper], method="bounded"
    ).x
    threshold = np.sqrt(cols * sigma2 * (1 + tau_ubar) * (1 + alpha / tau_ubar))
    return max(1, int(np.sum(s > threshold)))


def vbmf_ranks(model_path) -> dict:
    """Per candidate layer: Tucker-2 (r_out, r_in) for Conv, r for Gemm/MatMul."""
    ranks = {}
    for layer in analyze(tnopt.io.load_model(str(model_path))):
        if not layer.candidate:
            continue
        if layer.op == "Conv":
            ranks[layer.name] = (
                evbmf_rank(_linalg.unfold(layer.weight, 0)),
                evbmf_rank(_linalg.unfold(layer.weight, 1)),
            )
        else:
            ranks[layer.name] = evbmf_rank(layer.weight)
    return ranks
