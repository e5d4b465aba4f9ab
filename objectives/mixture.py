"""Mixtures: any objectives, each with a rate, sampled per example.

`build_mixture({'mlm': 1, 'unilm': 1}, vocab)` flattens every registered objective
into its leaves (UniLM gives four), numbers them (the `objective_id` written into
examples and used for per-objective metrics) and samples one leaf per example.
A single objective is a mixture of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from objectives.example import Example, TextChunk
from objectives.registry import Objective, lookup, make_settings
from objectives.terms import LossTerm, merged_terms, term_fields
from objectives.vocab import Vocabulary


class Mixture:
    """Leaf objectives with normalised rates; `objectives[i].objective_id == i`."""

    def __init__(self, leaves: list[tuple[Objective, float]]):
        if not leaves:
            raise ValueError("a mixture needs at least one objective")
        for index, (objective, rate) in enumerate(leaves):
            if objective.objective_id != index:
                raise ValueError(f"{objective!r} is leaf {index} but has objective_id "
                                 f"{objective.objective_id}")
            if not rate > 0:
                raise ValueError(f"objective {objective.name!r} has rate {rate}; rates must be > 0")
        self.objectives: tuple[Objective, ...] = tuple(objective for objective, _ in leaves)
        total = float(sum(rate for _, rate in leaves))
        self.rates = np.asarray([rate / total for _, rate in leaves], np.float64)
        self._cumulative = np.cumsum(self.rates)
        self._cumulative[-1] = 1.0
        self._loss_terms = merged_terms(term for objective in self.objectives for term in objective.loss_terms)

    @property
    def names(self) -> tuple[str, ...]:
        """Leaf names by objective id, the keys of per-objective metrics."""
        return tuple(objective.name for objective in self.objectives)

    @property
    def needs_other_document(self) -> bool:
        return any(objective.needs_other_document for objective in self.objectives)

    @property
    def loss_terms(self) -> tuple[LossTerm, ...]:
        """The loss terms its leaves declare, each once (`objectives.terms.merged_terms`)."""
        return self._loss_terms

    @property
    def term_fields(self) -> dict[str, int]:
        """The per-token fields its loss terms read, with fill values: what packing adds."""
        return term_fields(self.loss_terms)

    @property
    def attention_kinds(self) -> frozenset[int]:
        """Every attention kind the leaves' examples use (which attention path can run them)."""
        return frozenset().union(*(objective.attention_kinds for objective in self.objectives))

    def choose(self, rng: np.random.Generator) -> Objective:
        """One leaf drawn with the mixture's rates (one uniform draw from `rng`)."""
        index = int(np.searchsorted(self._cumulative, rng.random(), side="right"))
        return self.objectives[min(index, len(self.objectives) - 1)]

    def __call__(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        """Draws a leaf, then its example (for callers that size chunks themselves)."""
        return self.choose(rng)(chunk, rng)

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {rate:.4g}" for name, rate in zip(self.names, self.rates))
        return f"Mixture({parts})"


def parse_mixture_spec(spec: str | Mapping[str, float]) -> dict[str, float]:
    """`'mlm'`, `'mlm+clm'` (equal rates) or `'mlm:3,clm:1'` to {name: rate}."""
    if isinstance(spec, Mapping):
        return {str(name): float(rate) for name, rate in spec.items()}
    rates: dict[str, float] = {}
    separator = "," if "," in spec or ":" in spec else "+"
    for part in filter(None, (piece.strip() for piece in spec.split(separator))):
        name, _, rate = part.partition(":")
        if name.strip() in rates:
            raise ValueError(f"objective spec {spec!r} names {name.strip()!r} twice; give each objective once")
        try:
            rates[name.strip()] = float(rate) if rate else 1.0
        except ValueError:
            raise ValueError(
                f"objective spec {spec!r}: rate {rate!r} of {name!r} is not a number; "
                "write e.g. 'mlm:3,clm:1'"
            ) from None
    if not rates:
        raise ValueError(f"objective spec {spec!r} names no objective; write e.g. 'mlm' or 'mlm:1,clm:1'")
    return rates


def build_mixture(
    rates: str | Mapping[str, float],
    vocab: Vocabulary,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> Mixture:
    """The mixture of the named objectives.

    Args:
      rates: objective name to relative rate (or a spec string, see `parse_mixture_spec`).
        A composite objective (UniLM) splits its rate among its leaves by its own rates.
      vocab: the vocabulary facts objectives need.
      settings: objective name to overrides of its settings dataclass.
    """
    rates = parse_mixture_spec(rates)
    settings = dict(settings or {})
    for name in settings:
        lookup(name)  # a misspelt objective key in the settings is an error, not ignored
    leaves: list[tuple[Objective, float]] = []
    for name, rate in rates.items():
        registration = lookup(name)
        if not 0 < rate < float("inf"):
            raise ValueError(f"objective {name!r} has rate {rate}; rates must be finite and > 0")
        built = registration.builder(make_settings(name, settings.get(name)), vocab, len(leaves))
        leaf_total = sum(leaf_rate for _, leaf_rate in built)
        leaves.extend((objective, rate * leaf_rate / leaf_total) for objective, leaf_rate in built)
    return Mixture(leaves)
