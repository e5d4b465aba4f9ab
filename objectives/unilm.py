"""UniLM's four language-modelling modes on one stack (Dong et al., 2019).

| mode          | rate | layout                      | attention kinds         | token types |
|---------------|------|-----------------------------|-------------------------|-------------|
| bidirectional | 1/3  | `[SOS] A [EOS] B [EOS]`     | all PREFIX              | 0 / 1       |
| seq2seq       | 1/3  | `[SOS] A [EOS] B [EOS]`     | source PREFIX, target L2R | 4 / 5     |
| left-to-right | 1/6  | `[SOS] A [EOS]`             | all L2R                 | 2           |
| right-to-left | 1/6  | `[SOS] A [EOS]`             | all R2L                 | 3           |

In every mode 15% of the ordinary tokens are masked (80% single tokens, 20% bigrams
or trigrams; each masked token corrupted by 80/10/10) and the loss is taken at the
masked positions only: a cloze task even in the unidirectional modes, where
position i predicts its own original token from what its kind lets it see. B is the
true continuation of A; the bidirectional mode may add NSP with random negatives.
Token types follow UniLM's `new_segment_ids` so the model can tell the modes apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from objectives import layout, noise
from objectives.example import L2R, PREFIX, R2L, Example, TextChunk, make_example
from objectives.layout import Prompt
from objectives.mlm import NSP_TERM, nsp_fields, sentence_pair
from objectives.registry import Objective, register
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class UniLMConfig:
    """Settings of UniLM pretraining (defaults from the paper)."""

    bidirectional_rate: float = 1 / 3
    seq2seq_rate: float = 1 / 3
    left_to_right_rate: float = 1 / 6
    right_to_left_rate: float = 1 / 6
    mask_rate: float = 0.15  # fraction of ordinary tokens masked and predicted
    max_predictions: int = 80  # cap on predictions per example
    span_rate: float = 0.2  # fraction of masking choices that are bigrams/trigrams
    max_span: int = 3  # longest masked span
    mask_token_rate: float = 0.8  # masked tokens replaced by [MASK]
    random_token_rate: float = 0.1  # ... by a random ordinary token (the rest stay)
    nsp: bool = False  # next-sentence prediction in the bidirectional mode
    nsp_negative_rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class ModeLayout:
    """How one UniLM mode lays out its segments."""

    pair: bool  # [SOS] A [EOS] B [EOS] rather than [SOS] A [EOS]
    first_kind: int  # attention kind of [SOS] A [EOS]
    second_kind: int  # attention kind of B [EOS]
    first_type: int  # token type of [SOS] A [EOS]
    second_type: int  # token type of B [EOS]


MODES: dict[str, ModeLayout] = {
    "bidirectional": ModeLayout(True, PREFIX, PREFIX, 0, 1),
    "seq2seq": ModeLayout(True, PREFIX, L2R, 4, 5),
    "left_to_right": ModeLayout(False, L2R, L2R, 2, 2),
    "right_to_left": ModeLayout(False, R2L, R2L, 3, 3),
}


class UniLMMode(Objective):
    """One UniLM mode (see module docstring)."""

    special_tokens = frozenset({"[BOS]", "[EOS]", "[MASK]"})

    def __init__(
        self, mode: str, objective_id: int, vocab: Vocabulary, config: UniLMConfig
    ):
        super().__init__(f"unilm/{mode}", objective_id, vocab)
        self.layout = MODES[mode]
        self.config = config
        self.rule = noise.ReplacementRule(config.mask_token_rate, config.random_token_rate)
        self.with_nsp = config.nsp and mode == "bidirectional"
        self.needs_other_document = self.whole_sentences = self.with_nsp
        self.loss_terms = (NSP_TERM,) if self.with_nsp else ()
        self.min_text_tokens = 2 if self.layout.pair else 1
        self.mode = mode
        self.attention_kinds = frozenset({self.layout.first_kind, self.layout.second_kind})
        self.token_types = frozenset({self.layout.first_type, self.layout.second_type})

    def generation_modes(self) -> tuple[str, ...]:
        return {"bidirectional": ("fill",), "seq2seq": ("seq2seq",)}.get(self.mode, ())

    def prompt(self, mode: str, tokens: np.ndarray, max_new_tokens: int) -> Prompt:
        """Seq2seq as UniLM decodes: `[SOS] source [EOS]` (PREFIX, type 4), then a [MASK]
        slot (L2R, type 5) at which each new token is predicted (its loss is a cloze loss)."""
        if mode != "seq2seq" or self.mode != "seq2seq":
            return super().prompt(mode, tokens, max_new_tokens)
        vocab, layout_ = self.vocab, self.layout
        return layout.prompt([([vocab.bos, *tokens, vocab.eos], layout_.first_kind, layout_.first_type),
                              ([vocab.mask], layout_.second_kind, layout_.second_type)],
                             next_position=len(tokens) + 2, target_type=layout_.second_type, cloze=True,
                             max_new_tokens=max_new_tokens)

    def fill_row(self, tokens: np.ndarray) -> dict[str, np.ndarray] | None:
        """The bidirectional mode: `[SOS] tokens [EOS]`, all PREFIX, type 0."""
        if self.mode != "bidirectional":
            return None
        return layout.row([([self.vocab.bos, *tokens, self.vocab.eos], PREFIX, self.layout.first_type)])

    def text_budget(self, seq_len: int) -> int:
        return seq_len - (3 if self.layout.pair else 2)

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        layout, config = self.layout, self.config
        nsp_label = None
        if layout.pair:
            negative_rate = config.nsp_negative_rate if self.with_nsp else 0.0
            first, second, label = sentence_pair(chunk, rng, negative_rate)
            nsp_label = label if self.with_nsp else None
            second = np.concatenate([second, [self.vocab.eos]])
        else:
            first, second = chunk.tokens, np.zeros(0, np.int32)
        first = np.concatenate([[self.vocab.bos], first, [self.vocab.eos]])
        tokens = np.concatenate([first, second]).astype(np.int32)
        candidates = np.flatnonzero(~self.vocab.is_special(tokens))
        count = noise.prediction_count(len(candidates), config.mask_rate, config.max_predictions)
        masked = noise.choose_spans(candidates, count, rng, config.span_rate, config.max_span)
        weights = np.zeros(len(tokens), np.float32)
        weights[masked] = 1.0
        return make_example(
            inputs=noise.replace_tokens(tokens, masked, rng, self.vocab, self.rule),
            targets=tokens,
            weights=weights,
            positions=np.arange(len(tokens)),
            attention_kind=np.concatenate(
                [np.full(len(first), layout.first_kind), np.full(len(second), layout.second_kind)]
            ),
            token_types=np.concatenate(
                [np.full(len(first), layout.first_type), np.full(len(second), layout.second_type)]
            ),
            objective_id=self.objective_id,
            extras=None if nsp_label is None else nsp_fields(nsp_label, len(tokens)),
        )


@register("unilm", UniLMConfig)
def build_unilm(config: UniLMConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    rates = {
        "bidirectional": config.bidirectional_rate,
        "seq2seq": config.seq2seq_rate,
        "left_to_right": config.left_to_right_rate,
        "right_to_left": config.right_to_left_rate,
    }
    leaves: list[tuple[Objective, float]] = []
    for mode, rate in rates.items():
        if rate < 0:
            raise ValueError(f"unilm.{mode}_rate={rate} must be non-negative")
        if rate > 0:
            leaves.append((UniLMMode(mode, first_id + len(leaves), vocab, config), rate))
    if not leaves:
        raise ValueError("unilm: every mode rate is 0; give at least one mode a positive rate")
    return leaves
