"""T5's span corruption: the exact input and target of a hand-written mask, T5's length
arithmetic, and the noise mask's statistics over 10,000 draws."""

from math import comb

import numpy as np
import pytest

import objectives
from objectives.example import L2R, PREFIX, TextChunk
from objectives.span_corruption import noise_counts, random_spans_helper, random_spans_noise_mask

VOCAB = objectives.Vocabulary.reserved(300, sentinels=100)
S = VOCAB.sentinels
EOS, BOS = VOCAB.eos, VOCAB.bos


def leaf(**settings):
    return objectives.build_mixture("span_corruption", VOCAB, {"span_corruption": settings}).objectives[0]


def test_a_hand_written_mask_gives_t5s_input_and_target():
    tokens = np.arange(200, 212)  # t0..t11
    mask = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1], bool)
    source, target = leaf().corrupt(tokens, mask)
    assert source.tolist() == [200, 201, 202, 203, S[0], 205, 206, 207, 208, 209, S[1], EOS]
    assert target.tolist() == [S[0], 204, S[1], 210, 211, EOS]
    example = leaf()._row(source, target)
    assert example.inputs.tolist() == [*source, BOS, S[0], 204, S[1], 210, 211]
    assert example.targets.tolist() == [0] * 12 + [S[0], 204, S[1], 210, 211, EOS]
    assert example.weights.tolist() == [0] * 12 + [1] * 6
    assert example.attention_kind.tolist() == [PREFIX] * 12 + [L2R] * 6
    assert example.token_types.tolist() == [0] * 12 + [1] * 6
    assert example.positions.tolist() == list(range(18))


@pytest.mark.parametrize("mean, density, raw, targets", [(3, 0.15, 568, 114), (8, 0.15, 588, 100), (3, 0.5, 766, 512),
                                                         (8, 0.5, 908, 512), (64, 0.15, 600, 92), (64, 0.5, 1006, 512)])
def test_lengths_are_worked_out_as_t5s_random_spans_helper(mean, density, raw, targets):
    """T5's table for an input length of 512 (each value checked against its code's loop)."""
    assert random_spans_helper(512, density, mean) == (raw, targets)


def test_a_row_holds_the_largest_chunk_that_fits():
    for seq_len in (16, 64, 128, 512):
        budget = leaf().text_budget(seq_len)
        fits = [len(leaf()(TextChunk(np.arange(110, 110 + budget)), np.random.default_rng(s))) for s in range(20)]
        assert max(fits) <= seq_len
        noise, spans = noise_counts(budget + 1, 0.15, 3.0)
        assert budget + 1 + 2 * spans + 2 > seq_len  # one more token would not fit
    assert leaf().text_budget(128) == 114  # 17 noise tokens in 6 spans: 114 + 2 x 6 + 2 = 128; 115 needs 129


def test_the_noise_mask_statistics_over_10000_draws():
    """L=100, d=0.15, mean 3: exactly 15 noise tokens in 5 spans in every draw, starting
    with non-noise and ending with noise; span lengths follow the uniform composition's
    marginal P(k) = C(n-k-1, m-2) / C(n-1, m-1) (tolerance 4 binomial std)."""
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(10_000):
        mask = random_spans_noise_mask(100, 0.15, 3.0, rng)
        assert mask.sum() == 15 and not mask[0] and mask[-1]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        spans = edges[1::2] - edges[::2]
        assert len(spans) == 5
        lengths.extend(spans.tolist())
    assert np.mean(lengths) == 3.0
    counts = np.bincount(lengths, minlength=12)
    for k in range(1, 12):
        expected = comb(15 - k - 1, 5 - 2) / comb(15 - 1, 5 - 1)
        assert abs(counts[k] / len(lengths) - expected) <= 4 * np.sqrt(expected * (1 - expected) / len(lengths)), k


def test_sentinels_come_in_order_and_the_spans_splice_back():
    rng = np.random.default_rng(1)
    for _ in range(200):
        example = leaf(noise_density=0.3, mean_noise_span_length=2)(TextChunk(np.arange(200, 260)), rng)
        source = example.inputs[example.attention_kind == PREFIX]
        used = [t for t in source.tolist() if t in S]
        assert used == list(S[: len(used)])
        target = example.targets[example.weights > 0]
        assert [t for t in target.tolist() if t in S] == used
        masked = np.where(np.isin(source[:-1], S), VOCAB.mask, source[:-1])
        assert leaf().splice(masked, target).tolist() == list(range(200, 260))


def test_a_tokenizer_without_sentinels_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"the tokenizer has no \[S0\] token and objective 'span_corruption' needs "
                                         r"it: train a new tokenizer"):
        objectives.build_mixture("span_corruption", objectives.Vocabulary(300))
