"""The factorization methods, one file each, in one explicit registry (no import side effects).

A new method is one file providing a `Method` subclass instance and one line here; the CLI's
choices and `--list-methods` derive from this dict.
"""

from . import svd, tucker2
from ._method import Cost, Factors, Method

METHODS: dict[str, Method] = {
    "tucker2": tucker2.METHOD,
    "svd": svd.METHOD,
}

__all__ = ["METHODS", "Cost", "Factors", "Method"]
