"""SVD of a Gemm / MatMul weight.

    y = x·W,  W (K, N) ≈ A·B,  A = U_r·√Σ_r (K, r),  B = √Σ_r·V_rᵀ (r, N)

    Gemm(A_in, W, C)   ⇒  Gemm(A_in, A, transA) → Gemm(·, B, C, beta)      (alpha, transB folded into W)
    MatMul(x, W)       ⇒  MatMul(x, A) → MatMul(·, B)                       (x may be N-d)
    MatMul(W, x)       ⇒  MatMul(B, x) → MatMul(A, ·)                       (constant on the left)

Params K·N → r·(K + N); it pays when r < K·N / (K + N). With calibration statistics the SVD is
whitened (SVD of SᵀW, C = SSᵀ the input moment), so it truncates the output error, not the weight's.
"""

from __future__ import annotations

from . import _linalg
from ._method import Cost, Factors, Method, RefitSpec, scaled_rank


class SVD(Method):
    name = "svd"
    zero_paddable = True
    op_types = ("Gemm", "MatMul")

    def full_rank(self, layer) -> int:
        return min(layer.weight_shape)

    def rank_from_ratio(self, layer, ratio: float) -> int:
        return scaled_rank(self.full_rank(layer), ratio)

    def rank_from_energy(self, layer, energy: float) -> int:
        return _linalg.rank_for_energy(_linalg.singular_values(layer.weight), energy)

    def cost(self, layer, rank: int) -> Cost:
        k, n = layer.weight_shape
        params = rank * (k + n)
        return Cost(params, 2 * layer.in_positions * params)

    def decompose(self, layer, rank: int, stats=None) -> Factors:
        weight = layer.weight
        if stats is not None:
            a, b, err, output_err = _linalg.whitened_svd(weight, stats.input_moment, rank)
            notes = {"data_aware": True, "output_error": output_err}
        else:
            a, b, err = _linalg.truncated_svd(weight, rank)
            notes = {}
        return Factors({"A": a.astype(weight.dtype), "B": b.astype(weight.dtype)}, rank, err, notes)

    def build(self, emit, layer, factors: Factors) -> None:
        a, b = emit.const("A", factors.arrays["A"]), emit.const("B", factors.arrays["B"])
        if layer.op == "Gemm":
            hidden = emit.op("Gemm", "factor_a", [emit.data_input, a], {"transA": layer.attr("transA")})
            bias = self.bias_input(emit, factors)
            inputs = [hidden, b] + ([bias] if bias is not None else [])
            # A refitted bias already holds beta·C.
            beta = 1.0 if "bias" in factors.arrays else layer.attr("beta")
            emit.op("Gemm", "factor_b", inputs, {"beta": beta}, final=True)
        elif layer.attr("weight_side") == "left":
            hidden = emit.op("MatMul", "factor_b", [b, emit.data_input])
            emit.op("MatMul", "factor_a", [a, hidden], final=True)
        else:
            hidden = emit.op("MatMul", "factor_a", [emit.data_input, a])
            emit.op("MatMul", "factor_b", [hidden, b], final=True)

    def forward(self, layer, arrays, x, bias=None):
        from . import _torch

        a, b = arrays["A"], arrays["B"]
        if layer.op == "Gemm":
            if layer.attr("transA"):
                x = x.transpose(0, 1)
            return _torch.add_bias((x @ a) @ b, self.effective_bias(arrays, bias))
        if layer.attr("weight_side") == "left":
            return a @ (b @ x)
        return (x @ a) @ b

    def input_map(self, layer, factors: Factors):
        if layer.attr("weight_side") == "left" or (layer.op == "Gemm" and layer.attr("transA")):
            return None
        return factors.arrays["A"]  # H = x·A: MatMul(x, A), or Gemm(x, A) without transA

    def refit_spec(self, layer) -> RefitSpec | None:
        if layer.attr("weight_side") == "left":
            return None  # A·(B·x): the last factor multiplies from the left; not refitted
        # A MatMul's bias lives in a separate Add downstream, so only Gemm refits an intercept.
        return RefitSpec("factor_a", "B", -1, False, intercept=layer.op == "Gemm" and layer.bias_per_channel)


METHOD = SVD()
