"""SpanBERT's span masking: the exact layout, the merge rule, the budget, whole words,
and its statistics (geometric lengths, 80/10/10 per span) over 10,000 draws."""

import math

import numpy as np
import pytest

import objectives
from objectives.example import PREFIX, TextChunk
from objectives.spanbert import merge_spans, span_length_probabilities

VOCAB = objectives.Vocabulary.reserved(300, sentinels=0, word_start=np.arange(300) % 3 == 0)
CLS, SEP, MASK = VOCAB.cls, VOCAB.sep, VOCAB.mask


def leaf(**settings):
    return objectives.build_mixture("spanbert", VOCAB, {"spanbert": settings}).objectives[0]


def four_binomial_std(expected: float, draws: int) -> float:
    return 4 * math.sqrt(expected * (1 - expected) / draws)


def test_the_example_is_cls_text_sep_predicting_exactly_the_masked_tokens():
    text = np.arange(201, 221)  # 20 tokens: ceil(0.15 x 20) = 3 masked
    example = leaf(mask_token_rate=1.0, random_token_rate=0.0)(TextChunk(text), np.random.default_rng(0))
    masked = example.weights[1:-1] > 0
    assert example.targets.tolist() == [CLS, *text, SEP]
    assert example.weights[0] == example.weights[-1] == 0 and masked.sum() == 3
    assert example.inputs.tolist() == [CLS, *np.where(masked, MASK, text), SEP]
    assert example.attention_kind.tolist() == [PREFIX] * 22 and example.token_types.tolist() == [0] * 22
    assert example.positions.tolist() == list(range(22))


def test_spans_that_overlap_or_touch_merge():
    assert merge_spans([(5, 7), (0, 2), (2, 3), (6, 9), (11, 12)]) == [(0, 3), (5, 9), (11, 12)]


def test_the_length_distribution_is_the_clipped_geometric_of_mean_3_8():
    probabilities = span_length_probabilities(0.2, 10)
    expected = np.array([0.2 * 0.8 ** (k - 1) for k in range(1, 11)])
    np.testing.assert_allclose(probabilities, expected / expected.sum())
    assert round(float(probabilities @ np.arange(1, 11)), 3) == 3.797  # the paper's "mean 3.8"


def test_every_draw_masks_the_budget_in_spans_of_whole_words():
    """Spans start at word starts; only the span the budget cuts may end inside a word."""
    rng = np.random.default_rng(0)
    spanbert = leaf()
    for _ in range(2000):
        length = int(rng.integers(5, 120))
        text = VOCAB.ordinary_ids[rng.integers(0, len(VOCAB.ordinary_ids), length)]
        masked, spans = spanbert.spans(text, rng)
        assert masked.sum() == math.ceil(0.15 * length)
        starts = VOCAB.word_start[text].copy()
        starts[0] = True
        word_ends = np.append(starts[1:], True)  # True where a word ends at this token
        assert all(starts[start] for start, _ in spans)
        assert sum(not word_ends[end - 1] for _, end in spans) <= 1
        covered = np.zeros(length, bool)
        for start, end in spans:
            covered[start:end] = True
        assert (covered == masked).all()


def test_span_lengths_follow_the_clipped_geometric_over_10000_draws():
    """Token-level spans (whole_word off) in a 1000-token text: every span not cut by the
    budget or the text's end has the length drawn; tolerance 4 binomial std per length."""
    rng = np.random.default_rng(1)
    spanbert, lengths = leaf(whole_word=False), []
    text = VOCAB.ordinary_ids[np.arange(1000) % len(VOCAB.ordinary_ids)]
    while len(lengths) < 10_000:
        _, spans = spanbert.spans(text, rng)
        lengths.extend(end - start for start, end in spans[:-1] if end < len(text))  # the last is cut by the budget
    counts = np.bincount(lengths, minlength=12)
    assert counts[0] == counts[11] == 0
    for k, p in enumerate(span_length_probabilities(0.2, 10), start=1):
        assert abs(counts[k] / len(lengths) - p) <= four_binomial_std(p, len(lengths)), k


def test_each_merged_span_is_masked_replaced_or_kept_as_a_whole_80_10_10():
    rng = np.random.default_rng(2)
    spanbert, outcomes = leaf(), {"mask": 0, "random": 0, "kept": 0}
    text = VOCAB.ordinary_ids[np.arange(60) % len(VOCAB.ordinary_ids)]
    while sum(outcomes.values()) < 10_000:
        example = spanbert(TextChunk(text), rng)
        inputs, masked = example.inputs[1:-1], example.weights[1:-1] > 0
        edges = np.flatnonzero(np.diff(np.concatenate([[0], masked.astype(int), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            span = inputs[start:end]
            if (span == MASK).all():
                outcomes["mask"] += 1
            elif (span == text[start:end]).all():
                outcomes["kept"] += 1
            else:
                assert not (span == MASK).any() and not VOCAB.is_special(span).any()
                outcomes["random"] += 1
    total = sum(outcomes.values())
    for name, p in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        # a random token equals the original 1 time in ~290, well inside the tolerance
        assert abs(outcomes[name] / total - p) <= four_binomial_std(p, total) + 0.001, (name, outcomes)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"spanbert.geometric_p=0 must lie in \(0, 1\]"):
        leaf(geometric_p=0)
    with pytest.raises(ValueError, match="whole-word masking needs the vocabulary's word_start table"):
        objectives.build_mixture("spanbert", objectives.Vocabulary(300)).objectives[0](
            TextChunk(np.arange(200, 220)), np.random.default_rng(0))
