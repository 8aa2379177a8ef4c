"""The factorization methods, one file each, in one explicit registry (no import side effects).

A new method is one file providing a `Method` subclass instance and one line here; the CLI's
choices and `--list-methods` derive from this dict.
"""

from . import cp, cut, deep_tn, mpo, svd, tucker2, tucker2_grouped
from ._method import Cost, Factors, Method, RefitSpec, Refusal

METHODS: dict[str, Method] = {
    "tucker2": tucker2.METHOD,
    "tucker2-transpose": tucker2.TRANSPOSED,
    "svd": svd.METHOD,
    "cp": cp.METHOD,
    "cut-o": cut.CUT_O,
    "cut-i": cut.CUT_I,
    "cut-spatial": cut.CUT_SPATIAL,
    "tucker2-grouped": tucker2_grouped.METHOD,
    "mpo": mpo.METHOD,
    "mpo-storage": mpo.STORAGE,
    "deep-tn-storage": deep_tn.STORAGE,
    "tt-storage": deep_tn.TT_STORAGE,
    "tt-storage-mixed": deep_tn.TT_STORAGE_MIXED,
}

__all__ = ["METHODS", "Cost", "Factors", "Method", "RefitSpec", "Refusal"]
