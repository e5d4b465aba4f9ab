"""T5's prefix LM: the exact row of a hand-written chunk, and the split's distribution."""

import numpy as np
import pytest

import objectives
from objectives.example import L2R, PREFIX, TextChunk

VOCAB = objectives.Vocabulary(100)


def leaf(**settings):
    return objectives.build_mixture("prefix_lm", VOCAB, {"prefix_lm": settings}).objectives[0]


class FixedSplit:
    """A generator whose integers() returns the given value (the split point)."""

    def __init__(self, value):
        self.value = value

    def integers(self, low, high):
        assert low <= self.value < high
        return self.value


def test_the_row_of_a_hand_written_chunk():
    example = leaf()(TextChunk([11, 12, 13, 14, 15]), FixedSplit(2))  # prefix 11 12, target 13 14 15
    assert example.inputs.tolist() == [2, 11, 12, 13, 14, 15]
    assert example.targets.tolist() == [11, 12, 13, 14, 15, 3]
    assert example.weights.tolist() == [0, 0, 1, 1, 1, 1]  # the last prefix position predicts 13
    assert example.attention_kind.tolist() == [PREFIX, PREFIX, PREFIX, L2R, L2R, L2R]
    assert example.token_types.tolist() == [0, 0, 0, 1, 1, 1]
    assert example.positions.tolist() == [0, 1, 2, 3, 4, 5]
    assert leaf().text_budget(128) == 127


@pytest.mark.parametrize("density, length, low, high", [(0.5, 11, 1, 10), (0.25, 101, 50, 100), (0.5, 2, 1, 1)])
def test_the_split_follows_t5s_rule_over_10000_draws(density, length, low, high):
    """Uniform over [max(1, round((1 - 2d)(L - 1))), L - 1]: every value drawn, each near
    its share (tolerance 4 binomial standard deviations)."""
    rng = np.random.default_rng(0)
    draws = np.array([leaf(noise_density=density).split(length, rng) for _ in range(10_000)])
    assert draws.min() == low and draws.max() == high
    counts = np.bincount(draws - low, minlength=high - low + 1)
    share = 1 / (high - low + 1)
    assert np.all(np.abs(counts / 10_000 - share) <= 4 * np.sqrt(share * (1 - share) / 10_000))
    assert abs(draws.mean() - (low + high) / 2) < 4 * draws.std() / 100 + 1e-9


def test_settings_out_of_t5s_range_are_refused():
    with pytest.raises(ValueError, match=r"prefix_lm.noise_density=0.7 must lie in \(0, 0.5\]"):
        leaf(noise_density=0.7)
