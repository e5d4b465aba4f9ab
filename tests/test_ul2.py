"""UL2's mixture of denoisers: its leaves and rates, the paradigm token opening every
input, each denoiser being span corruption or prefix LM at its settings, and the
denoiser shares over 10,000 draws."""

import math

import numpy as np
import pytest

import objectives
from objectives.example import L2R, PREFIX, TextChunk

VOCAB = objectives.Vocabulary.reserved(400, sentinels=100)
NLU, NLG, S2S = (VOCAB.token(name) for name in ("[NLU]", "[NLG]", "[S2S]"))
NAMES = ["ul2/r3_0.15", "ul2/r8_0.15", "ul2/x3_0.5", "ul2/x8_0.5", "ul2/x64_0.15", "ul2/x64_0.5", "ul2/s"]


def mixture(**settings):
    return objectives.build_mixture("ul2", VOCAB, {"ul2": settings})


def test_seven_denoisers_at_the_papers_rates():
    ul2 = mixture()
    assert list(ul2.names) == NAMES
    np.testing.assert_allclose(ul2.rates, [0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2])
    np.testing.assert_allclose(mixture(r_rate=2 / 7, x_rate=4 / 7, s_rate=1 / 7).rates, [1 / 7] * 7)  # appendix code
    assert list(mixture(s_rate=0).names) == NAMES[:-1]


@pytest.mark.parametrize("name, token", list(zip(NAMES, [NLU, NLU, NLG, NLG, NLG, NLG, S2S])))
def test_the_paradigm_token_opens_the_input_and_the_rest_is_the_base_denoiser(name, token):
    """The same draws give the base objective's example with its first token replaced."""
    leaf = dict(zip(mixture().names, mixture().objectives))[name]
    if name == "ul2/s":
        base = objectives.build_mixture("prefix_lm", VOCAB).objectives[0]
    else:
        mean, density = name.split("/")[1][1:].split("_")
        base = objectives.build_mixture("span_corruption", VOCAB, {"span_corruption": {
            "mean_noise_span_length": float(mean), "noise_density": float(density)}}).objectives[0]
    chunk = TextChunk(VOCAB.ordinary_ids[np.arange(40)])
    for seed in range(20):
        ours, theirs = leaf(chunk, np.random.default_rng(seed)), base(chunk, np.random.default_rng(seed))
        assert ours.inputs[0] == token and theirs.inputs[0] != token
        if name == "ul2/s":  # the mode token takes [BOS]'s place
            assert theirs.inputs[0] == VOCAB.bos
            assert ours.inputs[1:].tolist() == theirs.inputs[1:].tolist()
        else:  # the mode token is prepended, the rest shifted by one
            assert ours.inputs[1:].tolist() == theirs.inputs.tolist()[: len(ours) - 1]
        assert ours.attention_kind[0] == PREFIX and set(ours.attention_kind.tolist()) == {PREFIX, L2R}
        assert ours.weights.sum() == theirs.weights.sum()


def test_without_paradigm_tokens_the_inputs_are_the_base_denoisers():
    ul2 = mixture(paradigm_tokens=False)
    chunk = TextChunk(VOCAB.ordinary_ids[np.arange(40)])
    for leaf in ul2.objectives:
        assert leaf(chunk, np.random.default_rng(0)).inputs[0] not in (NLU, NLG, S2S)


def test_denoisers_are_drawn_at_their_rates_over_10000_draws():
    """Tolerance: 4 binomial standard deviations per denoiser."""
    ul2, rng = mixture(), np.random.default_rng(0)
    drawn = [ul2.choose(rng).name for _ in range(10_000)]
    for name, rate in zip(ul2.names, ul2.rates):
        share = drawn.count(name) / len(drawn)
        assert abs(share - rate) <= 4 * math.sqrt(rate * (1 - rate) / len(drawn)), name


def test_bad_rates_and_missing_tokens_are_refused():
    with pytest.raises(ValueError, match="ul2 rates r_rate=-0.1"):
        mixture(r_rate=-0.1)
    with pytest.raises(ValueError, match=r"the tokenizer has no \[S0\] token and objective 'ul2/r3_0.15' needs it"):
        objectives.build_mixture("ul2", objectives.Vocabulary.reserved(400, sentinels=0))
