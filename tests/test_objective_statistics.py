"""Sampling statistics of the objectives over many draws, with fixed seeds.

Every rate is checked against its exact probability with a tolerance of Z = 5 standard
errors of a binomial proportion, sqrt(p (1 - p) / n), computed from p and the number
of trials n in the test. A correct sampler fails one such check with probability
about 6e-7 per seed; the seeds are fixed, so the suite is deterministic anyway.
Counts that the definitions make exact (how many tokens are predicted, how long a
MASS span is, which ids a random replacement can take) are checked with zero
tolerance on every draw.
"""

import functools
import math

import numpy as np
import pytest

from objectives import TextChunk, Vocabulary, build_mixture, noise
from objectives.vocab import MASK_ID, NUM_SPECIAL_TOKENS

Z = 5.0  # tolerance in standard errors
DRAWS = 10_000


def binomial_tolerance(p: float, n: int) -> float:
    """Z standard errors of the proportion of successes in n trials of probability p."""
    return Z * math.sqrt(p * (1.0 - p) / n)


def assert_rate(successes, n, p, what):
    tolerance = binomial_tolerance(p, n)
    observed = successes / n
    assert abs(observed - p) <= tolerance, (
        f"{what}: observed {observed:.5f} over {n} trials, expected {p:.5f} +- {tolerance:.5f}")


def half_up_count(n: int, rate_percent: int, cap: int) -> int:
    """min(cap, max(1, round_half_up(rate * n))) in exact integer arithmetic."""
    return min(cap, max(1, (rate_percent * n + 50) // 100))


# ---------------------------------------------------------------------------------------
# MLM


@pytest.mark.parametrize("max_predictions", [80, 4])
def test_mlm_prediction_count_is_exact_on_every_draw(max_predictions):
    # Lengths 1..59 cover round-half-up cases (0.15 * 10 = 1.5 -> 2, 0.15 * 30 = 4.5 -> 5)
    # and, with max_predictions=4, the cap. Zero tolerance.
    vocab = Vocabulary(size=100)
    objective = build_mixture("mlm", vocab, {"mlm": {"max_predictions": max_predictions}}).objectives[0]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, DRAWS)
    for n in lengths.tolist():
        ex = objective(TextChunk(np.arange(n) % 90 + 8), rng)
        assert ex.weights.sum() == half_up_count(n, 15, max_predictions), n
    assert set(lengths.tolist()) == set(range(1, 60))


def test_mlm_per_token_prediction_rate():
    # 40 ordinary tokens -> exactly 6 = 0.15 * 40 predictions per example, so the pooled
    # rate is exactly 0.15; each position must be chosen with marginal probability
    # 0.15 (uniform choice among candidates), checked per position over DRAWS examples.
    vocab = Vocabulary(size=100)
    objective = build_mixture("mlm", vocab).objectives[0]
    rng = np.random.default_rng(1)
    chunk = TextChunk(np.arange(50, 90))
    weights = np.stack([objective(chunk, rng).weights for _ in range(DRAWS)])
    assert weights.sum() == 6 * DRAWS
    assert weights[:, [0, -1]].sum() == 0  # [CLS], [SEP]
    for position, hits in enumerate(weights[:, 1:-1].sum(axis=0), start=1):
        assert_rate(hits, DRAWS, 0.15, f"prediction rate at position {position}")


VOCABS = {
    # 93 ordinary ids: a random replacement rarely equals the original.
    "V100": Vocabulary(size=100),
    # Ids 0..6 special plus the user's extra specials 7 and 8: 4 ordinary ids (9..12), so
    # a random replacement equals the original 1 time in 4.
    "V13+extras": Vocabulary(size=13, extra_special_ids=(7, 8)),
}


@functools.lru_cache(maxsize=None)
def corrupted_tokens(name, vocab_name):
    """(original, corrupted) ids at every position the objective corrupted over DRAWS
    examples (MLM and UniLM: the weighted positions; MASS: the encoder span), checking on
    the way that nothing else was changed. Cached: two tests read the same draws."""
    vocab = VOCABS[vocab_name]
    objective = build_mixture(name, vocab).objectives[0]  # UniLM: its bidirectional mode
    ordinary = vocab.ordinary_ids
    text = ordinary[np.arange(20) % len(ordinary)]
    chunk = TextChunk(text, sentence_starts=[0, 8])
    rng = np.random.default_rng(2)
    original, corrupted = [], []
    for _ in range(DRAWS):
        ex = objective(chunk, rng)
        if name == "mass":
            n = len(text)
            u = int(ex.positions[n]) + 1
            span = np.arange(u, u + len(ex) - n)
            untouched = np.setdiff1d(np.arange(n), span)
            np.testing.assert_array_equal(ex.inputs[untouched], text[untouched])
        else:
            span = np.flatnonzero(ex.weights)
            np.testing.assert_array_equal(ex.inputs[ex.weights == 0], ex.targets[ex.weights == 0])
        original.append(ex.targets[span])
        corrupted.append(ex.inputs[span])
    return np.concatenate(original), np.concatenate(corrupted)


@pytest.mark.parametrize("name", ["mlm", "mass", "unilm"])
@pytest.mark.parametrize("vocab_name", list(VOCABS))
def test_80_10_10_replacement_split(name, vocab_name):
    # Of corrupted tokens: 0.8 [MASK]; 0.1 a uniform random ordinary id, which equals
    # the (ordinary) original with probability 1/O for O ordinary ids; 0.1 kept. So the
    # input equals the original w.p. 0.1 + 0.1 / O and is another id w.p. 0.1 (1 - 1/O).
    # With O = 4 the coincidence moves the "kept" rate from 0.100 to 0.125, over 10
    # standard errors here, so the test tells the two apart.
    vocab = VOCABS[vocab_name]
    ordinary = len(vocab.ordinary_ids)
    original, corrupted = corrupted_tokens(name, vocab_name)
    total = len(original)
    assert total >= 3 * DRAWS
    masked = corrupted == MASK_ID
    kept = corrupted == original
    replaced = ~masked & ~kept
    assert_rate(masked.sum(), total, 0.8, "[MASK]")
    assert_rate(kept.sum(), total, 0.1 + 0.1 / ordinary, "kept (incl. random == original)")
    assert_rate(replaced.sum(), total, 0.1 * (1 - 1 / ordinary), "random != original")
    # Random replacements are uniform over the ordinary ids: among the tokens replaced
    # by another id, each ordinary id other than the original appears w.p. 1/(O - 1);
    # checked for every (original, replacement) pair.
    if ordinary < 10:
        for source in vocab.ordinary_ids:
            picks = corrupted[replaced & (original == source)]
            for target in vocab.ordinary_ids[vocab.ordinary_ids != source]:
                assert_rate((picks == target).sum(), len(picks), 1 / (ordinary - 1),
                            f"replacement {source} -> {target}")


@pytest.mark.parametrize("name", ["mlm", "mass", "unilm"])
@pytest.mark.parametrize("vocab_name", list(VOCABS))
def test_random_replacements_are_never_special(name, vocab_name):
    # Zero tolerance over every draw: whatever the objective changes becomes [MASK] or an
    # ordinary id, never one of the special ids 0..6 nor a user's extra special id.
    vocab = VOCABS[vocab_name]
    special = np.flatnonzero(vocab.is_special(np.arange(vocab.size)))
    assert set(special.tolist()) >= set(range(NUM_SPECIAL_TOKENS))
    original, corrupted = corrupted_tokens(name, vocab_name)
    changed = corrupted[corrupted != original]
    random_ids = changed[changed != MASK_ID]
    assert len(random_ids) > 0
    assert not np.isin(random_ids, special).any()
    assert not vocab.is_special(original).any()  # only ordinary tokens are corrupted
    if vocab_name == "V13+extras":
        assert set(special.tolist()) == set(range(9))
        assert set(random_ids.tolist()) == {9, 10, 11, 12}  # every ordinary id is drawn


def test_nsp_negative_rate():
    vocab = Vocabulary(size=100)
    objective = build_mixture("mlm", vocab, {"mlm": {"nsp": True}}).objectives[0]
    chunk = TextChunk(np.arange(50, 70), sentence_starts=[0, 8], other_document=np.arange(80, 100))
    rng = np.random.default_rng(4)
    labels = np.asarray([objective(chunk, rng).extras["nsp_labels"][0] for _ in range(DRAWS)])
    assert set(labels.tolist()) == {0, 1}
    assert_rate((labels == 1).sum(), DRAWS, 0.5, "NSP negatives")


# ---------------------------------------------------------------------------------------
# UniLM


def test_unilm_mode_rates():
    mixture = build_mixture("unilm", Vocabulary(size=100))
    rng = np.random.default_rng(5)
    draws = 6 * DRAWS
    chosen = np.asarray([mixture.choose(rng).objective_id for _ in range(draws)])
    for index, p in enumerate([1 / 3, 1 / 3, 1 / 6, 1 / 6]):
        assert_rate((chosen == index).sum(), draws, p, mixture.names[index])


def test_span_length_draws():
    # draw_span_length(rng, 0.2, 3): 1 w.p. 0.8, else uniform over {2, 3}, i.e. 0.1 each;
    # among spans (length >= 2), 2 and 3 are half and half.
    rng = np.random.default_rng(6)
    draws = 5 * DRAWS
    lengths = np.asarray([noise.draw_span_length(rng, 0.2, 3) for _ in range(draws)])
    assert set(lengths.tolist()) == {1, 2, 3}
    assert_rate((lengths == 1).sum(), draws, 0.8, "single tokens")
    assert_rate((lengths == 2).sum(), draws, 0.1, "bigrams")
    assert_rate((lengths == 3).sum(), draws, 0.1, "trigrams")
    spans = lengths[lengths > 1]
    assert_rate((spans == 2).sum(), len(spans), 0.5, "bigrams among spans")
    assert all(noise.draw_span_length(rng, 1.0, 1) == 1 for _ in range(100))  # max_span 1


@pytest.mark.parametrize("text_length", [20, 33])
def test_unilm_masks_15_percent_of_ordinary_tokens(text_length):
    # Every mode masks exactly round_half_up(0.15 * ordinary) tokens (20 -> 3, a fraction
    # of exactly 0.15; 33 -> round(4.95) = 5), all ordinary; zero tolerance per draw.
    # Draws go through the mixture, so all four modes are covered.
    vocab = Vocabulary(size=100)
    mixture = build_mixture("unilm", vocab)
    chunk = TextChunk(np.arange(50, 50 + text_length), sentence_starts=[0, 8])
    rng = np.random.default_rng(7)
    expected = half_up_count(text_length, 15, 80)
    masked_total = ordinary_total = 0
    modes = np.zeros(4, int)
    for _ in range(DRAWS):
        ex = mixture(chunk, rng)
        masked = ex.weights == 1
        ordinary = ~vocab.is_special(ex.targets)
        assert masked.sum() == expected
        assert not (masked & ~ordinary).any()
        masked_total += masked.sum()
        ordinary_total += ordinary.sum()
        modes[ex.objective_id[0]] += 1
    assert (modes > 0).all()
    assert masked_total == expected * DRAWS and ordinary_total == text_length * DRAWS
    if text_length == 20:
        assert masked_total / ordinary_total == 0.15


# ---------------------------------------------------------------------------------------
# MASS


def test_mass_span_length_is_exact():
    # k = round(0.5 n) with Python's round (half to even, as MASS's code), kept in
    # 1..n-1, for every n, whatever the seed: 3 -> 2 (round(1.5)), 5 -> 2 (round(2.5)).
    objective = build_mixture("mass", Vocabulary(size=100)).objectives[0]
    rng = np.random.default_rng(8)
    assert [objective.span_length(n) for n in (2, 3, 5, 7, 9, 10)] == [1, 2, 2, 4, 4, 5]
    for n in range(2, 301):
        k = min(max(1, round(n / 2)), n - 1)
        for _ in range(3):
            ex = objective(TextChunk(np.arange(n) % 90 + 8), rng)
            assert len(ex) - n == k, n
            assert ex.weights.sum() == k


def test_mass_span_placement():
    # n = 10 -> k = 5, u in 1..5, as MASS's mask_start(end = n - k): 1 w.p. 0.2, the end
    # (5) w.p. 0.2, else randint(1, 5), uniform over 1..4 and never the end. So u == 1
    # w.p. 0.2 + 0.6 / 4 = 0.35, u == 5 w.p. 0.2, each of u in {2, 3, 4} w.p. 0.15.
    # u is read from the example: the decoder's first position is u - 1.
    objective = build_mixture("mass", Vocabulary(size=100)).objectives[0]
    n, k = 10, 5
    rng = np.random.default_rng(9)
    draws = 2 * DRAWS
    chunk = TextChunk(np.arange(50, 50 + n))
    u = np.asarray([int(objective(chunk, rng).positions[n]) + 1 for _ in range(draws)])
    assert u.min() >= 1 and u.max() <= n - k  # never the first token; zero tolerance
    uniform = 0.6 / (n - k - 1)
    assert_rate((u == 1).sum(), draws, 0.2 + uniform, "span at the start")
    assert_rate((u == n - k).sum(), draws, 0.2, "span at the end")
    for start in range(2, n - k):
        assert_rate((u == start).sum(), draws, uniform, f"span at u={start}")
    # With no start or end draws, the end is never drawn at all (zero tolerance).
    uniform_only = build_mixture("mass", Vocabulary(size=100), {"mass": {"start_rate": 0.0, "end_rate": 0.0}}).objectives[0]
    starts = {int(uniform_only(chunk, rng).positions[n]) + 1 for _ in range(DRAWS)}
    assert starts == {1, 2, 3, 4}


# ---------------------------------------------------------------------------------------
# Mixtures


def test_mixture_choice_rates():
    mixture = build_mixture("mlm:3,clm:1", Vocabulary(size=100))
    assert mixture.names == ("mlm", "clm")
    rng = np.random.default_rng(10)
    draws = 2 * DRAWS
    chosen = np.asarray([mixture.choose(rng).objective_id for _ in range(draws)])
    assert_rate((chosen == 0).sum(), draws, 0.75, "mlm")
    assert_rate((chosen == 1).sum(), draws, 0.25, "clm")
    # The examples a mixture makes carry the chosen leaf's id at the same rates.
    chunk = TextChunk(np.arange(50, 70))
    ids = np.asarray([mixture(chunk, rng).objective_id[0] for _ in range(DRAWS)])
    assert_rate((ids == 0).sum(), DRAWS, 0.75, "mlm examples")
