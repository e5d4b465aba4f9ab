"""ELECTRA: replaced token detection (Clark et al., 2020; google-research/electra).

A small masked-LM generator fills the masked positions of `[CLS] text [SEP]` with
tokens it samples; the body (the discriminator) reads the result and predicts, for
every token, whether it was replaced. The loss is the generator's MLM loss +
50 x the discriminator's binary loss, and only the discriminator is the body that
fine-tunes and exports (`ElectraForPreTraining`).

The example says it in fields, so the body and the packer need nothing new:
`inputs` is the masked text (of the predicted tokens, 85% become [MASK] and the rest
stay, as `pretrain_helpers.mask` does), `targets` the original text at every position,
and `weights` zero everywhere (the body predicts no token through the vocabulary).
Two loss terms carry the rest:

- `generator` (head `generator`): a uniform draw at each predicted position
  (`objectives.terms.uniform_draws`); the head runs the generator there, takes its
  MLM loss against `targets`, samples a token with the draw and writes it into
  `inputs` before the body runs.
- `replaced` (head `replaced_token`): 1 at every token of the example; the head
  predicts `inputs != targets` (a sampled token equal to the original counts as
  original, as ELECTRA's labels do) with a sigmoid loss over every token.

`uniform_generator=True` is the code's ablation of that name: the predicted tokens are
replaced by ordinary tokens drawn uniformly (a draw equal to the original counts as
original), there is no generator and only the `replaced` term.

The generator is a quarter of the discriminator's width (ELECTRA's
`generator_hidden_size=0.25`) with as many layers, sharing its token, position and
type embeddings and their LayerNorm (`untied_generator_embeddings=False`); see
`pretrain.heads.generator`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from objectives import noise
from objectives.example import PREFIX, Example, TextChunk, make_example
from objectives.mlm import bidirectional_prediction_positions
from objectives.registry import Objective, register
from objectives.terms import LossTerm, uniform_draws
from objectives.vocab import Vocabulary

GENERATOR_DRAWS = "generator_draws"
DISCRIMINATED = "discriminated"


@dataclasses.dataclass(frozen=True)
class ElectraConfig:
    """Settings of ELECTRA (defaults from google-research/electra's configure_pretraining.py)."""

    mask_rate: float = 0.15  # mask_prob: fraction of ordinary tokens the generator predicts and replaces
    max_predictions: int = 80  # cap per example (ELECTRA: (mask_prob + 0.005) x max_seq_length, 19 at 128)
    mask_token_rate: float = 0.85  # of the predicted tokens, replaced by [MASK]; the rest keep their token
    generator_weight: float = 1.0  # gen_weight: the generator's MLM loss
    discriminator_weight: float = 50.0  # disc_weight: the replaced-token-detection loss
    # ELECTRA's `uniform_generator` ablation: the predicted tokens are replaced by ordinary tokens drawn uniformly
    # on the host, so the example is final as written (no generator term, no generator head)
    uniform_generator: bool = False


def generator_term(config: ElectraConfig) -> LossTerm:
    """The generator's MLM term: its field holds a uniform draw at each predicted token."""
    return LossTerm("generator", head="generator", fields=((GENERATOR_DRAWS, 0),), weight=config.generator_weight)


def replaced_term(config: ElectraConfig) -> LossTerm:
    """The discriminator's term: its field marks every token the body classifies."""
    return LossTerm("replaced", head="replaced_token", fields=((DISCRIMINATED, 0),),
                    weight=config.discriminator_weight)


class Electra(Objective):
    """ELECTRA's replaced token detection (see module docstring)."""

    attention_kinds = frozenset({PREFIX})
    special_tokens = frozenset({"[CLS]", "[SEP]", "[MASK]"})
    held_out_term = "replaced"

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary, config: ElectraConfig):
        super().__init__(name, objective_id, vocab)
        if not 0 < config.mask_rate < 1:
            raise ValueError(f"objectives.electra.mask_rate={config.mask_rate!r} must lie in (0, 1)")
        self.config = config
        # uniform replacements: every predicted token is drawn anew (ELECTRA's sampler never leaves a [MASK])
        self.rule = noise.ReplacementRule(0.0, 1.0) if config.uniform_generator else \
            noise.ReplacementRule(config.mask_token_rate, 0.0)
        # the generator's term runs first: it writes the inputs the body and the discriminator read
        self.loss_terms = ((replaced_term(config),) if config.uniform_generator
                           else (generator_term(config), replaced_term(config)))

    def text_budget(self, seq_len: int) -> int:
        return seq_len - 2

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        config = self.config
        tokens = np.concatenate([[self.vocab.cls], chunk.tokens, [self.vocab.sep]]).astype(np.int32)
        positions = bidirectional_prediction_positions(tokens, self.vocab, rng, mask_rate=config.mask_rate,
                                                       max_predictions=config.max_predictions, whole_word=False)
        extras = {DISCRIMINATED: np.ones(len(tokens), np.int32)}
        if not config.uniform_generator:
            extras[GENERATOR_DRAWS] = np.zeros(len(tokens), np.int32)
            extras[GENERATOR_DRAWS][positions] = uniform_draws(rng, len(positions))
        return make_example(
            inputs=noise.replace_tokens(tokens, positions, rng, self.vocab, self.rule),
            targets=tokens,
            weights=np.zeros(len(tokens), np.float32),
            positions=np.arange(len(tokens)),
            attention_kind=PREFIX,
            token_types=np.zeros(len(tokens), np.int32),
            objective_id=self.objective_id,
            extras=extras,
        )


@register("electra", ElectraConfig)
def build_electra(config: ElectraConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    return [(Electra("electra", first_id, vocab, config), 1.0)]
