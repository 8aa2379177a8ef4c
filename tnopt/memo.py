"""A memo of factors bounded in bytes: the least recently read entries go first (the newest is
always kept). Used where the search would otherwise keep every layer's factors at every rank
(SearchContext.estimates_memo) or every fold's refit (fold_stats.FoldFactors)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable


def factors_nbytes(factors) -> int:
    """Bytes of a Factors' arrays; 0 for anything else (None, a Refusal)."""
    return sum(int(a.nbytes) for a in getattr(factors, "arrays", {}).values())


class FactorsMemo(OrderedDict):
    """Factors by key, within `limit()` bytes. `limit` is read at each insertion, so a bound kept as a
    module constant (and patched by a test) is honoured."""

    def __init__(self, limit: Callable[[], int]):
        super().__init__()
        self.limit = limit
        self.bytes = 0

    def recent(self, key):
        """The entry at `key` (it must be there), marked as just read."""
        self.move_to_end(key)
        return self[key]

    def put(self, key, factors) -> None:
        self[key] = factors
        self.bytes += factors_nbytes(factors)
        while len(self) > 1 and self.bytes > self.limit():
            self.bytes -= factors_nbytes(self.popitem(last=False)[1])

    def take(self, key):
        """Remove and return the entry at `key` (None where there is none)."""
        factors = self.pop(key, None)
        self.bytes -= factors_nbytes(factors)
        return factors
