"""What objectives need to know about the vocabulary: its size and its special ids.

The special tokens have fixed ids in every tokenizer this project trains or accepts
(`pretrain.tokenizer` validates a user's model against them), so objectives can
build `[CLS] A [SEP] B [SEP]` without a tokenizer in hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2  # also UniLM's [SOS]
EOS_ID = 3
CLS_ID = 4
SEP_ID = 5
MASK_ID = 6

SPECIAL_TOKENS: dict[str, int] = {
    "[PAD]": PAD_ID,
    "[UNK]": UNK_ID,
    "[BOS]": BOS_ID,
    "[EOS]": EOS_ID,
    "[CLS]": CLS_ID,
    "[SEP]": SEP_ID,
    "[MASK]": MASK_ID,
}
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Vocabulary facts objectives use.

    Attributes:
      size: number of token ids; ids are 0..size-1.
      word_start: optional bool [size]; True where a piece begins a word (a
        SentencePiece piece starting with the word-boundary mark). Whole-word
        masking needs it.
      extra_special_ids: ids beyond the fixed seven that must never be masked or
        drawn as random replacements (e.g. user-defined control symbols).
    """

    size: int
    word_start: np.ndarray | None = None
    extra_special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.size <= NUM_SPECIAL_TOKENS:
            raise ValueError(
                f"vocabulary size {self.size} leaves no ordinary tokens: it must exceed "
                f"the {NUM_SPECIAL_TOKENS} special tokens {list(SPECIAL_TOKENS)}"
            )
        if self.word_start is not None:
            word_start = np.asarray(self.word_start, dtype=bool)
            if word_start.shape != (self.size,):
                raise ValueError(
                    f"word_start has shape {word_start.shape}, expected ({self.size},)"
                )
            object.__setattr__(self, "word_start", word_start)
        special = np.zeros(self.size, dtype=bool)
        special[list(SPECIAL_TOKENS.values())] = True
        special[list(self.extra_special_ids)] = True
        object.__setattr__(self, "_special", special)
        object.__setattr__(self, "_ordinary_ids", np.flatnonzero(~special).astype(np.int32))

    def is_special(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the special ids among `ids`."""
        return self._special[np.asarray(ids)]

    @property
    def ordinary_ids(self) -> np.ndarray:
        """Every id that is not special: the pool for random replacements."""
        return self._ordinary_ids
