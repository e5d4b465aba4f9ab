"""SentencePiece tokenizer with this project's fixed special ids.

    tokenizer = ensure_tokenizer(workdir, lambda: sentences, vocab_size=8000)
    ids = tokenizer.encode("Hello world")      # int32 [n]; no special tokens added
    tokenizer.decode(ids)                      # "Hello world"
    vocab = tokenizer.vocabulary()             # objectives.vocab.Vocabulary

Every model in use holds the special tokens of `objectives.vocab` at their fixed ids
([PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, [CLS]=4, [SEP]=5, [MASK]=6), so objectives need no
tokenizer in hand. [CLS], [SEP] and [MASK] are control symbols: raw text never encodes
to them, so a document containing "[MASK]" cannot fake a mask. `train_tokenizer` makes
such models, `load_tokenizer` refuses others, and a run calls `ensure_tokenizer`.

Training choices, fixed so every run makes the same kind of model:
  * byte fallback (default): characters outside the vocabulary become UTF-8 byte
    pieces, not [UNK], so no text is lost; it costs 256 ids.
  * identity normalization, whitespace kept: `decode(encode(text)) == text` for any
    string, so generations and held-out text compare byte for byte.
  * determinism: same sentences and arguments, byte-identical `.model` anywhere.
    SentencePiece's own sampling draws a different sample in each process even after
    `set_random_generator_seed`, so sampling happens here; training is in memory, as a
    model trained to a file records its name; one thread by default, as the unigram
    result depends on the thread count.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import sentencepiece as spm

from objectives.vocab import (BOS_ID, EOS_ID, NUM_SPECIAL_TOKENS, PAD_ID, PARADIGM_TOKENS,
                              SPECIAL_TOKENS, UNK_ID, Vocabulary, reserved_tokens)
from pretrain.errors import raise_problems

log = logging.getLogger(__name__)

ModelType = Literal["unigram", "bpe"]
MODEL_TYPES: tuple[str, ...] = ("unigram", "bpe")
MODEL_FILENAME = "tokenizer.model"
WORD_BOUNDARY = "\u2581"  # SentencePiece's mark for the space before a word
NUM_BYTE_PIECES = 256
# SentencePiece silently drops training sentences longer than max_sentence_length bytes;
# longer lines are cut (at a space where possible) into pieces of at most this many
# characters, and the byte limit is set to 4 bytes per character so none is dropped.
MAX_SENTENCE_CHARS = 4096

_SPECIAL_FLAGS: dict[str, Any] = dict(  # load_tokenizer checks they give SPECIAL_TOKENS
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_piece="[PAD]",
    unk_piece="[UNK]", bos_piece="[BOS]", eos_piece="[EOS]",
    control_symbols=["[CLS]", "[SEP]", "[MASK]"])


def _control_symbols(sentinels: int) -> list[str]:
    """The control symbols a new tokenizer reserves after its four fixed ids: [CLS],
    [SEP], [MASK], the paradigm tokens and `sentinels` sentinels (objectives.vocab)."""
    return [name for name in reserved_tokens(sentinels) if name not in ("[PAD]", "[UNK]", "[BOS]", "[EOS]")]
_FIX = ("retrain it with pretrain.tokenizer.train_tokenizer (or leave the tokenizer path "
        "unset so the run trains one), or pass these flags to spm_train: "
        + " ".join(f"--{k}={','.join(v) if isinstance(v, list) else v}"
                   for k, v in _SPECIAL_FLAGS.items()))


class Tokenizer:
    """A SentencePiece model whose special tokens sit at this project's fixed ids.

    Made by `train_tokenizer`, `load_tokenizer` or `ensure_tokenizer`, which check the
    special ids that everything downstream relies on. Picklable (data workers).
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: str) -> None:
        self._sp = processor
        self._path = path
        ids = range(processor.get_piece_size())
        self._special = np.array([i < NUM_SPECIAL_TOKENS or processor.is_control(i)
                                  or processor.is_unknown(i) for i in ids], dtype=bool)
        self._word_start = ~self._special & np.array(
            [processor.id_to_piece(i).startswith(WORD_BOUNDARY) for i in ids], dtype=bool)

    @property
    def path(self) -> str:
        """The `.model` file this tokenizer was loaded from or saved to."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of ids; ids are 0..vocab_size-1."""
        return len(self._special)

    @property
    def model_type(self) -> str:
        """'unigram' or 'bpe' (or another SentencePiece type of a user's model)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

    def pieces(self) -> list[tuple[str, float, str]]:
        """(piece, score, kind) of every id in order; kind is 'normal', 'control',
        'unknown', 'byte' or 'unused' (what a converter to another library needs)."""
        sp = self._sp

        def kind(i: int) -> str:
            for name, test in (("unknown", sp.is_unknown), ("control", sp.is_control), ("byte", sp.is_byte),
                               ("unused", sp.is_unused)):
                if test(i):
                    return name
            return "normal"

        return [(sp.id_to_piece(i), float(sp.get_score(i)), kind(i)) for i in range(sp.get_piece_size())]

    def piece(self, token_id: int) -> str:
        """The piece string of `token_id` (e.g. '▁the', '<0xE2>', '[MASK]')."""
        self._check_ids(np.asarray([token_id]))
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str) -> np.ndarray:
        """int32 [n] ids of `text`, with no [BOS]/[EOS] added (objectives add them)."""
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text, encoded by SentencePiece in parallel."""
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of a 1-D id sequence; special ids ([PAD], [MASK], ...) are dropped."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D id sequence, got shape {ids.shape}")
        self._check_ids(ids)
        return self._sp.decode(ids[~self._special[ids]].tolist())

    def vocabulary(self) -> Vocabulary:
        """The facts objectives need: size, word starts, the special tokens this model
        has by name (the fixed seven, and the paradigm tokens and sentinels when it
        reserves them), and any other control ids (built once)."""
        if getattr(self, "_vocabulary", None) is None:
            self._vocabulary = self._make_vocabulary()
        return self._vocabulary

    def _make_vocabulary(self) -> Vocabulary:
        tokens = dict(SPECIAL_TOKENS)
        for name in (*PARADIGM_TOKENS, *(f"[S{i}]" for i in range(self.vocab_size))):
            found = self._sp.piece_to_id(name)
            if self._sp.id_to_piece(found) != name or not self._sp.is_control(found):
                if name.startswith("[S") and name not in PARADIGM_TOKENS:
                    break  # sentinels are consecutive
                continue
            tokens[name] = found
        extra = np.flatnonzero(self._special)
        extra = tuple(int(i) for i in extra if int(i) not in tokens.values())
        return Vocabulary(size=self.vocab_size, word_start=self._word_start.copy(), extra_special_ids=extra,
                          tokens=tokens)

    def _check_ids(self, ids: np.ndarray) -> None:
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range for the "
                             f"{self.vocab_size}-token vocabulary of {self._path}")

    def __repr__(self) -> str:
        return f"Tokenizer({self._path!r}, vocab_size={self.vocab_size})"


def settings_problems(vocab_size: int, model_type: str, byte_fallback: bool = True,
                      sentinels: int = 0) -> list[str]:
    """Why a tokenizer of this size and type cannot be trained (`config.tokenizer`
    fields; the one home of these rules), or nothing."""
    problems = []
    if model_type not in MODEL_TYPES:
        problems.append(f"config.tokenizer.model_type={model_type!r} must be one of {MODEL_TYPES}")
    if not isinstance(sentinels, int) or sentinels < 0:
        problems.append(f"config.tokenizer.sentinels={sentinels!r} must be an integer >= 0 (T5 reserves 100)")
        sentinels = 0
    reserved = len(reserved_tokens(sentinels))
    minimum = reserved + (NUM_BYTE_PIECES if byte_fallback else 0)
    if not isinstance(vocab_size, int) or vocab_size <= minimum:
        pieces = f"{reserved} special tokens" + (f" and {NUM_BYTE_PIECES} byte pieces" if byte_fallback
                                                 else "")
        problems.append(f"config.tokenizer.vocab_size={vocab_size} is too small: it must exceed {minimum} "
                        f"({pieces}); raise it (8000 is the default)")
    return problems


def train_tokenizer(sentences: Iterable[str], model_prefix_path: str | os.PathLike[str],
                    vocab_size: int, model_type: ModelType = "unigram", *,
                    character_coverage: float = 0.9995, byte_fallback: bool = True,
                    max_sentences: int = 2_000_000, seed: int = 0,
                    num_threads: int = 1, sentinels: int = 0) -> Tokenizer:
    """Trains a SentencePiece model and writes `<prefix>.model` and `<prefix>.vocab`.

    Args:
      sentences: training text, one sentence or line per item; blank items are
        skipped, and lines over MAX_SENTENCE_CHARS are cut, never dropped.
      model_prefix_path: output path without extension; directories are created.
      vocab_size: ids in the model, special and byte pieces included; more than the
        text supports is a ValueError naming the most it does.
      model_type: 'unigram' (SentencePiece's default, T5-style) or 'bpe' (GPT-style).
      character_coverage: fraction of characters given their own piece; the rest are
        spelled in bytes (byte_fallback) or become [UNK].
      byte_fallback: spell unknown characters as bytes; needs vocab_size > 263.
      max_sentences: train on a uniform sample (drawn with `seed`) of this many.
      num_threads: the unigram model depends on it; 1 gives the same model anywhere.
      sentinels: T5-style sentinel tokens [S0].. reserved after the paradigm tokens
        (the pretraining config reserves DEFAULT_SENTINELS; 0 here keeps the smallest
        vocabularies usable).

    The files appear atomically (temp file, then rename), so a crash never leaves a
    half-written model; existing files are replaced.
    """
    raise_problems(settings_problems(vocab_size, model_type, byte_fallback, sentinels))
    sample = _reservoir_sample(_training_lines(sentences), max_sentences, seed)
    if not sample:
        raise ValueError("no text to train the tokenizer on: the sentence source gave no "
                         "non-blank sentences; check the data source (path, split, filters)")
    log.info("training a %s SentencePiece tokenizer, vocab_size %d, on %d sentences",
             model_type, vocab_size, len(sample))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            byte_fallback=byte_fallback, num_threads=num_threads,
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            minloglevel=1, **{**_SPECIAL_FLAGS, "control_symbols": _control_symbols(sentinels)})
    except RuntimeError as error:
        raise _explain_training_error(error, vocab_size) from error
    tokenizer = _from_proto(model.getvalue(), os.fspath(model_prefix_path) + ".model")
    _save(tokenizer, model.getvalue())
    return tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a `.model` file, refusing one without this project's special ids.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: the file is not a SentencePiece model, or a special token is
        missing, at another id, or an ordinary piece (the message says how to fix it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer model {path} does not exist or is not a file: give the path of a "
            f"SentencePiece .model file, or leave it unset to train one")
    return _from_proto(_read(path), path)


def load_workdir_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A run's own `tokenizer.model`, with one message when it is damaged: it is
    never retrained over, because the run's checkpoints were trained with it."""
    try:
        return load_tokenizer(path)
    except ValueError as error:
        raise ValueError(
            f"the run's tokenizer {os.fspath(path)} is damaged or not this project's ({str(error).splitlines()[0]}); "
            "its checkpoints were trained with it, so it is not retrained over: restore it from a backup, or start "
            "a new run with another --workdir") from None


def ensure_tokenizer(workdir: str | os.PathLike[str], sentences_fn: Callable[[], Iterable[str]],
                     vocab_size: int, model_type: ModelType = "unigram",
                     user_model_path: str | os.PathLike[str] | None = None,
                     **train_options: Any) -> Tokenizer:
    """The run's tokenizer, kept as `workdir/tokenizer.model` so a resume reuses it.

    A given `user_model_path` is validated and copied there (its own size and type
    win); otherwise an existing `workdir/tokenizer.model` is loaded, never retrained;
    otherwise one is trained on `sentences_fn()` (called only then), with
    `train_options` passed to `train_tokenizer`.
    Hosts sharing a workdir may all call this: training is deterministic and files
    are replaced atomically, so they write the same bytes.
    """
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(os.fspath(workdir), MODEL_FILENAME)
    if user_model_path is not None:
        proto = _read(load_tokenizer(user_model_path).path)
        if os.path.exists(target):
            if _read(target) != proto:
                raise ValueError(
                    f"{target} differs from the given tokenizer {user_model_path}: a run "
                    f"must keep the tokenizer it started with; use a new workdir, or "
                    f"leave the tokenizer path unset to reuse the workdir's")
            return load_tokenizer(target)
        tokenizer = _from_proto(proto, target)
        _save(tokenizer, proto)
        log.info("using tokenizer %s, copied to %s", user_model_path, target)
        return tokenizer
    if os.path.exists(target):
        tokenizer = load_workdir_tokenizer(target)
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(
                f"{target} has {tokenizer.vocab_size} tokens but tokenizer.vocab_size is "
                f"{vocab_size}: a resumed run keeps its tokenizer; restore "
                f"tokenizer.vocab_size={tokenizer.vocab_size} or use a new workdir")
        log.info("reusing tokenizer %s", target)
        return tokenizer
    return train_tokenizer(sentences_fn(), target[: -len(".model")], vocab_size, model_type,
                           **train_options)


def _from_proto(proto: bytes, path: str) -> Tokenizer:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto)
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a SentencePiece model ({error}); expected the binary .model "
            f"file that SentencePiece training writes (not the .vocab text file)") from error
    problems = _special_token_problems(processor)
    if problems:
        raise ValueError(
            f"tokenizer model {path} does not have this project's special tokens:\n  "
            + "\n  ".join(problems) + f"\nTo fix it, {_FIX}")
    return Tokenizer(processor, path)


def _special_token_problems(processor: spm.SentencePieceProcessor) -> list[str]:
    problems = []
    size = processor.get_piece_size()
    for name, expected in SPECIAL_TOKENS.items():
        found = processor.piece_to_id(name)
        if processor.id_to_piece(found) != name:
            holder = repr(processor.id_to_piece(expected)) if expected < size else "nothing"
            problems.append(f"{name} is missing: not found at any id (expected at id "
                            f"{expected}, which holds {holder})")
        elif found != expected:
            problems.append(f"{name} is at id {found}, expected id {expected}")
        elif expected == UNK_ID and not processor.is_unknown(found):
            problems.append(f"{name} is at id {found} but is not the unknown piece")
        elif expected != UNK_ID and not processor.is_control(found):
            problems.append(f"{name} is at id {found} but is not a control symbol, so raw "
                            f"text containing {name!r} would encode to it")
    return problems


def _explain_training_error(error: RuntimeError, vocab_size: int) -> Exception:
    message = str(error)
    if "Vocabulary size too high" in message:
        limit = re.search(r"value <= (\d+)", message)
        supported = f"at most {limit[1]}" if limit else "fewer"
        return ValueError(
            f"tokenizer.vocab_size={vocab_size} is more than the training text supports "
            f"({supported} pieces): lower tokenizer.vocab_size or train on more text")
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if needed:
        return ValueError(
            f"tokenizer.vocab_size={vocab_size} is too small for the training text: its "
            f"characters and the special and byte pieces need at least {needed[1]} ids; "
            f"raise tokenizer.vocab_size or lower character_coverage")
    return error


def _training_lines(sentences: Iterable[str]) -> Iterator[str]:
    for sentence in sentences:
        if not sentence.strip():
            continue
        start, end = 0, len(sentence)
        while end - start > MAX_SENTENCE_CHARS:
            cut = sentence.rfind(" ", start + 1, start + MAX_SENTENCE_CHARS)
            if cut < 0:
                cut = start + MAX_SENTENCE_CHARS
            yield sentence[start:cut]
            start = cut
            while start < end and sentence[start] == " ":
                start += 1
        if start < end:
            yield sentence[start:]


def _reservoir_sample(lines: Iterable[str], size: int, seed: int) -> list[str]:
    """All lines when there are at most `size`, else a uniform sample (algorithm R)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, line in enumerate(lines):
        if n < size:
            sample.append(line)
        elif (j := rng.randrange(n + 1)) < size:
            sample[j] = line
    return sample


def _save(tokenizer: Tokenizer, proto: bytes) -> None:
    """Writes the .vocab, then the .model: an existing .model implies both are whole."""
    processor = tokenizer._sp
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                    for i in range(tokenizer.vocab_size))
    prefix = tokenizer.path[: -len(".model")]
    _write_atomic(prefix + ".vocab", vocab.encode("utf-8"))
    _write_atomic(tokenizer.path, proto)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
