"""BERT masked language modelling, with optional whole-word masking and NSP.

Without NSP (the default, RoBERTa-style contiguous text) an example is
`[CLS] text [SEP]`; with NSP it is `[CLS] A [SEP] B [SEP]` where B is the true
continuation of A or, at `nsp_negative_rate`, text from another document.
Exactly `min(max_predictions, max(1, round(mask_rate * n)))` of the n ordinary
tokens are predicted; each is corrupted by the 80/10/10 rule. Every token is
PREFIX (bidirectional); token types are 0 for `[CLS] A [SEP]`, 1 for `B [SEP]`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from objectives import layout, noise
from objectives.example import PREFIX, Example, TextChunk, make_example
from objectives.registry import Objective, register
from objectives.terms import LossTerm
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    """Settings of BERT's masked LM (defaults from Devlin et al., 2019)."""

    mask_rate: float = 0.15  # fraction of ordinary tokens predicted
    max_predictions: int = 80  # cap on predictions per example (BERT: 20 at 128, 80 at 512)
    mask_token_rate: float = 0.8  # of predicted tokens: replaced by [MASK]
    random_token_rate: float = 0.1  # ... by a random ordinary token (the rest stay)
    whole_word: bool = False  # mask whole SentencePiece words
    nsp: bool = False  # next-sentence prediction with [CLS] A [SEP] B [SEP]
    nsp_negative_rate: float = 0.5  # fraction of pairs whose B comes from another document


def bidirectional_prediction_positions(
    tokens: np.ndarray,
    vocab: Vocabulary,
    rng: np.random.Generator,
    *,
    mask_rate: float,
    max_predictions: int,
    whole_word: bool,
) -> np.ndarray:
    """The positions BERT predicts in `tokens`: ordinary (non-special) tokens only."""
    candidates = np.flatnonzero(~vocab.is_special(tokens))
    count = noise.prediction_count(len(candidates), mask_rate, max_predictions)
    if whole_word:
        return noise.choose_whole_words(noise.word_groups(tokens, candidates, vocab), count, rng)
    return noise.choose_positions(candidates, count, rng)


# BERT's next-sentence prediction: a 2-way classifier (IsNext 0, NotNext 1) through the
# pooler on the pair's first token ([CLS]), one labelled position per pair.
NSP_TERM = LossTerm("nsp", head="pair_classifier", fields=(("nsp_labels", -1),))


def nsp_fields(label: int, length: int) -> dict[str, np.ndarray]:
    """NSP's field for an example of `length` tokens: `label` at its first token."""
    labels = NSP_TERM.empty(length)
    labels["nsp_labels"][0] = label
    return labels


def sentence_pair(
    chunk: TextChunk, rng: np.random.Generator, negative_rate: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, nsp_label): A and its continuation B split from `chunk`, or with
    probability `negative_rate` a B of the same length from `chunk.other_document`
    (label 1)."""
    split = noise.split_pair(len(chunk), chunk.sentence_starts, rng)
    first, second = chunk.tokens[:split], chunk.tokens[split:]
    if rng.random() < negative_rate:
        other = chunk.other_document
        if other is None or len(other) == 0:
            raise ValueError("an NSP negative needs a non-empty other_document in the chunk")
        return first, other[: len(second)], 1
    return first, second, 0


def bert_row(vocab: Vocabulary, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """`[CLS] tokens [SEP]`, all PREFIX, type 0: BERT's single-segment layout, which a
    one-pass [MASK] fill uses."""
    return layout.row([([vocab.cls, *tokens, vocab.sep], PREFIX, 0)])


class MaskedLM(Objective):
    """BERT's masked LM (see module docstring)."""

    attention_kinds = frozenset({PREFIX})
    special_tokens = frozenset({"[CLS]", "[SEP]", "[MASK]"})

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary, config: MLMConfig):
        super().__init__(name, objective_id, vocab)
        self.config = config
        self.rule = noise.ReplacementRule(config.mask_token_rate, config.random_token_rate)
        self.needs_other_document = self.whole_sentences = config.nsp
        self.loss_terms = (NSP_TERM,) if config.nsp else ()
        self.min_text_tokens = 2 if config.nsp else 1
        self.token_types = frozenset({0, 1}) if config.nsp else frozenset({0})

    def generation_modes(self) -> tuple[str, ...]:
        return ("fill",)

    def fill_row(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return bert_row(self.vocab, tokens)

    def text_budget(self, seq_len: int) -> int:
        return seq_len - (3 if self.config.nsp else 2)

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        config = self.config
        if config.nsp:
            first, second, nsp_label = sentence_pair(chunk, rng, config.nsp_negative_rate)
            tokens = np.concatenate([[self.vocab.cls], first, [self.vocab.sep], second, [self.vocab.sep]])
            token_types = np.concatenate(
                [np.zeros(len(first) + 2, np.int32), np.ones(len(second) + 1, np.int32)]
            )
        else:
            tokens = np.concatenate([[self.vocab.cls], chunk.tokens, [self.vocab.sep]])
            token_types = np.zeros(len(tokens), np.int32)
        tokens = tokens.astype(np.int32)
        positions = bidirectional_prediction_positions(
            tokens, self.vocab, rng, mask_rate=config.mask_rate,
            max_predictions=config.max_predictions, whole_word=config.whole_word,
        )
        weights = np.zeros(len(tokens), np.float32)
        weights[positions] = 1.0
        return make_example(
            inputs=noise.replace_tokens(tokens, positions, rng, self.vocab, self.rule),
            targets=tokens,
            weights=weights,
            positions=np.arange(len(tokens)),
            attention_kind=PREFIX,
            token_types=token_types,
            objective_id=self.objective_id,
            extras=nsp_fields(nsp_label, len(tokens)) if config.nsp else None,
        )


@register("mlm", MLMConfig)
def build_mlm(config: MLMConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    return [(MaskedLM("mlm", first_id, vocab, config), 1.0)]
