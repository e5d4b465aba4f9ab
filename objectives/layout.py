"""How an objective lays out a prompt: the rows generation and scoring start from.

Each objective owns its layout (DESIGN.md section 4): the same token types,
delimiters and attention kinds its examples use, so a model is asked the way it was
trained. Generation (`pretrain.generate`) knows three modes and asks the leaves of a
run's objectives which they offer:

  continue  next-token continuation of a text (a causal LM)
  seq2seq   a target generated left to right from a PREFIX source (UniLM seq2seq,
            MASS, prefix LM, BART's reconstruction, T5's span corruption)
  fill      [MASK] positions filled: in one bidirectional pass (`fill_row`: MLM,
            UniLM's bidirectional mode), or by generating the spans and splicing them
            back (`splice`: T5's span corruption)

Pure NumPy, no model knowledge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MODES = ("continue", "seq2seq", "fill")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One row's prefill and how its generation continues.

    Attributes:
      inputs, positions, attention_kind, token_types: int32 [n], the prefill.
      next_position: the position of the first generated token.
      target_type: the token type of generated tokens.
      cloze: whether each new token is predicted at a [MASK] slot at its own
        position (UniLM) rather than from the previous token (next-token).
      max_new_tokens: the most tokens this row generates.
    """

    inputs: np.ndarray
    positions: np.ndarray
    attention_kind: np.ndarray
    token_types: np.ndarray
    next_position: int
    target_type: int
    cloze: bool
    max_new_tokens: int

    def __len__(self) -> int:
        return len(self.inputs)


def row(parts: Sequence[tuple[Sequence[int], int, int]], positions: Sequence[int] | None = None
        ) -> dict[str, np.ndarray]:
    """Concatenates (tokens, attention kind, token type) parts into one row's arrays;
    positions default to 0..n-1."""
    inputs = np.concatenate([np.asarray(tokens, np.int32) for tokens, _, _ in parts])
    kinds = np.concatenate([np.full(len(tokens), kind, np.int32) for tokens, kind, _ in parts])
    types = np.concatenate([np.full(len(tokens), kind_type, np.int32) for tokens, _, kind_type in parts])
    positions = np.arange(len(inputs), dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
    return dict(inputs=inputs, positions=positions, attention_kind=kinds, token_types=types)


def prompt(parts: Sequence[tuple[Sequence[int], int, int]], *, target_type: int, max_new_tokens: int,
           cloze: bool = False, next_position: int | None = None, positions: Sequence[int] | None = None) -> Prompt:
    """A Prompt of `parts` (see `row`); the first generated token sits right after them
    unless `next_position` says otherwise."""
    fields = row(parts, positions)
    start = len(fields["inputs"]) if next_position is None else next_position
    return Prompt(**fields, next_position=start, target_type=target_type, cloze=cloze, max_new_tokens=max_new_tokens)
