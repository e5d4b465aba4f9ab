"""BART's denoising: the exact row, fairseq's truncated Poisson, span lengths cut to the
budget, whole-word spans, sentence permutation and insertions, with statistics over
10,000 draws."""

import math

import numpy as np
import pytest

import objectives
from objectives.bart import poisson_lengths, span_lengths
from objectives.example import L2R, PREFIX, TextChunk

VOCAB = objectives.Vocabulary.reserved(400, sentinels=0, word_start=np.arange(400) % 3 == 0)
BOS, EOS, MASK = VOCAB.bos, VOCAB.eos, VOCAB.mask
TEXT = VOCAB.ordinary_ids[:40]  # 40 distinct ordinary tokens, so every kept token says where it came from


def leaf(**settings):
    return objectives.build_mixture("bart", VOCAB, {"bart": settings}).objectives[0]


def four_binomial_std(expected: float, draws: int) -> float:
    return 4 * math.sqrt(expected * (1 - expected) / draws)


def test_the_row_is_the_corrupted_source_then_the_decoder_reconstructing_the_text():
    example = leaf().row(np.array([BOS, 201, MASK, 204, EOS]), np.array([201, 202, 203, 204]))
    assert example.inputs.tolist() == [BOS, 201, MASK, 204, EOS, BOS, 201, 202, 203, 204]
    assert example.targets.tolist() == [0] * 5 + [201, 202, 203, 204, EOS]
    assert example.weights.tolist() == [0] * 5 + [1] * 5
    assert example.attention_kind.tolist() == [PREFIX] * 5 + [L2R] * 5
    assert example.token_types.tolist() == [0] * 5 + [1] * 5
    assert example.positions.tolist() == list(range(10))


def test_the_poisson_is_truncated_after_the_first_length_below_1e_7_as_fairseq():
    probabilities = poisson_lengths(3.0)
    raw = np.array([math.exp(-3) * 3 ** k / math.factorial(k) for k in range(18)])
    assert len(probabilities) == 18 and raw[16] >= 1e-7 > raw[17]  # lengths 0..17
    np.testing.assert_allclose(probabilities, raw / raw.sum())
    assert len(poisson_lengths(3.5)) == 19


def test_span_lengths_sum_to_the_budget_and_follow_the_poisson_over_10000_draws():
    """Cut lengths sum to the budget exactly. Lengths: three budgets of 10,000 words give
    ~3,300 draws each; all but the last (cut to the budget) are Poisson(3) draws, the
    stopping rule biasing only the last few; tolerance 4 binomial std per length."""
    rng, probabilities = np.random.default_rng(0), poisson_lengths(3.0)
    for _ in range(1000):
        count = int(rng.integers(1, 40))
        lengths = span_lengths(count, probabilities, rng)
        assert lengths.sum() == count and (lengths >= 0).all() and lengths[-1] >= 1
    drawn = np.concatenate([span_lengths(10_000, probabilities, rng)[:-1] for _ in range(3)])
    assert len(drawn) >= 9_900
    counts = np.bincount(drawn, minlength=len(probabilities))
    for k in range(10):
        assert abs(counts[k] / len(drawn) - probabilities[k]) <= four_binomial_std(probabilities[k], len(drawn)), k


def covered_positions(corrupted: np.ndarray) -> np.ndarray:
    """bool [40]: the positions of TEXT missing from `corrupted` (masked or deleted)."""
    kept = np.isin(TEXT, corrupted)
    return ~kept


def test_spans_cover_whole_words_and_leave_the_rest_in_order():
    spanner, rng = leaf(random_ratio=0.0), np.random.default_rng(1)
    starts = VOCAB.word_start[TEXT].copy()
    starts[0] = True
    for _ in range(2000):
        corrupted, inserts = spanner.infill(TEXT.copy(), rng)
        kept = corrupted[corrupted != MASK]
        assert np.isin(kept, TEXT).all() and (np.diff(np.searchsorted(TEXT, kept)) > 0).all()
        covered = covered_positions(corrupted)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], covered.astype(int), [0]])))
        assert starts[edges[::2]].all()  # a covered run starts at a word start ...
        assert np.append(starts, True)[edges[1::2]].all()  # ... and ends where a word ends
        assert (corrupted == MASK).sum() >= len(edges) // 2  # a [MASK] per span (touching spans keep one each)
        budget = math.ceil(0.3 * starts.sum())  # words
        assert starts[covered].sum() <= budget and 0 <= inserts <= budget


def test_the_masked_share_and_random_spans_over_10000_draws():
    """Token-level (whole_word off) on 40 tokens: the spans' budget is ceil(0.3 x 40) =
    12 tokens; overlapping spans merge, so the covered share lies a little under 0.3
    (0.268 at this seed; bound 0.26).
    Random spans: one in ten of the spans left is a random token; one that happens to be
    in TEXT (q = 40 / ordinary ids) passes for kept text, so the share seen is
    0.1 (1 - q) / (1 - 0.1 q) (4 binomial std)."""
    spanner, rng = leaf(whole_word=False), np.random.default_rng(2)
    shares, spans, randoms = [], 0, 0
    for _ in range(10_000):
        corrupted, _ = spanner.infill(TEXT.copy(), rng)
        covered = covered_positions(corrupted)
        shares.append(covered.sum() / 40)
        heads = np.flatnonzero(~np.isin(corrupted, TEXT))
        spans += len(heads)
        randoms += int((corrupted[heads] != MASK).sum())
    assert max(shares) <= 0.3 and 0.26 <= np.mean(shares) < 0.3
    q = len(TEXT) / len(VOCAB.ordinary_ids)
    expected = 0.1 * (1 - q) / (1 - 0.1 * q)
    assert abs(randoms / spans - expected) <= four_binomial_std(expected, spans)


def test_sentences_are_permuted_uniformly_over_6000_draws():
    """Three sentences, permute_sentences 1: all 6 orders, each near 1/6 (4 std)."""
    spanner, rng = leaf(), np.random.default_rng(3)
    orders = {}
    for _ in range(6000):
        permuted = spanner.permute(TEXT[:9], np.array([0, 3, 6]), rng)
        order = tuple(int(np.searchsorted(TEXT, permuted[i])) // 3 for i in (0, 3, 6))
        assert permuted.tolist() == [t for s in order for t in TEXT[3 * s: 3 * s + 3]]
        orders[order] = orders.get(order, 0) + 1
    assert len(orders) == 6
    for count in orders.values():
        assert abs(count / 6000 - 1 / 6) <= four_binomial_std(1 / 6, 6000)
    assert spanner.permute(TEXT[:9], np.array([0]), rng).tolist() == TEXT[:9].tolist()


def test_insertions_go_between_the_first_and_last_tokens():
    source = np.array([BOS, *TEXT[:10], EOS])
    rng, places = np.random.default_rng(4), np.zeros(16, int)
    for _ in range(2000):
        out = leaf(random_ratio=0.0).insert(source, 4, rng)
        assert len(out) == 16 and (out == MASK).sum() == 4 and out[out != MASK].tolist() == source.tolist()
        places += out == MASK
        out = leaf().insert(source, 4, rng)  # ceil(4 x 0.1) = 1 random, 3 [MASK]
        assert len(out) == 16 and (out == MASK).sum() == 3 and out[0] == BOS and out[-1] == EOS
    assert places[0] == places[-1] == 0 and (places[1:-1] > 0).all()


def test_every_example_fits_the_row_its_budget_is_for():
    rng = np.random.default_rng(5)
    for seq_len in (32, 64, 128):
        budget = leaf().text_budget(seq_len)
        for _ in range(300):
            tokens = VOCAB.ordinary_ids[rng.integers(0, len(VOCAB.ordinary_ids), budget)]
            example = leaf()(TextChunk(tokens, np.array([0, budget // 3, budget // 2])), rng)
            assert len(example) <= seq_len
            assert example.targets[example.weights > 0].tolist() == [*tokens, EOS]  # the text as it was


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"bart.mask_ratio=1.5 must lie in \[0, 1\]"):
        leaf(mask_ratio=1.5)
    with pytest.raises(ValueError, match=r"bart.poisson_lambda=0 must be > 0"):
        leaf(poisson_lambda=0)
