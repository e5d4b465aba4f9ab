"""A `transformers` checkpoint's own tokenizer behind this project's tokenizer interface.

A BERT directory brings a WordPiece `tokenizer.json`, a GPT-2 directory a byte-level
BPE one; both load through `tokenizers` (no transformers needed). Encoding adds no
special tokens (objectives add them), as `pretrain.tokenizer.Tokenizer.encode` does.

The vocabulary maps this project's special-token roles onto the tokenizer's own
tokens, from `tokenizer_config.json` (or the usual names when it is absent):
  BERT   [PAD] [UNK] [CLS] [SEP] [MASK] as themselves; [BOS] is [CLS] and [EOS] is
         [SEP], as UniLM's code does when it starts from BERT;
  GPT-2  <|endoftext|> is [BOS], [EOS] and [PAD]; there is no [CLS], [SEP] or [MASK],
         so objectives that need them are refused, naming the objective and the token.
Word starts (whole-word masking) are pieces not starting with `##` (WordPiece) or
starting with `Ġ` (byte-level BPE).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from objectives.vocab import Vocabulary

FILENAME = "tokenizer.json"
CONFIG_FILENAME = "tokenizer_config.json"
# this project's role -> tokenizer_config.json field
ROLE_FIELDS = {"[PAD]": "pad_token", "[UNK]": "unk_token", "[CLS]": "cls_token", "[SEP]": "sep_token",
               "[MASK]": "mask_token", "[BOS]": "bos_token", "[EOS]": "eos_token"}
STAND_INS = {"[BOS]": "[CLS]", "[EOS]": "[SEP]", "[PAD]": "[EOS]"}  # a missing role takes this role's token


def ensure_imported(workdir: str | os.PathLike, directory: str) -> ImportedTokenizer:
    """The run's copy of a Hugging Face model's tokenizer (`workdir/tokenizer.json`, and
    its `tokenizer_config.json`), made on the first start and kept: a resumed run must
    keep the tokenizer it started with."""
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(os.fspath(workdir), FILENAME)
    source = os.path.join(directory, FILENAME)
    with open(source, "rb") as handle:
        wanted = handle.read()
    if os.path.exists(target):
        with open(target, "rb") as handle:
            if handle.read() != wanted:
                raise ValueError(f"{target} differs from {source}: a run keeps the tokenizer it started with; resume "
                                 "with the same config.init.hf, or use a new workdir")
        return ImportedTokenizer(target)
    for name in (CONFIG_FILENAME, FILENAME):  # the tokenizer file last: its presence marks a complete copy
        if os.path.isfile(os.path.join(directory, name)):
            temporary = os.path.join(os.fspath(workdir), name + ".tmp")
            shutil.copyfile(os.path.join(directory, name), temporary)
            os.replace(temporary, os.path.join(os.fspath(workdir), name))
    return ImportedTokenizer(target)


class ImportedTokenizer:
    """A `tokenizer.json` with the interface of `pretrain.tokenizer.Tokenizer`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = os.fspath(path)
        if not os.path.isfile(self._path):
            raise FileNotFoundError(f"{self._path} is missing: a Hugging Face model directory needs its tokenizer.json "
                                    "(save the tokenizer with save_pretrained into the same directory)")
        self._tokenizer = HFTokenizer.from_file(self._path)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._pieces = [self._tokenizer.id_to_token(i) or "" for i in range(self._size)]
        added = self._tokenizer.get_added_tokens_decoder()
        self._special = np.zeros(self._size, bool)
        self._special[[index for index, token in added.items() if token.special]] = True
        self._roles = self._read_roles(os.path.join(os.path.dirname(self._path), CONFIG_FILENAME))
        self._special[list(self._roles.values())] = True
        wordpiece = any(piece.startswith("##") for piece in self._pieces)
        starts = [not piece.startswith("##") if wordpiece else piece.startswith("Ġ") for piece in self._pieces]
        self._word_start = np.asarray(starts, bool) & ~self._special

    def _read_roles(self, config_path: str) -> dict[str, int]:
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        roles = {}
        for role, field in ROLE_FIELDS.items():
            value = config.get(field)
            name = value.get("content") if isinstance(value, dict) else value
            name = name or (role if role in vocab else None)
            if name is not None and name in vocab:
                roles[role] = vocab[name]
        for role, stand_in in STAND_INS.items():
            if role not in roles and stand_in in roles:
                roles[role] = roles[stand_in]
        if "[PAD]" not in roles:
            raise ValueError(f"{self._path}: the tokenizer names no padding, end or separator token; set pad_token in "
                             "its tokenizer_config.json")
        return roles

    @property
    def path(self) -> str:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._size

    def piece(self, token_id: int) -> str:
        return self._pieces[int(token_id)]

    def encode(self, text: str) -> np.ndarray:
        """int32 [n] ids of `text`, with no special tokens added."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tokenizer.encode_batch(list(texts),
                                                                                 add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of a 1-D id sequence; special ids are dropped."""
        ids = np.asarray(ids, np.int64)
        return self._tokenizer.decode(ids[~self._special[ids]].tolist(), skip_special_tokens=True)

    def vocabulary(self) -> Vocabulary:
        """The facts objectives need, with this project's roles mapped onto the
        tokenizer's own tokens (module docstring)."""
        extra = tuple(int(i) for i in np.flatnonzero(self._special) if int(i) not in self._roles.values())
        return Vocabulary(size=self._size, word_start=self._word_start.copy(), extra_special_ids=extra,
                          tokens=dict(self._roles))

    def __repr__(self) -> str:
        return f"ImportedTokenizer({self._path!r}, vocab_size={self._size})"
