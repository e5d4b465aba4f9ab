"""The example contract shared by every objective, the packer and the model.

An objective turns a chunk of text tokens into an `Example`: parallel arrays of
one length `n` that say what the model reads (`inputs`), what it must predict
(`targets`, `weights`), where each token sits (`positions`), what it may look at
(`attention_kind`, see `pretrain.attention`) and which embedding type it carries
(`token_types`). The model and the loss see nothing else, so a new objective never
touches the model or the training loop.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import numpy as np


class AttentionKind(enum.IntEnum):
    """How a token takes part in attention inside its own example.

    PREFIX tokens are visible to every token of their example; an L2R token sees
    the PREFIX tokens and the L2R tokens at or before it; an R2L token sees the
    PREFIX tokens and the R2L tokens at or after it. ENCODER_ONLY tokens are PREFIX
    tokens that only PREFIX and ENCODER_ONLY tokens see: a source position the
    decoder part must not read (MASS hides its [MASK]ed source positions so).
    """

    PREFIX = 0
    L2R = 1
    R2L = 2
    ENCODER_ONLY = 3


PREFIX = AttentionKind.PREFIX
L2R = AttentionKind.L2R
R2L = AttentionKind.R2L
ENCODER_ONLY = AttentionKind.ENCODER_ONLY

# The per-token fields of an Example, in the order the packer emits them.
TOKEN_FIELDS = (
    "inputs",
    "targets",
    "weights",
    "positions",
    "attention_kind",
    "token_types",
    "objective_id",
)



@dataclasses.dataclass(frozen=True)
class TextChunk:
    """What an objective is given: a run of text tokens from one document.

    Attributes:
      tokens: int32 [n] token ids of the text, no special tokens.
      sentence_starts: int32 offsets into `tokens` where a sentence begins; the
        first is 0. Sentence-pair objectives split only at these boundaries
        (or, when the chunk is one sentence, inside it).
      other_document: int32 tokens taken from a different document, the source
        of random second segments for NSP negatives. Only objectives whose
        `needs_other_document` is true read it.
      at_document_start: whether the chunk begins its document.
      next_token: the document's token right after the chunk, None where the chunk
        ends its document. A causal LM reads these two so that its windows continue
        across chunk boundaries and [BOS] / [EOS] mark only real document edges.
    """

    tokens: np.ndarray
    sentence_starts: np.ndarray | None = None
    other_document: np.ndarray | None = None
    at_document_start: bool = True
    next_token: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", np.asarray(self.tokens, dtype=np.int32))
        starts = self.sentence_starts
        starts = np.zeros(1, np.int32) if starts is None else np.asarray(starts, np.int32)
        object.__setattr__(self, "sentence_starts", starts)
        if self.other_document is not None:
            object.__setattr__(
                self, "other_document", np.asarray(self.other_document, np.int32)
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: parallel arrays of length n (see module docstring).

    `extras` holds the int32 per-token fields its objective's loss terms read
    (`objectives.terms`), also of length n; empty for an objective without terms.
    """

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    attention_kind: np.ndarray
    token_types: np.ndarray
    objective_id: np.ndarray
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in TOKEN_FIELDS:
            dtype = np.float32 if name == "weights" else np.int32
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        object.__setattr__(self, "extras", {name: np.asarray(values, np.int32) for name, values in self.extras.items()})
        lengths = {name: getattr(self, name).shape for name in TOKEN_FIELDS}
        lengths.update({f"extras[{name!r}]": values.shape for name, values in self.extras.items()})
        if len(set(lengths.values())) != 1 or len(self.inputs.shape) != 1:
            raise ValueError(f"Example fields must be 1-D arrays of one length, got {lengths}")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def fields(self) -> dict[str, np.ndarray]:
        """The per-token arrays by name, its extras included."""
        return {**{name: getattr(self, name) for name in TOKEN_FIELDS}, **self.extras}


def make_example(
    *,
    inputs: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    positions: np.ndarray,
    attention_kind: np.ndarray | int,
    token_types: np.ndarray | int,
    objective_id: int,
    extras: Mapping[str, np.ndarray] | None = None,
) -> Example:
    """Builds an Example, broadcasting scalar kinds, token types and the objective id."""
    n = len(inputs)
    return Example(
        inputs=inputs,
        targets=targets,
        weights=weights,
        positions=positions,
        attention_kind=np.broadcast_to(np.asarray(attention_kind, np.int32), (n,)),
        token_types=np.broadcast_to(np.asarray(token_types, np.int32), (n,)),
        objective_id=np.full((n,), objective_id, np.int32),
        extras=extras or {},
    )


def source_target_example(source: np.ndarray, target: np.ndarray, start: int, objective_id: int) -> Example:
    """An encoder-decoder example in one row: `source` (PREFIX, type 0, no loss), then the
    decoder reading `start` followed by `target[:-1]` and predicting `target` (L2R, type
    1, every target token weighted), positions running on from the source's. T5's span
    corruption and BART lay out their rows this way."""
    m, t = len(source), len(target)
    return make_example(
        inputs=np.concatenate([source, [start], target[:-1]]).astype(np.int32),
        targets=np.concatenate([np.zeros(m, np.int32), target]).astype(np.int32),
        weights=np.concatenate([np.zeros(m, np.float32), np.ones(t, np.float32)]),
        positions=np.arange(m + t),
        attention_kind=np.concatenate([np.full(m, PREFIX), np.full(t, L2R)]),
        token_types=np.concatenate([np.zeros(m, np.int32), np.ones(t, np.int32)]),
        objective_id=objective_id,
    )
