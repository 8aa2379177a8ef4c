"""How much memory a rewrite may ask for, and which options the latency guard need not time. Math only:
the tensor sizes come from the caller (tnopt.layout reads them off the graphs).

A factorized subgraph computes intermediates the dense layer never held: an MPO chain with a large
(say prime) output mode holds rows × ∏ i_{>k} × ∏ o_{≤k} × r_k after core k, which for a MatMul
(…, 80) · (80, 6906) is thousands of times its input at a mid rank. Timing such a rewrite means
allocating that buffer (1.9 GB at 32 samples on PP-OCR rec-tiny's last MatMul); running it in the
model would too. So a rewrite whose largest tensor exceeds

    max(INTERMEDIATE_MAX_RATIO × the dense layer's largest tensor, INTERMEDIATE_FLOOR_BYTES)

gets a skip reason instead of a session: it is not timed and the guard never applies it. The
floor keeps small layers out of the rule (a few MB are never the problem); the ratio admits what
real low-rank rewrites hold (Tucker/CP/SVD intermediates are at most a few times the dense
tensors; balanced MPO chains at ranks that save FLOPs, up to ~the bond times the mode).
"""

from __future__ import annotations

INTERMEDIATE_MAX_RATIO = 16
INTERMEDIATE_FLOOR_BYTES = 64 * 2**20


def intermediate_limit(dense_largest_bytes: int) -> int:
    """The largest tensor a rewrite of a layer whose dense form holds `dense_largest_bytes` may hold."""
    return max(INTERMEDIATE_MAX_RATIO * int(dense_largest_bytes), INTERMEDIATE_FLOOR_BYTES)


def oversized_intermediate(largest_bytes: int | None, dense_largest_bytes: int | None) -> str | None:
    """A skip reason when the rewrite's largest tensor exceeds `intermediate_limit`; None when it
    fits or when a size is unknown (shape inference could not tell)."""
    if largest_bytes is None or dense_largest_bytes is None:
        return None
    limit = intermediate_limit(dense_largest_bytes)
    if largest_bytes <= limit:
        return None
    return (
        f"not timed: its subgraph holds a {largest_bytes / 2**20:.0f} MiB intermediate, "
        f"{largest_bytes / max(dense_largest_bytes, 1):.0f}x the dense layer's largest tensor "
        f"(limit {limit / 2**20:.0f} MiB)"
    )


def cannot_be_chosen(saving: float | None) -> str | None:
    """A skip reason for an option no plan can contain: the allocation (tnopt.budget) only ever
    takes options that save something of the objective (saving > 0). None: the saving is unknown
    (the latency objective reads it from the timing itself) or positive."""
    if saving is None or saving > 0:
        return None
    return "not timed: it saves nothing of the objective, so no plan can choose it"
