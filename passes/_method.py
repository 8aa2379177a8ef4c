"""What every method in passes/ provides, and the rank arithmetic they share.

A method is check → decompose → build: `check(layer)` returns a skip reason or None,
`decompose(layer, rank, stats)` is pure math returning `Factors` (or a typed `Refusal`),
`build(emit, layer, factors)` emits nodes through `tnopt.splice.Emitter`. `cost(layer, rank)` is the
method's cost model; ranks come from a ratio of full rank, an energy fraction, or the search's
`candidate_ranks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Fractions of full rank offered to the budgeted search, densest where accuracy usually breaks.
CANDIDATE_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
# Ranks are rounded to this multiple where the dimension is large enough that rounding costs little.
HARDWARE_MULTIPLE = 8


@dataclass
class Factors:
    """Output of a decomposition: named arrays, the rank they realise, and the weight-space error."""

    arrays: dict[str, np.ndarray]
    rank: object
    rel_error: float
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """What `decompose` returns instead of `Factors` when its fit must not be applied (e.g. a
    degenerate CP fit): the reason, reported as the option's skip reason, and the fit's weight error."""

    reason: str
    rel_error: float = float("inf")
    notes: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class RefitSpec:
    """Where a method's last linear map sits, so the sequential correction can refit it.

    The emitted node `hidden_role` produces H; the final node computes H·M (+ bias) along
    `channel_axis`, with M stored as `factors.arrays[factor_key]` — as (r, out) or, for a 1x1 conv
    weight, as (out, r, 1, …) (`transposed`). `intercept`: the refit may also replace the bias.
    """

    hidden_role: str
    factor_key: str
    channel_axis: int
    transposed: bool
    intercept: bool

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        matrix = array.reshape(array.shape[0], array.shape[1])
        return matrix.T if self.transposed else matrix

    def from_matrix(self, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
        return (matrix.T if self.transposed else matrix).reshape(like.shape).astype(like.dtype)


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int


def scaled_rank(full: int, fraction: float, *, round_to: int = HARDWARE_MULTIPLE) -> int:
    """`fraction` of `full`, at least 1, rounded to a hardware multiple when full ≥ 4·multiple."""
    rank = max(1, math.ceil(fraction * full - 1e-9))
    if round_to and full >= 4 * round_to and round_to <= rank < full:
        rank = math.floor(rank / round_to + 0.5) * round_to  # nearest multiple, halves round up
    return int(min(max(rank, 1), full))


class Method:
    name: str = ""
    op_types: tuple[str, ...] = ()
    # True when every constant `build` emits at a lower rank equals the widest rank's constant with
    # trailing zeros cut off, and the zeros add exact zeros to the output (plain chains of linear
    # maps along the rank axes). The search's switchboard then feeds any rank to one session.
    zero_paddable: bool = False
    # False: `--method auto` leaves this method out (it must be named), e.g. one that pays only when healed.
    in_auto: bool = True

    def check(self, layer) -> str | None:
        if layer.op not in self.op_types:
            return f"{self.name} does not handle {layer.op}"
        return layer.skip_reason

    def full_rank(self, layer):
        raise NotImplementedError

    def rank_from_ratio(self, layer, ratio: float):
        raise NotImplementedError

    def rank_from_energy(self, layer, energy: float):
        raise NotImplementedError

    def cost(self, layer, rank) -> Cost:
        raise NotImplementedError

    def decompose(self, layer, rank, stats=None) -> Factors | Refusal:
        """Pure math on `layer.weight` (and its shape facts, e.g. the group count): the factors at
        `rank`, whitened by the calibration `stats` when given, or a Refusal."""
        raise NotImplementedError

    def estimate(self, layer, rank, stats=None) -> Factors | Refusal:
        """Factors of `decompose`'s shapes whose error approximates its fit's, cheap enough to take
        at every candidate rank: what the search reads local errors, weight errors and subgraph
        shapes from before it knows which ranks it will use (it fits those with `decompose`).
        A method whose fit is itself a truncation (SVD, TT-SVD) or has no cheaper form returns
        `decompose`; one that returns something else marks it `notes["estimate"] = True`."""
        return self.decompose(layer, rank, stats)

    def build(self, emit, layer, factors: Factors) -> None:
        raise NotImplementedError

    def forward(self, layer, arrays: dict, x, bias=None):
        """The differentiable torch form of what `build` emits, for healing: `arrays` holds torch
        tensors keyed as `factors.arrays`, `x` the layer's input, `bias` the layer's effective bias
        (Conv B, Gemm beta·C; a refitted `arrays["bias"]` replaces it). Must equal onnxruntime's
        output of the built subgraph to float32 round-off."""
        raise NotImplementedError(f"{self.name} has no torch forward")

    @staticmethod
    def effective_bias(arrays: dict, bias):
        return arrays["bias"] if "bias" in arrays else bias

    def refit_spec(self, layer) -> RefitSpec | None:
        """None: this method's last factor is not a plain linear map the correction can refit."""
        return None

    def input_map(self, layer, factors: Factors) -> np.ndarray | None:
        """The matrix A with H = x·A (x the layer's input along its last axis, H the refit's hidden
        tensor), where H is that plain a map of the input; else None. With it the correction can
        rebuild H under other first factors from a captured x (the cross-fitted gate's folds)."""
        return None

    @staticmethod
    def bias_input(emit, factors: Factors):
        """The refitted bias when the correction produced one, else the original bias tensor."""
        if "bias" in factors.arrays:
            return emit.const("bias", factors.arrays["bias"])
        return emit.bias

    def rank_label(self, rank) -> str:
        return "x".join(str(r) for r in rank) if isinstance(rank, tuple) else str(rank)

    def rank_for_params(self, layer, target_params: float):
        """The largest ratio-derived rank whose factors fit in `target_params` (None if none does):
        bisection on the rank ratio, so every method is compared at matched parameter counts."""
        low, high, best = 0.0, 1.0, None
        for _ in range(40):
            mid = (low + high) / 2
            rank = self.rank_from_ratio(layer, mid)
            if self.cost(layer, rank).params <= target_params:
                best, low = rank, mid
            else:
                high = mid
        if best is None:
            smallest = self.rank_from_ratio(layer, 1e-9)
            best = smallest if self.cost(layer, smallest).params <= target_params else None
        return best

    def candidate_ranks(self, layer) -> list:
        """Ranks the search may try, cheapest first, each strictly cheaper than the dense layer."""
        seen, ranks = set(), []
        for fraction in CANDIDATE_FRACTIONS:
            rank = self.rank_from_ratio(layer, fraction)
            if rank in seen:
                continue
            seen.add(rank)
            if self.cost(layer, rank).params < layer.params:
                ranks.append(rank)
        return sorted(ranks, key=lambda r: self.cost(layer, r).params)
