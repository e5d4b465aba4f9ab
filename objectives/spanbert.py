"""SpanBERT's span masking and span boundary objective (Joshi et al., 2020).

As SpanBERT's `PairWithSpanMaskingScheme` does it, for a text of n tokens:
- a budget of ceil(n mask_ratio) tokens is masked;
- until it is spent: draw a span length in words from a geometric distribution
  (p = 0.2) clipped at 10 words and renormalised (mean 3.8 words), and an anchor
  token uniformly at random (drawn again when already masked); the span starts at
  the beginning of the anchor's word and covers that many whole words, token by
  token, stopping when the budget is spent or the text ends;
- spans that overlap or touch are merged, and each merged span is corrupted as a
  whole by the 80/10/10 rule (one draw per span);
- every masked token is predicted, with the plain MLM loss;
- with `sbo` (the paper's default), the span boundary objective too: the first
  `sbo_max_targets` tokens of each merged span that neither starts at the text's
  first token nor ends at its last (both boundaries are text tokens, as SpanBERT's
  `span_masking` with `endpoints='external'` requires) are predicted again from the
  states of the two tokens just outside the span and their position in it
  (`pretrain.heads.span_boundary`); loss = MLM loss over its tokens + `sbo_weight` x
  SBO loss over its own tokens, as SpanBERT's `span_bert_loss` sums them.

The example is `[CLS] text [SEP]`, all PREFIX, type 0, like MLM without NSP
(SpanBERT drops NSP and trains on single segments). Deviations (README): random
replacements are uniform over ordinary tokens (SpanBERT draws them by corpus
frequency); the SBO denominator is the number of SBO targets (SpanBERT's code adds 1
to it, against division by zero, which the step's floor at 1 does here); the SBO
position table has `max_positions` rows rather than 15 (rows past 15 are never read).
`sbo=False` gives span masking alone (the paper's Table 6 ablation).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from objectives import noise
from objectives.example import PREFIX, Example, TextChunk, make_example
from objectives.mlm import bert_row
from objectives.registry import Objective, register
from objectives.terms import LossTerm
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class SpanBERTConfig:
    """Settings of SpanBERT's span masking (defaults from the paper)."""

    mask_ratio: float = 0.15  # share of the text's tokens masked
    geometric_p: float = 0.2  # span lengths in words ~ Geometric(p)
    max_span_words: int = 10  # ... clipped here and renormalised
    mask_token_rate: float = 0.8  # of spans: every token [MASK]
    random_token_rate: float = 0.1  # ... every token random (the rest stay)
    whole_word: bool = True  # spans count and cover whole SentencePiece words
    sbo: bool = True  # the span boundary objective (the paper's; False: span masking alone)
    sbo_max_targets: int = 15  # SBO targets per span, from its start (SpanBERT's --max-pair-targets)
    sbo_weight: float = 1.0  # SBO loss coefficient (SpanBERT's --pair-loss-weight)


def sbo_term(config: SpanBERTConfig) -> LossTerm:
    """The SBO loss term: at each SBO target, its distances to the span's left and right
    boundary tokens (0 elsewhere)."""
    return LossTerm("sbo", head="span_boundary", fields=(("sbo_left", 0), ("sbo_right", 0)),
                    weight=config.sbo_weight)


def sbo_fields(spans: list[tuple[int, int]], text_length: int, max_targets: int, offset: int = 1
               ) -> dict[str, np.ndarray]:
    """The SBO fields of an example whose text starts at `offset` ([CLS]) and is
    `text_length` tokens long, for merged [start, end) text spans."""
    left = np.zeros(text_length + 2 * offset, np.int32)
    right = np.zeros_like(left)
    for start, end in spans:
        if start == 0 or end == text_length:  # a boundary would lie outside the text
            continue
        targets = np.arange(start, min(end, start + max_targets))
        left[targets + offset] = targets - start + 1  # the left boundary is text token start - 1
        right[targets + offset] = end - targets  # the right boundary is text token end
    return {"sbo_left": left, "sbo_right": right}


def span_length_probabilities(p: float, max_words: int) -> np.ndarray:
    """P(length = 1..max_words): Geometric(p) clipped at max_words, renormalised."""
    lengths = np.arange(1, max_words + 1)
    probabilities = p * (1 - p) ** (lengths - 1)
    return probabilities / probabilities.sum()


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) spans sorted, with those that overlap or touch merged."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


class SpanBERT(Objective):
    """SpanBERT's span masking (see module docstring)."""

    attention_kinds = frozenset({PREFIX})
    special_tokens = frozenset({"[CLS]", "[SEP]", "[MASK]"})

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary, config: SpanBERTConfig):
        super().__init__(name, objective_id, vocab)
        if not 0 < config.mask_ratio <= 1:
            raise ValueError(f"spanbert.mask_ratio={config.mask_ratio} must lie in (0, 1] (the paper: 0.15)")
        if not 0 < config.geometric_p <= 1:
            raise ValueError(f"spanbert.geometric_p={config.geometric_p} must lie in (0, 1] (the paper: 0.2)")
        if config.max_span_words < 1:
            raise ValueError(f"spanbert.max_span_words={config.max_span_words} must be >= 1 (the paper: 10)")
        if config.sbo_max_targets < 1:
            raise ValueError(f"spanbert.sbo_max_targets={config.sbo_max_targets} must be >= 1 (the paper: 15)")
        self.loss_terms = (sbo_term(config),) if config.sbo else ()
        self.config = config
        self.rule = noise.ReplacementRule(config.mask_token_rate, config.random_token_rate)
        self.probabilities = span_length_probabilities(config.geometric_p, config.max_span_words)

    def text_budget(self, seq_len: int) -> int:
        return seq_len - 2

    def spans(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(bool [n] of masked tokens, the [start, end) spans as drawn, before merging)."""
        n = len(tokens)
        budget = math.ceil(n * self.config.mask_ratio)
        word_starts = np.flatnonzero(noise.word_start_flags(tokens, self.vocab, self.config.whole_word))
        word_ends = np.append(word_starts[1:], n)
        word_of = np.searchsorted(word_starts, np.arange(n), side="right") - 1
        masked = np.zeros(n, bool)
        count, spans = 0, []
        while count < budget:
            words = int(rng.choice(len(self.probabilities), p=self.probabilities)) + 1
            anchor = int(rng.integers(n))
            if masked[anchor]:
                continue
            word = int(word_of[anchor])
            start = end = int(word_starts[word])
            while words > 0 and word < len(word_starts) and count < budget:
                for position in range(int(word_starts[word]), int(word_ends[word])):
                    if count >= budget:
                        break
                    count += int(not masked[position])
                    masked[position] = True
                    end = position + 1
                word, words = word + 1, words - 1
            spans.append((start, end))
        return masked, spans

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        text = chunk.tokens
        masked, spans = self.spans(text, rng)
        merged = merge_spans(spans)
        corrupted = noise.replace_spans(text, merged, rng, self.vocab, self.rule)
        row = bert_row(self.vocab, corrupted)
        return make_example(
            inputs=row["inputs"],
            targets=bert_row(self.vocab, text)["inputs"],
            weights=np.concatenate([[0], masked, [0]]).astype(np.float32),
            positions=row["positions"],
            attention_kind=row["attention_kind"],
            token_types=row["token_types"],
            objective_id=self.objective_id,
            extras=sbo_fields(merged, len(text), self.config.sbo_max_targets) if self.config.sbo else None,
        )

    def generation_modes(self) -> tuple[str, ...]:
        return ("fill",)

    def fill_row(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return bert_row(self.vocab, tokens)


@register("spanbert", SpanBERTConfig)
def build_spanbert(config: SpanBERTConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    return [(SpanBERT("spanbert", first_id, vocab, config), 1.0)]
