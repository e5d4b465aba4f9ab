"""From documents to this host's slice of each global batch, deterministically.

    documents (shuffled per epoch, repeated)          grain.MapDataset, random access
      -> examples of document p                       a pure function of (seed, p)
      -> packed rows of seq_len                       PackedRows: a checkpointable iterator
      -> global batch -> this host's rows             grain batch + slice

The stream is split into `shards` virtual shards (shard s: positions p = s mod
shards, in order), each packed on its own; a global batch is every shard's next
batch_size/shards rows, shard after shard. A host runs only the shards whose rows
it feeds, so with hosts dividing shards each host tokenizes and packs
shards/hosts of them, and the global batches depend on the shard count, never on
the number of hosts. The iterator state is small (per shard: the next document
index and the keys (p, c) of the examples waiting in open rows), because an
example is regenerated exactly from its key on restore.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from objectives import Example, Mixture, TextChunk
from pretrain.errors import raise_problems
from pretrain.packing import pack_row, packer, strategy_problems

Tokenize = Callable[[str], np.ndarray]
ExampleKey = tuple[int, int]  # (stream position of the document, example number within it)
PackRow = Callable[[Sequence[Any], int], dict[str, np.ndarray]]  # (examples of one row, seq_len) -> arrays


class HasSentences(Protocol):
    sentences: Sequence[str]


@dataclasses.dataclass(frozen=True)
class DocumentExamples:
    """The examples of one document, a pure function of (seed, stream position).

    The document's sentences are tokenized and cut into chunks: for each chunk a
    leaf objective is drawn from the mixture, the chunk takes the next
    `text_budget(seq_len)` tokens of the document (fewer only at its end), and
    the objective makes the example. Chunks are not cut back to sentence ends:
    full-length chunks plus short document tails as fillers pack rows to ~99%
    real tokens, where ending at sentence boundaries left ~9% padding.

    The exception is an objective that reads whole sentences
    (`Objective.whole_sentences`, sentence pairs): its chunk starts at a sentence start
    and ends at the last sentence end that fits the budget, as BERT's
    create_pretraining_data accumulates whole sentences. Only a sentence longer than
    the budget is cut; and where the previous chunk ended mid-sentence (a cut
    sentence, or another objective's chunk in a mixture), the tokens up to the next
    sentence start are skipped and counted as dropped.

    Each chunk knows whether it opens its document and the token that follows it,
    so a causal LM continues across chunks. A tail shorter than the drawn
    objective's minimum is counted, not hidden (`dropped_tokens`). Objectives that
    need negatives from another document get a window of another document of the same split, from a
    sentence start when they read whole sentences.
    """

    documents: Sequence[HasSentences]
    tokenize: Tokenize
    mixture: Mixture
    seq_len: int
    seed: int

    def rng(self, position: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, position])))

    def tokens_of(self, document: HasSentences) -> tuple[np.ndarray, np.ndarray]:
        """All tokens of a document and the offsets where its sentences start."""
        pieces = [np.asarray(self.tokenize(sentence), np.int32) for sentence in document.sentences]
        pieces = [piece for piece in pieces if len(piece)]
        if not pieces:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        starts = np.cumsum([0] + [len(piece) for piece in pieces[:-1]]).astype(np.int32)
        return np.concatenate(pieces), starts

    def other_window(self, rng: np.random.Generator, exclude: HasSentences, length: int,
                     from_sentence_start: bool = False) -> np.ndarray:
        """Up to `length` contiguous tokens from a random other document, starting at
        a random one of its sentence starts when `from_sentence_start` (as BERT's
        random next sentence), else anywhere."""
        for _ in range(8):
            other = self.documents[int(rng.integers(len(self.documents)))]
            if other is exclude:
                continue
            tokens, starts = self.tokens_of(other)
            if len(tokens):
                if from_sentence_start:
                    start = int(starts[rng.integers(len(starts))])
                else:
                    start = int(rng.integers(0, max(1, len(tokens) - length + 1)))
                return tokens[start : start + length]
        raise ValueError("objectives that draw negatives from another document need at least two non-empty documents in the split")

    def __call__(self, position: int, document: HasSentences) -> tuple[int, list[Example], int]:
        """(position, examples, dropped_tokens) of the document at stream `position`."""
        rng = self.rng(position)
        tokens, starts = self.tokens_of(document)
        examples: list[Example] = []
        begin, skipped = 0, 0
        while begin < len(tokens):
            objective = self.mixture.choose(rng)
            if objective.whole_sentences:
                start = sentence_start_at_or_after(starts, begin, len(tokens))
                skipped, begin = skipped + start - begin, start
                if begin == len(tokens):
                    break
            budget = objective.text_budget(self.seq_len)
            end = min(len(tokens), begin + budget)
            if objective.whole_sentences and end < len(tokens):
                end = last_sentence_end_within(starts, begin, end)
            if end - begin < objective.min_text_tokens:
                break
            inside = starts[(starts >= begin) & (starts < end)] - begin
            other = (self.other_window(rng, document, end - begin, objective.whole_sentences)
                     if objective.needs_other_document else None)
            following = int(tokens[end]) if end < len(tokens) else None
            examples.append(objective(TextChunk(tokens[begin:end], inside, other, at_document_start=begin == 0,
                                                next_token=following), rng))
            begin = end
        return position, examples, skipped + len(tokens) - begin


def sentence_start_at_or_after(starts: np.ndarray, offset: int, length: int) -> int:
    """The first sentence start at or after `offset` (`length` when none is left)."""
    later = starts[starts >= offset]
    return int(later[0]) if len(later) else length


def last_sentence_end_within(starts: np.ndarray, begin: int, end: int) -> int:
    """The last sentence boundary in (begin, end]: where a whole-sentence chunk that
    may run to `end` stops. `end` itself when one sentence fills the whole budget."""
    inside = starts[(starts > begin) & (starts <= end)]
    return int(inside[-1]) if len(inside) else end


@dataclasses.dataclass
class PackingStats:
    """Counts since the start of the stream (they travel in the iterator state)."""

    rows: int = 0
    real_tokens: int = 0
    examples: int = 0
    documents: int = 0
    dropped_tokens: int = 0

    def efficiency(self, seq_len: int) -> float:
        """Fraction of emitted row slots that hold real tokens."""
        return self.real_tokens / max(1, self.rows * seq_len)


class PackedRowsIterator(grain.DatasetIterator):
    """Streams packed rows; keeps at most `open_rows` partly filled rows.

    An example goes to the first open row with room (first fit) or the one it
    fills most tightly (best fit); when none has room and all `open_rows` are in
    use, the fullest row is emitted to make room.
    """

    def __init__(self, parent: grain.DatasetIterator, examples: grain.MapDataset,
                 seq_len: int, open_rows: int, strategy: str, barren_limit: int | None = None,
                 pack: PackRow = pack_row, max_per_row: int | None = None):
        super().__init__(parent)
        self._pack, self._max_per_row = pack, max_per_row
        self._barren_limit = barren_limit
        self._barren = 0  # documents in a row that gave no example
        self._examples = examples
        self._seq_len, self._open_rows, self._strategy = seq_len, open_rows, strategy
        self._rows: list[list[tuple[ExampleKey, Example]]] = []
        self._document: tuple[int, list[Example]] | None = None
        self._next_example = 0
        self._ready: list[list[tuple[ExampleKey, Example]]] = []
        self.stats = PackingStats()

    def _room(self, row: list[tuple[ExampleKey, Example]]) -> int:
        if self._max_per_row is not None and len(row) >= self._max_per_row:
            return 0
        return self._seq_len - sum(len(example) for _, example in row)

    def _place(self, key: ExampleKey, example: Example) -> None:
        if len(example) > self._seq_len:
            raise ValueError(f"example {key} has {len(example)} tokens, more than seq_len={self._seq_len}")
        fitting = [i for i, row in enumerate(self._rows) if self._room(row) >= len(example)]
        if fitting:
            index = fitting[0] if self._strategy == "first_fit" else min(
                fitting, key=lambda i: self._room(self._rows[i]))
            self._rows[index].append((key, example))
            return
        if len(self._rows) >= self._open_rows:
            fullest = min(range(len(self._rows)), key=lambda i: self._room(self._rows[i]))
            self._ready.append(self._rows.pop(fullest))
        self._rows.append([(key, example)])

    def _pull_document(self) -> bool:
        try:
            position, examples, dropped = next(self._parent)
        except StopIteration:
            return False
        self._document, self._next_example = (position, examples), 0
        self.stats.documents += 1
        self.stats.dropped_tokens += dropped
        self._barren = 0 if examples else self._barren + 1
        if self._barren_limit is not None and self._barren >= self._barren_limit:
            raise ValueError(
                f"{self._barren} documents in a row gave no example: every document is shorter "
                "than the objectives' minimum text length (or empty after tokenization); "
                "use longer documents or other objectives")
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._ready:
            if self._document is None or self._next_example >= len(self._document[1]):
                if not self._pull_document():
                    if not self._rows:
                        raise StopIteration
                    self._ready.append(self._rows.pop(0))
                    break
                continue
            position, examples = self._document
            self._place((position, self._next_example), examples[self._next_example])
            self._next_example += 1
        row = self._ready.pop(0)
        self.stats.rows += 1
        self.stats.examples += len(row)
        self.stats.real_tokens += sum(len(example) for _, example in row)
        return self._pack([example for _, example in row], self._seq_len)

    def get_state(self) -> dict[str, Any]:
        keys = lambda rows: [[list(key) for key, _ in row] for row in rows]  # noqa: E731
        document = None if self._document is None else [self._document[0], self._next_example]
        return {
            "parent": self._parent.get_state(),
            "document": document,
            "open_rows": keys(self._rows),
            "ready_rows": keys(self._ready),
            "stats": dataclasses.asdict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        cache: dict[int, list[Example]] = {}

        def example(key: Sequence[int]) -> tuple[ExampleKey, Example]:
            position, number = int(key[0]), int(key[1])
            if position not in cache:
                cache[position] = self._examples[position][1]
            return (position, number), cache[position][number]

        self._rows = [[example(key) for key in row] for row in state["open_rows"]]
        self._ready = [[example(key) for key in row] for row in state["ready_rows"]]
        if state["document"] is None:
            self._document, self._next_example = None, 0
        else:
            position, self._next_example = state["document"]
            self._document = (position, cache.get(position) or self._examples[position][1])
        self.stats = PackingStats(**state["stats"])


class PackedRows(grain.IterDataset):
    """Grain dataset of packed rows over a MapDataset of per-document examples.

    `pack` turns the examples of one row into its arrays (`pretrain.packing.pack_row`
    for objective examples; fine-tuning packs its task examples with its own fields);
    `max_per_row=1` gives one example per row (unpacked). `shard=(s, count)` packs
    only the positions p = s mod count, in order; `examples` stays indexed by the
    global position, from which a restore regenerates the waiting examples."""

    def __init__(self, examples: grain.MapDataset, seq_len: int, open_rows: int = 8,
                 strategy: str = "best_fit", read_options: grain.ReadOptions | None = None,
                 barren_limit: int | None = None, pack: PackRow = pack_row, max_per_row: int | None = None,
                 shard: tuple[int, int] = (0, 1)):
        raise_problems(strategy_problems(strategy))
        super().__init__(examples[shard[0]::shard[1]].to_iter_dataset(read_options))
        self._examples = examples
        self._seq_len, self._open_rows, self._strategy = seq_len, open_rows, strategy
        self._barren_limit, self._pack, self._max_per_row = barren_limit, pack, max_per_row

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), self._examples, self._seq_len,
                                  self._open_rows, self._strategy, self._barren_limit, self._pack, self._max_per_row)


def host_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of each global batch that process `process_index` feeds."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes; choose a multiple of {process_count}")
    per_host = global_batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


def shard_problems(shards: Any, global_batch_size: int | None = None) -> list[str]:
    """Why `shards` (`config.data.shards`) cannot split batches of `global_batch_size`
    rows (`config.batch_size`; None: not checked), or nothing."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        return [(f"config.data.shards={shards!r} must be a positive integer (1: one stream; a multiple of the "
                 "host count spreads the reading and packing over the hosts)")]
    if isinstance(global_batch_size, int) and global_batch_size > 0 and global_batch_size % shards:
        working = [d for d in range(1, global_batch_size + 1) if global_batch_size % d == 0]
        return [(f"config.data.shards={shards} must divide config.batch_size={global_batch_size} (every shard "
                 f"gives batch_size/shards rows of each batch); use one of {', '.join(map(str, working))}, or change "
                 "config.batch_size")]
    return []


def host_shards(global_batch_size: int, shards: int, process_index: int, process_count: int) -> tuple[range, slice]:
    """The shards whose rows process `process_index` feeds, and its rows within their
    blocks laid end to end: exactly shards/process_count shards when the process
    count divides the shard count, the one shard of a single-shard stream on every
    host, and any shard shared by two hosts runs on both."""
    rows = host_rows(global_batch_size, process_index, process_count)
    per_shard = global_batch_size // shards
    first, stop = rows.start // per_shard, -(-rows.stop // per_shard)
    offset = first * per_shard
    return range(first, stop), slice(rows.start - offset, rows.stop - offset)


def _by_shard(state: dict[str, Any]) -> tuple[int, dict[int, Any]]:
    """(shard count, {shard: packer state}) of an iterator state; a state without
    shards (one shard, and every state written before there were shards) is shard 0's."""
    if "shards" not in state:
        return 1, {0: state}
    return int(state["shard_count"]), {int(shard): value for shard, value in state["shards"].items()}


def _state_of(shard_count: int, states: dict[int, Any]) -> dict[str, Any]:
    """The iterator state holding `states`: with one shard the packer's own state (as
    before there were shards, so old and new checkpoints read alike); else every
    shard's by number, its shard count and the summed packing stats."""
    if shard_count == 1:
        return states[0]
    stats = [PackingStats(**state["stats"]) for state in states.values()]
    total = {field.name: sum(getattr(s, field.name) for s in stats) for field in dataclasses.fields(PackingStats)}
    return {"shard_count": shard_count, "shards": {str(shard): states[shard] for shard in sorted(states)},
            "stats": total}


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One iterator state holding every shard of the hosts' `states` (what a
    checkpoint keeps, so any host count the shard count allows can resume from it).
    A shard run by several hosts has the same state on each (it is deterministic);
    the first is kept. The stats are summed again over the shards."""
    counts = {count for count, _ in map(_by_shard, states)}
    if len(counts) != 1:
        raise ValueError(f"the hosts' data states disagree on the shard count ({sorted(counts)}); every host must "
                         "run with the same config.data.shards")
    merged: dict[int, Any] = {}
    for state in states:
        for shard, value in _by_shard(state)[1].items():
            merged.setdefault(shard, value)
    return _state_of(counts.pop(), merged)


class ShardedBatchesIterator(grain.DatasetIterator):
    """This host's rows of each global batch, from the blocks of the shards it runs."""

    def __init__(self, shards: dict[int, grain.DatasetIterator], shard_count: int, keep: slice):
        super().__init__(list(shards.values()))
        self._shards, self._shard_count, self._keep = shards, shard_count, keep

    def __next__(self) -> dict[str, np.ndarray]:
        blocks = [next(iterator) for iterator in self._shards.values()]
        return {name: np.concatenate([block[name] for block in blocks])[self._keep] for name in blocks[0]}

    def get_state(self) -> dict[str, Any]:
        return _state_of(self._shard_count, {shard: it.get_state() for shard, it in self._shards.items()})

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores this host's shards from a state holding at least them (a checkpoint
        holds all)."""
        count, states = _by_shard(state)
        if count != self._shard_count:
            raise ValueError(
                f"the data state to restore was written with config.data.shards={count}, but this run has "
                f"config.data.shards={self._shard_count}; the shard count fixes the batch stream, so resume with "
                f"--config.data.shards={count} (the number of hosts may change), or start a new run in a new workdir")
        missing = sorted(set(self._shards) - set(states))
        if missing:
            raise ValueError(f"the data state lacks shards {missing} of this host (it holds shards "
                             f"{sorted(states)}); restore from a state merged over all hosts (merge_states), as "
                             "checkpoints hold")
        for shard, iterator in self._shards.items():
            iterator.set_state(states[shard])


class ShardedBatches(grain.IterDataset):
    """Grain dataset of this host's rows, laid end to end from per-shard batches."""

    def __init__(self, shards: dict[int, grain.IterDataset], shard_count: int, keep: slice):
        super().__init__(list(shards.values()))
        self._shards, self._shard_count, self._keep = shards, shard_count, keep

    def __iter__(self) -> ShardedBatchesIterator:
        return ShardedBatchesIterator({shard: iter(dataset) for shard, dataset in self._shards.items()},
                                      self._shard_count, self._keep)


def training_batches(
    documents: Sequence[HasSentences],
    tokenize: Tokenize,
    mixture: Mixture,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    packing: str = "best_fit",
    open_rows: int = 8,
    num_threads: int = 2,
    shards: int = 1,
) -> grain.IterDataset:
    """Endless, checkpointable batches: this host's rows of each global batch.

    Documents are shuffled with `seed` (a new order every epoch) and repeated; the
    examples of stream position p depend only on (seed, p). The returned dataset's
    iterator has `get_state()` / `set_state()` for checkpoints. `shards` splits
    the stream into virtual shards (see the module docstring).
    """
    if len(documents) == 0:
        raise ValueError("the training split has no documents")
    make_examples = DocumentExamples(documents, tokenize, mixture, seq_len, seed)
    return endless_batches(documents, make_examples, seq_len=seq_len, global_batch_size=global_batch_size,
                           seed=seed, process_index=process_index, process_count=process_count, packing=packing,
                           open_rows=open_rows, num_threads=num_threads, barren_limit=len(documents), shards=shards,
                           pack=packer(mixture.term_fields))


PREFETCH_DOCUMENTS = 64  # documents a host's threads make ahead, shared out over the shards it runs


def endless_batches(items: Sequence[Any], make_examples: Callable[[int, Any], tuple[int, list, int]], *,
                    seq_len: int, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                    packing: str = "best_fit", open_rows: int = 8, num_threads: int = 2,
                    barren_limit: int | None = None, pack: PackRow = pack_row,
                    max_per_row: int | None = None, shards: int = 1) -> grain.IterDataset:
    """Endless, checkpointable batches of any items: shuffled with `seed` (a new order
    every epoch), repeated, `make_examples(position, item) -> (position, examples,
    dropped tokens)`, split into `shards` shards each packed by `pack`, this host's
    rows of each global batch (made from the shards it runs only)."""
    raise_problems(shard_problems(shards, global_batch_size))
    local, keep = host_shards(global_batch_size, shards, process_index, process_count)
    examples = grain.MapDataset.source(items).shuffle(seed=seed).repeat(None).map_with_index(make_examples)
    ahead = max(1, PREFETCH_DOCUMENTS // len(local))  # per shard; a thread beyond it would have nothing to do
    options = grain.ReadOptions(num_threads=min(num_threads, ahead), prefetch_buffer_size=ahead)
    blocks = {shard: PackedRows(examples, seq_len, open_rows, packing, options, barren_limit=barren_limit, pack=pack,
                                max_per_row=max_per_row, shard=(shard, shards)
                                ).batch(global_batch_size // shards, drop_remainder=True)
              for shard in local}
    return ShardedBatches(blocks, shards, keep)


def evaluation_batches(
    documents: Sequence[HasSentences],
    tokenize: Tokenize,
    mixture: Mixture,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    packing: str = "best_fit",
) -> list[dict[str, np.ndarray]]:
    """The fixed held-out batches: every document once, in order, the last batch
    filled with empty rows (all weights 0) so every host sees the same count."""
    make_examples = DocumentExamples(documents, tokenize, mixture, seq_len, seed)
    batches = fixed_batches(documents, make_examples, seq_len=seq_len, global_batch_size=global_batch_size,
                            process_index=process_index, process_count=process_count, packing=packing,
                            pack=packer(mixture.term_fields))
    if not batches:
        raise ValueError("the held-out split yields no examples")
    return batches


def fixed_batches(items: Sequence[Any], make_examples: Callable[[int, Any], tuple[int, list, int]], *,
                  seq_len: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                  packing: str = "best_fit", pack: PackRow = pack_row, max_per_row: int | None = None
                  ) -> list[dict[str, np.ndarray]]:
    """Every item once, in order, packed into batches; the last batch is filled with
    empty rows (`pack([], seq_len)`: no loss, no labels) so every host sees the same
    count. Empty when the items give no example."""
    rows = host_rows(global_batch_size, process_index, process_count)
    examples = grain.MapDataset.source(items).map_with_index(make_examples)
    packed = list(PackedRows(examples, seq_len, open_rows=8, strategy=packing, pack=pack, max_per_row=max_per_row))
    if not packed:
        return []
    packed += [pack([], seq_len)] * (-len(packed) % global_batch_size)
    return [{name: np.stack([row[name] for row in packed[start : start + global_batch_size][rows]])
             for name in packed[0]} for start in range(0, len(packed), global_batch_size)]


def iterate_rows(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Rows one by one out of batches (handy for inspection and tests)."""
    for batch in batches:
        for index in range(len(batch["inputs"])):
            yield {name: values[index] for name, values in batch.items()}
