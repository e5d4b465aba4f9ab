"""Task examples as packed rows, in the layout of the body that reads them.

A task example becomes one segment of a packed row, in the same format as
pretraining rows, so the attention rule keeps examples apart exactly as it keeps
pretraining examples apart, and task rows and auxiliary language-model rows can
share one batch:

| layout        | single text           | pair                          | kinds  | features read from |
|---------------|-----------------------|-------------------------------|--------|---------------|
| bidirectional | `[CLS] text [SEP]`    | `[CLS] A [SEP] B [SEP]`       | PREFIX | the segment's pooled features (mean by default, or its first token) |
| causal        | `[BOS] text [EOS]`    | `[BOS] A [SEP] B [EOS]`       | L2R    | the segment's pooled features (mean by default, or its last token) |

Both layouts have the same length and positions, so each row carries both views
(`inputs`/`attention_kind` and `inputs_causal`/`attention_kind_causal`) and a
fusion of bodies of different layouts reads one batch. Token types are 0 for the
first text and 1 for the second. Texts longer than the row are cut, the longer of
a pair first (BERT's rule).

Task fields, per token: `task_labels` (a label where the task's kind puts one: the
class at the example's first token, each word's tag at the word's first piece, ...;
-1 elsewhere), `task_values` (a real-valued target), `task_example` (the example's
index in its split where a label sits, -1 elsewhere) and `task_word` (the word's
index at a tag). What an example's segment holds is its kind's rule
(`pretrain.transfer.kinds`); this module lays out its tokens (`lay_out`) and packs
segments into rows. A body's layout follows its pretraining: causal when every
objective it was trained with is all left-to-right, else bidirectional (`layout_of`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

import objectives
from objectives.example import L2R, PREFIX
from pretrain import data
from pretrain.tokenizer import Tokenizer
from pretrain.transfer.example import TaskExample

if TYPE_CHECKING:  # tasks reads its kinds, whose rows this module lays out
    from pretrain.transfer.tasks import Task

LAYOUTS = ("bidirectional", "causal")


def specials(vocab: objectives.Vocabulary) -> dict[str, tuple[int, int, int]]:
    """(first, middle, last) special ids of each layout, from the tokenizer's vocabulary.
    A vocabulary without [CLS] / [SEP] (an imported GPT-2) stands in [BOS] / [EOS]."""
    tokens = vocab.tokens
    sep = tokens.get("[SEP]", tokens.get("[EOS]"))
    return {"bidirectional": (tokens.get("[CLS]", tokens.get("[BOS]")), sep, sep),
            "causal": (tokens.get("[BOS]"), sep, tokens.get("[EOS]"))}
NO_LABEL = -1
# field -> (dtype, value of padding and of tokens without it)
FIELDS: dict[str, tuple[type, float]] = {
    "inputs": (np.int32, 0), "inputs_causal": (np.int32, 0), "targets": (np.int32, 0),
    "weights": (np.float32, 0), "positions": (np.int32, 0), "attention_kind": (np.int32, 0),
    "attention_kind_causal": (np.int32, 0), "token_types": (np.int32, 0), "objective_id": (np.int32, 0),
    "task_labels": (np.int32, NO_LABEL), "task_values": (np.float32, 0), "task_example": (np.int32, NO_LABEL),
    "task_word": (np.int32, NO_LABEL), "segment_ids": (np.int32, 0)}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One segment: parallel arrays of one length (any subset of FIELDS but segment_ids)."""

    fields: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.fields["inputs"])


def layout_of(objective_spec: str, settings: Any = None) -> str:
    """'causal' when every leaf of the objective spec lays out its examples all
    left-to-right (found by making one example of each), else 'bidirectional'."""
    mixture = objectives.build_mixture(objective_spec, objectives.Vocabulary.reserved(200), settings)
    rng = np.random.default_rng(0)
    chunk = objectives.TextChunk(np.arange(10, 40, dtype=np.int32), np.array([0, 15], np.int32),
                                 np.arange(40, 60, dtype=np.int32))
    causal = all(np.all(leaf(chunk, rng).attention_kind == L2R) for leaf in mixture.objectives)
    return "causal" if causal else "bidirectional"


def truncate(first: np.ndarray, second: np.ndarray | None, room: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Cuts the longer of the two texts, one token at a time, until both fit in `room`
    (BERT's rule); a single text is cut at its end."""
    if second is None:
        return first[:room], None
    first, second = list(first), list(second)
    while len(first) + len(second) > room:
        (first if len(first) >= len(second) else second).pop()
    return np.asarray(first, np.int32), np.asarray(second, np.int32)


def lay_out(first: Sequence[int] | np.ndarray, second: Sequence[int] | np.ndarray | None,
            vocab: objectives.Vocabulary) -> dict[str, np.ndarray]:
    """The fields of a segment of one text (`[CLS] first [SEP]`) or two (`[CLS] first
    [SEP] second [SEP]`), in both layouts' views (see the module docstring), token
    types 1 from the second text on, and no task field set yet."""
    length = len(first) + 2 + (len(second) + 1 if second is not None else 0)
    fields = _skeleton(length)
    for layout, (opening, middle, closing) in specials(vocab).items():
        view = "inputs" if layout == "bidirectional" else "inputs_causal"
        pieces = [[opening], first] + ([[middle], second, [closing]] if second is not None else [[closing]])
        fields[view] = np.concatenate([np.asarray(p, np.int32) for p in pieces])
    if second is not None:
        fields["token_types"][len(first) + 2 :] = 1
    return fields


def encode(example: TaskExample, index: int, task: Task, tokenizer: Tokenizer, seq_len: int) -> Encoded:
    """The segment of one task example (both layouts' views), by its task's kind."""
    return task.kind_spec.encode(example, index, tokenizer, seq_len)


def word_pieces(words: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """The pieces of each word (encoded alone, so a word's first piece carries its
    word-boundary mark as in running text)."""
    return [tokenizer.encode(word) for word in words]


def _skeleton(length: int) -> dict[str, np.ndarray]:
    fields = {name: np.full(length, fill, dtype) for name, (dtype, fill) in FIELDS.items()
              if name != "segment_ids"}
    fields["positions"] = np.arange(length, dtype=np.int32)
    fields["attention_kind"][:] = PREFIX
    fields["attention_kind_causal"][:] = L2R
    return fields


def from_objective(example: objectives.Example, objective_offset: int) -> Encoded:
    """A pretraining objective's example as a segment of a task batch (the auxiliary LM):
    the same arrays in both views, objective ids shifted past the task's. The auxiliary
    LM trains the token loss only, so the fields of the objective's loss terms stay behind."""
    fields = _skeleton(len(example))
    for name in objectives.TOKEN_FIELDS:
        fields[name] = getattr(example, name)
    fields["inputs_causal"] = example.inputs
    fields["attention_kind_causal"] = example.attention_kind
    fields["objective_id"] = example.objective_id + objective_offset
    return Encoded(fields)


def pack(segments: Sequence[Encoded], seq_len: int) -> dict[str, np.ndarray]:
    """One row [seq_len] per field from segments that fit together (an empty list
    gives an empty row: no labels, no loss)."""
    row = {name: np.full(seq_len, fill, dtype) for name, (dtype, fill) in FIELDS.items()}
    offset = 0
    for number, segment in enumerate(segments, start=1):
        end = offset + len(segment)
        if end > seq_len:
            raise ValueError(f"segments of {end} tokens do not fit in seq_len={seq_len}")
        for name, values in segment.fields.items():
            row[name][offset:end] = values
        row["segment_ids"][offset:end] = number
        offset = end
    return row


@dataclasses.dataclass(frozen=True)
class TaskSegments:
    """The segments of one training example: the task's, and with an auxiliary LM the
    auxiliary objective's example of the same text (a pure function of (seed, position))."""

    task: Task
    tokenizer: Tokenizer
    seq_len: int
    seed: int
    aux: objectives.Mixture | None = None

    def __call__(self, position: int, item: tuple[int, TaskExample]) -> tuple[int, list[Encoded], int]:
        index, example = item
        segments = [encode(example, index, self.task, self.tokenizer, self.seq_len)]
        if self.aux is not None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, position, 1])))
            tokens = self.tokenizer.encode(_text(example))
            objective = self.aux.choose(rng)
            tokens = tokens[: objective.text_budget(self.seq_len)]
            if len(tokens) >= objective.min_text_tokens:
                other = None
                if objective.needs_other_document:  # negatives: another training example's text
                    train = self.task.splits["train"]
                    other = self.tokenizer.encode(_text(train[int(rng.integers(len(train)))]))
                chunk = objectives.TextChunk(tokens, None, other)
                segments.append(from_objective(objective(chunk, rng), objective_offset=1))
        return position, segments, 0


class CachedSegments:
    """The task segments of a split's examples, encoded once (no auxiliary LM: a task
    example's segment depends on nothing but the example), for every run that packs
    them: `make_examples` of `data.endless_batches` and `data.fixed_batches`."""

    def __init__(self, task: Task, tokenizer: Tokenizer, seq_len: int, split: str = "train"):
        self.encoded = [encode(example, index, task, tokenizer, seq_len)
                        for index, example in enumerate(task.splits[split])]

    def __call__(self, position: int, item: tuple[int, TaskExample]) -> tuple[int, list[Encoded], int]:
        return position, [self.encoded[item[0]]], 0


def _text(example: TaskExample) -> str:
    """The running text of an example (its words, or its texts joined)."""
    return " ".join(example.words) if example.words else " ".join(t for t in (example.text, example.text_b) if t)


def training_stream(task: Task, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                    packed: bool, aux: objectives.Mixture | None = None, process_index: int = 0,
                    process_count: int = 1, num_threads: int = 2,
                    segments: CachedSegments | None = None) -> grain.IterDataset:
    """Endless, checkpointable batches of the training split (shuffled each epoch with
    `seed`), packed (several examples per row) or one example per row. `segments`:
    the split already encoded (the same rows, without tokenizing again)."""
    items = list(enumerate(task.splits["train"]))
    if segments is not None and aux is not None:
        raise ValueError("an auxiliary LM's segments depend on the stream position; they are not cached")
    make_examples = segments if segments is not None else TaskSegments(task, tokenizer, seq_len, seed, aux)
    return data.endless_batches(items, make_examples, seq_len=seq_len,
                                global_batch_size=batch_size, seed=seed, process_index=process_index,
                                process_count=process_count, num_threads=num_threads, pack=pack,
                                max_per_row=None if packed else (2 if aux is not None else 1))


def batches_per_epoch(task: Task, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, packed: bool,
                      segments: CachedSegments | None = None) -> int:
    """Packed batches that one pass over the training split fills (an epoch)."""
    items = list(enumerate(task.splits["train"]))
    one_pass = data.fixed_batches(items, segments or CachedSegments(task, tokenizer, seq_len), seq_len=seq_len,
                                  global_batch_size=batch_size, pack=pack, max_per_row=None if packed else 1)
    return max(1, len(one_pass))


def evaluation_batches(task: Task, split: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                       packed: bool, process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Every example of `split` once, in fixed batches."""
    items = list(enumerate(task.splits[split]))
    segments: Callable = TaskSegments(task, tokenizer, seq_len, seed=0)
    return data.fixed_batches(items, segments, seq_len=seq_len, global_batch_size=batch_size,
                              process_index=process_index, process_count=process_count, pack=pack,
                              max_per_row=None if packed else 1)
