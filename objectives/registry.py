"""Objectives by name: the base class, the registry and config handling.

An objective is registered once, with a frozen dataclass of its settings, and a
builder that returns one or more *leaf* objectives with relative rates (UniLM
returns its four modes). Configs name objectives by string; `mixture.build_mixture`
turns `{'mlm': 0.5, 'unilm': 0.5}` into numbered leaves.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from objectives.example import Example, TextChunk
from objectives.layout import Prompt
from objectives.terms import LossTerm, check_extras
from objectives.vocab import Vocabulary


class Objective(abc.ABC):
    """A leaf objective: turns one `TextChunk` into one `Example`, and owns its layout.

    Attributes:
      name: the name metrics are reported under (e.g. 'mlm', 'unilm/seq2seq').
      objective_id: index of this leaf in its mixture, written into every example.
      needs_other_document: whether chunks must carry `other_document` (NSP negatives).
      min_text_tokens: the shortest chunk this objective can use.
      whole_sentences: whether chunks start at a sentence start and end at a sentence
        end (sentence pairs, as BERT's NSP builds them) rather than at the token budget.
      attention_kinds: the attention kinds its examples use (the contract tests check
        every example against it; kernels that need key ranges read it).
      token_types: the token types its examples use (checked against the model's
        `num_token_types` before training).
      loss_terms: the losses it trains beside the token loss (`objectives.terms`); its
        examples carry exactly their fields in `extras`.
      held_out_term: the loss term whose loss and accuracy score a model under this
        objective on held-out text (`pretrain.evaluate`); None (the default): its token
        loss. An objective that predicts no tokens through the body (ELECTRA) names one.
      special_tokens: the named special tokens its examples and prompts use ('[MASK]',
        '[BOS]', ...); building it against a vocabulary without one of them is refused
        with one message naming the objective and the token.

    Layout for generation and scoring (`objectives.layout`): `generation_modes()`
    names the modes it offers; `prompt(mode, tokens, max_new_tokens)` lays out a
    prompt for left-to-right decoding; `fill_row(tokens)` lays out a one-pass [MASK]
    fill; `splice(tokens, generated)` turns generated spans back into filled text.
    """

    name: str
    needs_other_document: bool = False
    min_text_tokens: int = 1
    whole_sentences: bool = False
    attention_kinds: frozenset[int] = frozenset()
    token_types: frozenset[int] = frozenset({0})
    loss_terms: tuple[LossTerm, ...] = ()
    held_out_term: str | None = None
    special_tokens: frozenset[str] = frozenset()

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary):
        self.name = name
        self.objective_id = objective_id
        self.vocab = vocab
        for token in sorted(self.special_tokens):
            vocab.token(token, needed_by=f"objective {name!r}")

    @abc.abstractmethod
    def text_budget(self, seq_len: int) -> int:
        """The most text tokens a chunk may hold so that its example fits `seq_len`."""

    @abc.abstractmethod
    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        """The example for `chunk`; all randomness comes from `rng`."""

    def __call__(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        if len(chunk) < self.min_text_tokens:
            raise ValueError(
                f"objective {self.name!r} needs at least {self.min_text_tokens} text tokens, "
                f"got a chunk of {len(chunk)}"
            )
        if self.needs_other_document and chunk.other_document is None:
            raise ValueError(
                f"objective {self.name!r} draws negatives from another document and needs chunks with "
                "other_document set"
            )
        example = self.make_example(chunk, rng)
        check_extras(example.extras, self.loss_terms, len(example), f"objective {self.name!r}")
        return example

    def generation_modes(self) -> tuple[str, ...]:
        """The generation modes (`objectives.layout.MODES`) this objective's layout offers."""
        return ()

    def prompt(self, mode: str, tokens: np.ndarray, max_new_tokens: int) -> Prompt:
        """The prefill of `tokens` for left-to-right generation in `mode`."""
        raise ValueError(f"objective {self.name!r} offers no {mode!r} generation; it offers "
                         f"{', '.join(self.generation_modes()) or 'none'}")

    def fill_row(self, tokens: np.ndarray) -> dict[str, np.ndarray] | None:
        """The row of a one-pass [MASK] fill of `tokens` (None: this layout fills by
        generating, see `splice`, or not at all)."""
        return None

    def splice(self, tokens: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """`tokens` with its [MASK]s replaced by what generation in mode 'fill' produced."""
        raise ValueError(f"objective {self.name!r} does not fill by generating")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, objective_id={self.objective_id})"


# The objective each Hugging Face architecture this project imports was pretrained with
# (BERT: masked LM; GPT-2: causal LM): the layout an imported model's task rows take and
# its auxiliary loss (`pretrain.transfer`).
ARCHITECTURE_OBJECTIVES = {"bert": "mlm", "gpt2": "clm"}

# A builder returns (leaf objective, relative rate) pairs, numbering leaves from first_id.
Builder = Callable[[Any, Vocabulary, int], list[tuple[Objective, float]]]


@dataclasses.dataclass(frozen=True)
class Registration:
    name: str
    config_class: type
    builder: Builder


_REGISTRY: dict[str, Registration] = {}


def register(name: str, config_class: type) -> Callable[[Builder], Builder]:
    """Decorates a builder so configs can name it `name` with settings `config_class`."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        _REGISTRY[name] = Registration(name, config_class, builder)
        return builder

    return decorate


def registered_names() -> tuple[str, ...]:
    """Every objective name a config may use, sorted."""
    return tuple(sorted(_REGISTRY))


def lookup(name: str) -> Registration:
    """The registration of `name`, or a message listing the known names."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown objective {name!r}; known objectives: {', '.join(registered_names())}"
        )
    return _REGISTRY[name]


def default_settings(name: str) -> dict[str, Any]:
    """The default settings of objective `name` as a plain dict (for config files)."""
    return dataclasses.asdict(lookup(name).config_class())


def make_settings(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The settings dataclass of `name` with `overrides` applied; an unknown field
    is an error naming it and the valid fields."""
    config_class = lookup(name).config_class
    overrides = dict(overrides or {})
    valid = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"objective {name!r} has no setting {', '.join(map(repr, unknown))}; "
            f"valid settings: {', '.join(sorted(valid))}"
        )
    return config_class(**overrides)
