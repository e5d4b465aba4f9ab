"""SpanBERT's span masking (Joshi et al., 2020), without the span boundary objective.

As SpanBERT's `PairWithSpanMaskingScheme` does it, for a text of n tokens:
- a budget of ceil(n mask_ratio) tokens is masked;
- until it is spent: draw a span length in words from a geometric distribution
  (p = 0.2) clipped at 10 words and renormalised (mean 3.8 words), and an anchor
  token uniformly at random (drawn again when already masked); the span starts at
  the beginning of the anchor's word and covers that many whole words, token by
  token, stopping when the budget is spent or the text ends;
- spans that overlap or touch are merged, and each merged span is corrupted as a
  whole by the 80/10/10 rule (one draw per span);
- every masked token is predicted, with the plain MLM loss.

The example is `[CLS] text [SEP]`, all PREFIX, type 0, like MLM without NSP
(SpanBERT drops NSP and trains on single segments). Deviations (README): random
replacements are uniform over ordinary tokens (SpanBERT draws them by corpus
frequency), and the span boundary objective (SBO), a second head predicting each
masked token from the span's boundary tokens and its relative position, is left out:
it is a head, not a layout, and the paper finds most of the gain comes from span
masking itself (its ablation, Table 6).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from objectives import noise
from objectives.example import NO_NSP_LABEL, PREFIX, Example, TextChunk, make_example
from objectives.mlm import bert_row
from objectives.registry import Objective, register
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
        corrupted = noise.replace_spans(text, merge_spans(spans), rng, self.vocab, self.rule)
        row = bert_row(self.vocab, corrupted)
        return make_example(
            inputs=row["inputs"],
            targets=bert_row(self.vocab, text)["inputs"],
            weights=np.concatenate([[0], masked, [0]]).astype(np.float32),
            positions=row["positions"],
            attention_kind=row["attention_kind"],
            token_types=row["token_types"],
            objective_id=self.objective_id,
            nsp_label=NO_NSP_LABEL,
        )

    def generation_modes(self) -> tuple[str, ...]:
        return ("fill",)

    def fill_row(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return bert_row(self.vocab, tokens)


@register("spanbert", SpanBERTConfig)
def build_spanbert(config: SpanBERTConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    return [(SpanBERT("spanbert", first_id, vocab, config), 1.0)]
