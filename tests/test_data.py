"""The packed batch stream: determinism, exact restore, host slicing, the eval set."""

import dataclasses

import grain
import numpy as np
import pytest

import objectives
from objectives.vocab import BOS_ID as BOS, EOS_ID as EOS
from pretrain import data
from pretrain.packing import packer

SEQ_LEN = 64
BATCH = 8


@dataclasses.dataclass(frozen=True)
class Doc:
    sentences: tuple


def make_documents(count: int = 120, seed: int = 0) -> list[Doc]:
    rng = np.random.default_rng(seed)
    return [Doc(tuple(" ".join(f"w{rng.integers(100)}" for _ in range(rng.integers(3, 30)))
                      for _ in range(rng.integers(1, 8)))) for _ in range(count)]


def tokenize(sentence: str) -> np.ndarray:
    # A stand-in word-level tokenizer: ids 7.. for words w0..w99 (ids 0..6 are special).
    return np.asarray([7 + int(word[1:]) for word in sentence.split()], np.int32)


DOCS = make_documents()
MIXTURE = objectives.build_mixture("mlm:1,clm:1,mass:1,unilm:1", objectives.Vocabulary(120),
                                   {"mlm": {"nsp": True}})


def batches(seed=0, count=6, **kwargs):
    iterator = iter(data.training_batches(DOCS, tokenize, MIXTURE, seq_len=SEQ_LEN,
                                          global_batch_size=BATCH, seed=seed, **kwargs))
    return [next(iterator) for _ in range(count)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_same_seed_same_batches_other_seed_other_batches():
    first = batches(seed=3)
    assert_same(first, batches(seed=3))
    assert not np.array_equal(first[0]["inputs"], batches(seed=4, count=1)[0]["inputs"])
    assert first[0]["inputs"].shape == (BATCH, SEQ_LEN)


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_hosts_slice_the_same_global_batches(hosts):
    reference = batches(count=3)
    per_host = [batches(count=3, process_index=h, process_count=hosts) for h in range(hosts)]
    for step in range(3):
        for name in reference[step]:
            joined = np.concatenate([per_host[h][step][name] for h in range(hosts)])
            np.testing.assert_array_equal(joined, reference[step][name], err_msg=name)


def test_batch_not_divisible_by_hosts_is_a_clear_error():
    with pytest.raises(ValueError, match="global batch size 8 is not divisible by the 3 processes"):
        batches(count=1, process_index=0, process_count=3)


@pytest.mark.parametrize("strategy", ["first_fit", "best_fit"])
def test_restoring_mid_epoch_continues_exactly(strategy):
    dataset = data.training_batches(DOCS, tokenize, MIXTURE, seq_len=SEQ_LEN,
                                    global_batch_size=BATCH, seed=0, packing=strategy)
    uninterrupted = iter(dataset)
    expected = [next(uninterrupted) for _ in range(40)]  # > 1 epoch of 120 documents
    interrupted = iter(dataset)
    for _ in range(17):
        next(interrupted)
    state = interrupted.get_state()
    assert state["open_rows"], "the test should restore with rows waiting to be filled"
    resumed = iter(dataset)
    resumed.set_state(state)
    assert_same([next(resumed) for _ in range(23)], expected[17:])


def test_every_example_lands_whole_in_one_segment():
    make = data.DocumentExamples(DOCS, tokenize, MIXTURE, SEQ_LEN, seed=0)
    rows = list(data.PackedRows(grain.MapDataset.source(DOCS[:30]).map_with_index(make), SEQ_LEN,
                                pack=packer(MIXTURE.term_fields)))
    examples = [example for position in range(30) for example in make(position, DOCS[position])[1]]

    def key(fields):  # every field of one example, as a hashable tuple
        return tuple(tuple(np.asarray(fields[name]).tolist()) for name in objectives.TOKEN_FIELDS)

    packed = []
    for row in rows:
        for segment in sorted(set(row["segment_ids"].tolist()) - {0}):
            where = row["segment_ids"] == segment
            first = int(np.flatnonzero(where)[0])
            assert np.all(np.diff(np.flatnonzero(where)) == 1), "a segment must be contiguous"
            packed.append((key({name: row[name][where] for name in objectives.TOKEN_FIELDS}),
                           int(row["nsp_labels"][first])))
            assert np.all(row["nsp_labels"][where][1:] == -1)
        assert np.all(row["weights"][row["segment_ids"] == 0] == 0)
    label = lambda e: int(e.extras["nsp_labels"][0]) if e.extras else -1  # noqa: E731
    assert sorted(packed) == sorted((key(e.fields()), label(e)) for e in examples)


def test_examples_respect_budgets_and_drop_nothing_here():
    # No whole-sentence objective here: those may skip a cut sentence's rest (below).
    mixture = objectives.build_mixture("mlm:1,clm:1,mass:1,unilm:1", objectives.Vocabulary(120))
    make = data.DocumentExamples(DOCS, tokenize, mixture, SEQ_LEN, seed=0)
    for position, document in enumerate(DOCS[:50]):
        _, examples, dropped = make(position, document)
        text = sum(len(tokenize(s)) for s in document.sentences)
        assert all(len(e) <= SEQ_LEN for e in examples)
        assert dropped == 0 or dropped < 2, (position, dropped, text)


def test_evaluation_batches_are_fixed_and_padded():
    held_out = make_documents(count=25, seed=9)
    first = data.evaluation_batches(held_out, tokenize, MIXTURE, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    again = data.evaluation_batches(held_out, tokenize, MIXTURE, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    assert_same(first, again)
    assert all(batch["inputs"].shape == (BATCH, SEQ_LEN) for batch in first)
    last = first[-1]
    empty = last["segment_ids"].max(axis=1) == 0
    assert np.all(last["weights"][empty] == 0) and np.all(last["nsp_labels"][empty] == -1)
    halves = [data.evaluation_batches(held_out, tokenize, MIXTURE, seq_len=SEQ_LEN, global_batch_size=BATCH,
                                      seed=0, process_index=h, process_count=2) for h in range(2)]
    for step, batch in enumerate(first):
        np.testing.assert_array_equal(np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]]),
                                      batch["inputs"])


def test_documents_too_short_are_counted_and_a_barren_corpus_is_an_error():
    mass_only = objectives.build_mixture("mass", objectives.Vocabulary(120))
    short = [Doc(("w1",)), Doc(("w2 w3 w4 w5",)), Doc(("",))]
    make = data.DocumentExamples(short, tokenize, mass_only, SEQ_LEN, seed=0)
    assert make(0, short[0])[1:] == ([], 1)  # one token: MASS needs two; counted as dropped
    assert len(make(1, short[1])[1]) == 1 and make(1, short[1])[2] == 0
    assert make(2, short[2])[1:] == ([], 0)
    barren = [Doc(("w1",)), Doc(("w2",))]
    with pytest.raises(ValueError, match="2 documents in a row gave no example"):
        next(iter(data.training_batches(barren, tokenize, mass_only, seq_len=SEQ_LEN,
                                        global_batch_size=BATCH, seed=0)))


def recorded_chunks(mixture, monkeypatch) -> list:
    """Every chunk the mixture's leaves are given, in order."""
    chunks = []
    for leaf in mixture.objectives:
        def record(chunk, rng, make=leaf.make_example):
            chunks.append(chunk)
            return make(chunk, rng)
        monkeypatch.setattr(leaf, "make_example", record)
    return chunks


def test_causal_windows_continue_across_chunks_and_end_only_where_the_document_ends():
    """55 tokens in rows of 16: four windows of 15 + 15 + 15 + 10 text tokens. [BOS]
    opens only the first; each window's last target is the next window's first token;
    [EOS] is a target once, at the end; every token is predicted exactly once."""
    clm = objectives.build_mixture("clm", objectives.Vocabulary(120))
    document = Doc(tuple(" ".join(f"w{(7 * s + i) % 100}" for i in range(11)) for s in range(5)))
    tokens = np.concatenate([tokenize(s) for s in document.sentences]).tolist()
    _, examples, dropped = data.DocumentExamples([document], tokenize, clm, seq_len=16, seed=0)(0, document)
    assert dropped == 0 and [len(e) for e in examples] == [16, 15, 15, 10]
    assert np.concatenate([e.inputs for e in examples]).tolist() == [BOS, *tokens]
    assert np.concatenate([e.targets for e in examples]).tolist() == [*tokens, EOS]
    assert all(e.weights.sum() == len(e) for e in examples)
    for before, after in zip(examples, examples[1:]):
        assert before.targets[-1] == after.inputs[0] != BOS
    one_chunk = Doc(("w1 w2 w3",))
    (only,) = data.DocumentExamples([one_chunk], tokenize, clm, seq_len=16, seed=0)(0, one_chunk)[1]
    assert only.inputs.tolist() == [BOS, 8, 9, 10] and only.targets.tolist() == [8, 9, 10, EOS]


def test_sentence_pair_chunks_hold_whole_sentences(monkeypatch):
    """BERT's NSP reads whole sentences: every chunk starts at a sentence start and ends
    at a sentence end (no sentence here exceeds the 61-token budget, so nothing is cut
    or skipped), and a negative's B starts at a sentence start of another document."""
    nsp = objectives.build_mixture("mlm", objectives.Vocabulary(120), {"mlm": {"nsp": True}})
    chunks = recorded_chunks(nsp, monkeypatch)
    make = data.DocumentExamples(DOCS, tokenize, nsp, SEQ_LEN, seed=0)
    sentence_openings = {tuple(tokenize(s)[:3].tolist()) for doc in DOCS for s in doc.sentences}
    for position, document in enumerate(DOCS[:40]):
        del chunks[:]
        _, examples, dropped = make(position, document)
        sentences = [tokenize(s).tolist() for s in document.sentences]
        bounds = set(np.cumsum([0] + [len(s) for s in sentences]).tolist())
        assert dropped == 0 and len(chunks) == len(examples)
        offset = 0
        for chunk in chunks:
            assert offset in bounds and offset + len(chunk) in bounds, (position, offset, len(chunk))
            assert tuple(chunk.other_document[:3].tolist()) in sentence_openings
            offset += len(chunk)
        assert offset == max(bounds)


def test_a_sentence_longer_than_the_budget_is_cut_and_its_rest_skipped(monkeypatch):
    """Sentences of 5, 40 and 6 tokens, budget 13: [0, 5) whole; the long sentence cut to
    [5, 18); its other 27 tokens skipped and counted as dropped; [45, 51) whole."""
    nsp = objectives.build_mixture("mlm", objectives.Vocabulary(120), {"mlm": {"nsp": True}})
    chunks = recorded_chunks(nsp, monkeypatch)
    document = Doc(tuple(" ".join(f"w{i}" for i in range(start, start + n)) for start, n in ((0, 5), (5, 40), (45, 6))))
    _, _, dropped = data.DocumentExamples([document, DOCS[0]], tokenize, nsp, seq_len=16, seed=0)(0, document)
    assert [(int(c.tokens[0]) - 7, len(c)) for c in chunks] == [(0, 5), (5, 13), (45, 6)]
    assert dropped == 27


# -- virtual shards: per-host work shrinks with the host count, the batches do not change --

SHARDS = 8  # = BATCH: one row of every global batch per shard


def host_iterators(hosts, shards=SHARDS, tokenize=tokenize, **kwargs):
    return [iter(data.training_batches(DOCS, tokenize, MIXTURE, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0,
                                       process_index=h, process_count=hosts, shards=shards, **kwargs))
            for h in range(hosts)]


def global_batches(iterators, count):
    """The next `count` global batches: the hosts' slices laid end to end."""
    steps = [[next(iterator) for iterator in iterators] for _ in range(count)]
    return [{name: np.concatenate([part[name] for part in parts]) for name in parts[0]} for parts in steps]


def test_sharded_global_batches_do_not_depend_on_the_host_count():
    reference = global_batches(host_iterators(1), 5)
    assert not np.array_equal(reference[0]["inputs"], batches(count=1)[0]["inputs"]), "shards change the stream"
    for hosts in (2, 4, 8):
        assert_same(global_batches(host_iterators(hosts), 5), reference)


def test_shard_blocks_are_packed_from_their_own_positions():
    """Shard s packs the stream positions p = s mod 8 (keys keep the global position)."""
    (iterator,) = host_iterators(1)
    global_batches([iterator], 3)
    for shard, state in iterator.get_state()["shards"].items():
        positions = {key[0] for row in state["open_rows"] for key in row} | {state["document"][0]}
        assert all(p % SHARDS == int(shard) for p in positions), (shard, positions)


def counting_tokenize():
    calls = [0]

    def counted(sentence):
        calls[0] += 1
        return tokenize(sentence)
    return counted, calls


def test_each_host_tokenizes_only_its_share():
    """Documents tokenized (sentences, NSP negatives included) per host over 12 batches,
    examples made in the calling thread (num_threads=0: nothing read ahead). Every shard
    runs on exactly one host, so the hosts' counts add up exactly to the single host's;
    each host's share is 1/H within 40%, because shards consume documents at different
    rates (documents have 1 to 7 sentences of 3 to 29 words): over these 12 batches
    the largest share measured was 1.2x the mean."""
    totals = {}
    for hosts in (1, 2, 4, 8):
        counters = [counting_tokenize() for _ in range(hosts)]
        iterators = [iter(data.training_batches(DOCS, counted, MIXTURE, seq_len=SEQ_LEN, global_batch_size=BATCH,
                                                seed=0, process_index=h, process_count=hosts, shards=SHARDS,
                                                num_threads=0))
                     for h, (counted, _) in enumerate(counters)]
        global_batches(iterators, 12)
        totals[hosts] = [calls[0] for _, calls in counters]
    single = totals[1][0]
    for hosts, counts in totals.items():
        assert sum(counts) == single, (hosts, counts)
        assert max(counts) <= 1.4 * single / hosts, (hosts, counts, single)


def test_resume_on_another_host_count_continues_exactly():
    expected = global_batches(host_iterators(1), 9)
    two = host_iterators(2)
    global_batches(two, 4)
    states = [iterator.get_state() for iterator in two]
    assert [sorted(state["shards"]) for state in states] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    merged = data.merge_states(states)
    assert sorted(merged["shards"]) == [str(s) for s in range(SHARDS)] and merged["shard_count"] == SHARDS
    assert merged["stats"]["rows"] == 4 * BATCH
    for hosts in (4, 1):
        resumed = host_iterators(hosts)
        for iterator in resumed:
            iterator.set_state(merged)
        assert_same(global_batches(resumed, 5), expected[4:])


def test_a_state_of_another_shard_count_or_other_shards_is_a_clear_error():
    (eight,) = host_iterators(1)
    next(eight)
    (four,) = host_iterators(1, shards=4)
    with pytest.raises(ValueError, match=r"written with config.data.shards=8, but this run has "
                                         r"config.data.shards=4; .* resume with --config.data.shards=8"):
        four.set_state(eight.get_state())
    (one,) = host_iterators(1, shards=1)
    with pytest.raises(ValueError, match=r"written with config.data.shards=1, but this run has config.data.shards=8"):
        eight.set_state(next(one) and one.get_state())
    first, second = host_iterators(2)
    with pytest.raises(ValueError, match=r"lacks shards \[4, 5, 6, 7\] of this host \(it holds shards \[0, 1, 2, 3\]\)"):
        second.set_state(first.get_state())


def test_shards_must_divide_the_batch_size():
    from configs.pretrain import get_config
    from pretrain.input_pipeline import data_problems

    config = get_config()
    config.batch_size, config.data.shards = 8, 3
    assert data_problems(config.data, config.batch_size) == [(
        "config.data.shards=3 must divide config.batch_size=8 (every shard gives batch_size/shards rows of each "
        "batch); use one of 1, 2, 4, 8, or change config.batch_size")]
    config.data.shards = 0
    assert "config.data.shards=0 must be a positive integer" in data_problems(config.data, 8)[0]
    config.data.shards = 4
    assert data_problems(config.data, 8) == []
    with pytest.raises(ValueError, match="config.data.shards=3 must divide config.batch_size=8"):
        batches(count=1, shards=3)
