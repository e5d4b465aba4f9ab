"""Loss terms: what an objective trains beyond its tokens' vocabulary loss.

Every objective trains the token loss (`targets` where `weights` > 0, through the
vocabulary head). An objective that trains more declares `LossTerm`s: the model head
each needs (by its name in `pretrain.heads`), the per-token fields of the packed batch
it reads, and so its denominator. Examples carry those fields in `Example.extras`; the
packer gives every row every field a mixture's terms declare, with the term's fill
value where an example has none; the step sums each term over the global batch and
divides by the term's own global count. Nothing outside `objectives/` and the head a
term names knows what a term means, so a new auxiliary loss is an objective change
plus, at most, a new head.

A term is taken at the positions where its first field differs from that field's
fill value, and its denominator is the number of such positions in the global batch
(BERT's NSP: one labelled position per sentence pair; SpanBERT's SBO: the masked
tokens of spans with both boundaries in the example).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One auxiliary loss an objective declares.

    Attributes:
      name: the metrics key (`loss/<name>`, `accuracy/<name>`) and the key of its
        global denominator; every objective declaring a term of this name must
        declare the same term.
      head: the model head it trains, a name `pretrain.heads` registers.
      fields: (packed field, fill value) pairs of the int32 per-token fields it reads;
        the first marks where the term is taken (see the module docstring).
      weight: its coefficient in the summed loss.
    """

    name: str
    head: str
    fields: tuple[tuple[str, int], ...]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError(f"loss term {self.name!r} reads no field; its first field marks where it is taken")

    @property
    def marker(self) -> tuple[str, int]:
        """(field, fill) whose non-fill positions carry this term."""
        return self.fields[0]

    def empty(self, length: int) -> dict[str, np.ndarray]:
        """Its fields for `length` tokens that do not take it."""
        return {name: np.full(length, fill, np.int32) for name, fill in self.fields}


# A random number a term carries to the step (ELECTRA's generator samples with it) is drawn on the host, where
# every other random choice of an example is made: the pipeline's determinism then covers it, a resumed run draws
# the same, and the step needs no random key. It travels as an int32 field, 1..DRAW_LEVELS (0 stays the fill).
DRAW_LEVELS = 1 << 24


def uniform_draws(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` int32 draws, uniform over 1..DRAW_LEVELS (see `as_uniform`)."""
    return rng.integers(1, DRAW_LEVELS + 1, size=count, dtype=np.int64).astype(np.int32)


def as_uniform(draws):
    """The uniform number in (0, 1) each draw stands for: the midpoint of its level.
    NumPy or JAX arrays alike."""
    return (draws - 0.5) / DRAW_LEVELS


def merged_terms(declared: Iterable[LossTerm]) -> tuple[LossTerm, ...]:
    """Each term once, in first-declared order; two different terms of one name, or two
    terms that give one field different fill values, are refused."""
    terms: dict[str, LossTerm] = {}
    fills: dict[str, tuple[int, str]] = {}
    for term in declared:
        if terms.setdefault(term.name, term) != term:
            raise ValueError(f"objectives declare two different loss terms named {term.name!r}: "
                             f"{terms[term.name]} and {term}; give them different names")
        for field, fill in term.fields:
            known = fills.setdefault(field, (fill, term.name))
            if known[0] != fill:
                raise ValueError(f"loss terms {known[1]!r} and {term.name!r} fill field {field!r} with "
                                 f"{known[0]} and {fill}; a field has one fill value")
    return tuple(terms.values())


def term_fields(terms: Iterable[LossTerm]) -> dict[str, int]:
    """Every field the terms read, with its fill value: what the packer adds to rows."""
    return {field: fill for term in terms for field, fill in term.fields}


def check_extras(extras: Mapping[str, np.ndarray], terms: Iterable[LossTerm], length: int, who: str) -> None:
    """Refuses extras that are not exactly the declared terms' fields, each `length` long."""
    wanted = term_fields(terms)
    if set(extras) != set(wanted):
        raise ValueError(f"{who} writes fields {sorted(extras)} but its loss terms declare {sorted(wanted)}")
    for name, values in extras.items():
        if values.shape != (length,):
            raise ValueError(f"{who}: field {name!r} has shape {values.shape}, not ({length},)")
