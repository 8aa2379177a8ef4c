"""A plan: which layers are rewritten, by which method, at which rank, with which factors.

One rank representation from the allocation to the saved factors: a rank is the method's own
value (an int, or a tuple such as Tucker-2's (r_out, r_in)); the allocation's options carry it as
(method, rank), `Factors.rank` is the rank the fit realised, and only reports and cache keys turn it
into a text label (`Method.rank_label`).

A plan with new factor values keeps its `structure` (layer, method, rank per choice): the runner
(tnopt/runner.py) can run it on an already built session without exporting the model again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from tnopt.analyze import Layer
from tnopt.passes import METHODS, Factors


@dataclass(frozen=True)
class Choice:
    """One layer's rewrite: which method, at which rank, with which (already computed) factors."""

    layer: Layer
    method: str
    factors: Factors

    @property
    def rank(self):
        return self.factors.rank

    @property
    def rank_label(self) -> str:
        return METHODS[self.method].rank_label(self.factors.rank)

    def with_factors(self, factors: Factors) -> Choice:
        return Choice(self.layer, self.method, factors)


@dataclass(frozen=True)
class Plan:
    """An ordered set of choices, at most one per layer (what the runner runs and exports)."""

    choices: tuple[Choice, ...] = ()

    @staticmethod
    def of(choices: Plan | Iterable[Choice]) -> Plan:
        return choices if isinstance(choices, Plan) else Plan(tuple(choices))

    def __iter__(self) -> Iterator[Choice]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    @property
    def structure(self) -> tuple:
        """(layer, method, rank) per choice: what an exported graph depends on besides factor values."""
        return tuple((c.layer.name, c.method, _hashable(c.rank)) for c in self.choices)

    def replaced(self, choice: Choice) -> Plan:
        """This plan with `choice` in place of the same layer's choice (appended if absent)."""
        others = [c for c in self.choices if c.layer.name != choice.layer.name]
        if len(others) == len(self.choices):
            return Plan(self.choices + (choice,))
        return Plan(tuple(choice if c.layer.name == choice.layer.name else c for c in self.choices))


def _hashable(rank):
    return tuple(rank) if isinstance(rank, (list, tuple)) else rank
