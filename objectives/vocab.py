"""What objectives know about the vocabulary: its size and its special tokens, by name.

Objectives never use a special id as a constant; they ask the vocabulary
(`vocab.bos`, `vocab.mask`, `vocab.sentinel(i)`, `vocab.token('[NLU]', ...)`), so a
vocabulary with other ids (an imported tokenizer) works the same. This project's
tokenizers put the seven fixed tokens at ids 0-6 (`SPECIAL_TOKENS`), UniLM-2's and
UL2's paradigm tokens after them, then T5's sentinels `[S0]`, `[S1]`, ...
(`reserved_tokens`). A tokenizer trained before sentinels existed simply lacks them:
it still loads, and an objective that needs a sentinel says so and how to fix it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

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
PARADIGM_TOKENS = ("[NLU]", "[NLG]", "[S2S]")  # UL2's mode-switching tokens
DEFAULT_SENTINELS = 100  # T5's extra ids


def sentinel_name(index: int) -> str:
    return f"[S{index}]"


def reserved_tokens(sentinels: int = DEFAULT_SENTINELS) -> dict[str, int]:
    """Every special token of this project's tokenizers, by name, at its id: the seven
    fixed ones, the paradigm tokens, then `sentinels` sentinels."""
    names = [*SPECIAL_TOKENS, *PARADIGM_TOKENS, *(sentinel_name(i) for i in range(sentinels))]
    return {name: index for index, name in enumerate(names)}


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Vocabulary facts objectives use.

    Attributes:
      size: number of token ids; ids are 0..size-1.
      word_start: optional bool [size]; True where a piece begins a word (a
        SentencePiece piece starting with the word-boundary mark). Whole-word
        masking needs it.
      extra_special_ids: further ids that must never be masked or drawn as random
        replacements (e.g. user-defined control symbols).
      tokens: the special tokens by name ('[BOS]', '[S0]', ...) and their ids; by
        default the seven fixed ones. Only [PAD] is required: an imported tokenizer may
        lack others (GPT-2 has no [MASK]), and an objective that needs a missing one is
        refused when it is built (`Objective.special_tokens`).
    """

    size: int
    word_start: np.ndarray | None = None
    extra_special_ids: tuple[int, ...] = ()
    tokens: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(SPECIAL_TOKENS))

    def __post_init__(self) -> None:
        if "[PAD]" not in self.tokens:
            raise ValueError("a vocabulary needs a [PAD] token (the id padding takes); name one in `tokens`")
        if self.size <= len(self.tokens) or max(self.tokens.values()) >= self.size:
            raise ValueError(
                f"vocabulary size {self.size} leaves no ordinary tokens: it must exceed "
                f"the {len(self.tokens)} special tokens {list(self.tokens)[:8]}..."
            )
        if self.word_start is not None:
            word_start = np.asarray(self.word_start, dtype=bool)
            if word_start.shape != (self.size,):
                raise ValueError(
                    f"word_start has shape {word_start.shape}, expected ({self.size},)"
                )
            object.__setattr__(self, "word_start", word_start)
        special = np.zeros(self.size, dtype=bool)
        special[list(self.tokens.values())] = True
        special[list(self.extra_special_ids)] = True
        object.__setattr__(self, "tokens", dict(self.tokens))
        object.__setattr__(self, "_special", special)
        object.__setattr__(self, "_ordinary_ids", np.flatnonzero(~special).astype(np.int32))
        sentinels = []
        while sentinel_name(len(sentinels)) in self.tokens:
            sentinels.append(self.tokens[sentinel_name(len(sentinels))])
        object.__setattr__(self, "_sentinels", tuple(sentinels))

    @classmethod
    def reserved(cls, size: int, sentinels: int = DEFAULT_SENTINELS, **kwargs) -> Vocabulary:
        """A vocabulary laid out as this project's tokenizers are (`reserved_tokens`)."""
        return cls(size, tokens=reserved_tokens(sentinels), **kwargs)

    def is_special(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the special ids among `ids`."""
        return self._special[np.asarray(ids)]

    @property
    def ordinary_ids(self) -> np.ndarray:
        """Every id that is not special: the pool for random replacements."""
        return self._ordinary_ids

    def token(self, name: str, needed_by: str = "") -> int:
        """The id of special token `name`; a clear error when the vocabulary lacks it."""
        if name not in self.tokens:
            who = f"{needed_by} needs it" if needed_by else "it is needed"
            raise ValueError(f"the tokenizer has no {name} token and {who}: train a new tokenizer (a new workdir, or "
                             "pretrain.tokenizer.train_tokenizer), which reserves the paradigm tokens and "
                             f"config.tokenizer.sentinels sentinels, or choose another objective")
        return self.tokens[name]

    @property
    def pad(self) -> int:
        return self.tokens["[PAD]"]

    @property
    def bos(self) -> int:
        return self.token("[BOS]")

    @property
    def eos(self) -> int:
        return self.token("[EOS]")

    @property
    def cls(self) -> int:
        return self.token("[CLS]")

    @property
    def sep(self) -> int:
        return self.token("[SEP]")

    @property
    def mask(self) -> int:
        return self.token("[MASK]")

    @property
    def sentinels(self) -> tuple[int, ...]:
        """The sentinel ids [S0], [S1], ... the vocabulary has, in order."""
        return self._sentinels

    def sentinel(self, index: int, needed_by: str = "") -> int:
        """The id of sentinel `index`; a clear error when there are not that many."""
        if index >= len(self._sentinels):
            if not self._sentinels:
                self.token(sentinel_name(0), needed_by)
            raise ValueError(f"{needed_by or 'an example'} needs sentinel {sentinel_name(index)} but the tokenizer has "
                             f"only {len(self._sentinels)} sentinels; train a tokenizer with more "
                             "(config.tokenizer.sentinels) or use shorter rows")
        return self._sentinels[index]
