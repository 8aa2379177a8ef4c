"""Whether a rewrite gains anything: no rank rule may apply one that does not.

A rewrite is applied only when it stores fewer parameters *and* fewer bytes than the dense weight
as the file holds it (an int8 weight dequantised by Cast → Mul is 1 byte a value; its float
factors are 4), and — unless the method keeps the dense op at run time (storage modes, folded back
at load) — costs fewer FLOPs when the run's objective is FLOPs or latency. `allow_growth` (for
exactness tests at full rank) is the only override. Pure: no onnx, no runtime.
"""

from __future__ import annotations

FLOP_OBJECTIVES = ("flops", "latency")


def factor_bytes(layer, params: int) -> int:
    """Bytes of `params` factor values: factors are stored in the weight's floating dtype."""
    itemsize = layer.weight.dtype.itemsize if layer.weight is not None else 4
    return int(params) * itemsize


def grows_file(layer, params: int) -> str | None:
    """Why factors of `params` values would not shrink the stored weight, or None."""
    stored = layer.weight_bytes
    after = factor_bytes(layer, params)
    if stored and after >= stored:
        dtype = f"{layer.stored_dtype} " if layer.stored_dtype else ""
        return f"would grow the file: factors take {after:,} bytes, the {dtype}weight {stored:,}"
    return None


def no_gain_reason(layer, method, rank_label: str, cost, objective: str = "flops") -> str | None:
    """Why applying `method` at `rank_label` (costing `cost`) gains nothing, or None when it gains."""
    if cost.params >= layer.params:
        return (
            f"{method.name} at rank {rank_label} has {cost.params:,} params ≥ dense {layer.params:,}: "
            "no gain; kept dense"
        )
    grows = grows_file(layer, cost.params)
    if grows:
        return f"{method.name} at rank {rank_label} {grows}; kept dense"
    folded = getattr(method, "folded_at_load", False)
    if objective in FLOP_OBJECTIVES and not folded and cost.flops >= layer.flops:
        return (
            f"{method.name} at rank {rank_label} costs {cost.flops / max(layer.flops, 1):.1f}x the dense "
            f"FLOPs; the objective is {objective} (--objective params accepts it); kept dense"
        )
    return None


def flops_growth_note(flops_before: int, flops_after: int) -> str | None:
    """The table's flag for a rewrite that runs slower in FLOPs than the dense layer."""
    if flops_before and flops_after > flops_before:
        return f"raises FLOPs {flops_after / flops_before:.1f}x beyond the dense layer"
    return None
