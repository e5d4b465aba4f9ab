"""GPT causal language modelling over contiguous windows of a document.

A document longer than a row is cut into chunks, and each chunk's window continues
the previous one: `[BOS]` opens only the document's first window, and a window's
last token predicts the document's next token (the next window's first), so every
token of the document is predicted exactly once and `[EOS]` is a target only where
the document ends. A one-chunk document is `[BOS] text [EOS]`: inputs `[BOS] text`,
targets `text [EOS]`. Every position is weighted, every token is L2R. Windows do
not attend across chunks (each is its own example); GPT's windows also run across
document boundaries, which the attention rule here never does (README deviations).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from objectives import layout
from objectives.example import L2R, Example, TextChunk, make_example
from objectives.layout import Prompt
from objectives.registry import Objective, register
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class CLMConfig:
    """Causal LM has no settings of its own; the dataclass keeps the registry uniform."""


class CausalLM(Objective):
    """Next-token prediction over contiguous windows of a document (see module docstring)."""

    attention_kinds = frozenset({L2R})
    special_tokens = frozenset({"[BOS]", "[EOS]"})

    def generation_modes(self) -> tuple[str, ...]:
        return ("continue",)

    def prompt(self, mode: str, tokens: np.ndarray, max_new_tokens: int) -> Prompt:
        """`[BOS] tokens`, all L2R, type 0: continuation by next-token prediction."""
        if mode != "continue":
            return super().prompt(mode, tokens, max_new_tokens)
        return layout.prompt([([self.vocab.bos, *tokens], L2R, 0)], target_type=0, max_new_tokens=max_new_tokens)

    def text_budget(self, seq_len: int) -> int:
        return seq_len - 1

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        del rng  # deterministic
        opening = [self.vocab.bos] if chunk.at_document_start else []
        closing = [self.vocab.eos] if chunk.next_token is None else [chunk.next_token]
        sequence = np.concatenate([opening, chunk.tokens, closing]).astype(np.int32)
        length = len(sequence) - 1
        return make_example(
            inputs=sequence[:-1],
            targets=sequence[1:],
            weights=np.ones(length, np.float32),
            positions=np.arange(length),
            attention_kind=L2R,
            token_types=0,
            objective_id=self.objective_id,
        )


@register("clm", CLMConfig)
def build_clm(config: CLMConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    del config
    return [(CausalLM("clm", first_id, vocab), 1.0)]
