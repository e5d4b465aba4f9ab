"""Corruption helpers shared by the objectives: which positions, and what replaces them.

Every function takes an explicit `np.random.Generator`, so an example depends only
on the (seed, example index) generator the pipeline hands to its objective.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class ReplacementRule:
    """BERT's 80/10/10 rule: a chosen position becomes [MASK], a random ordinary
    token, or stays as it is, with these probabilities (the rest stays)."""

    mask_rate: float = 0.8
    random_rate: float = 0.1

    def __post_init__(self) -> None:
        if not (0.0 <= self.mask_rate and 0.0 <= self.random_rate
                and self.mask_rate + self.random_rate <= 1.0):
            raise ValueError(
                f"replacement rates mask_rate={self.mask_rate}, random_rate={self.random_rate} "
                "must be non-negative and sum to at most 1"
            )


def round_half_up(value: float) -> int:
    """Rounds .5 up (Python's round() rounds half to even, which would make
    round(0.5 * 1) == 0 and round(0.15 * 10) == 2 but round(0.15 * 30) == 4)."""
    return int(math.floor(value + 0.5))


def prediction_count(num_candidates: int, rate: float, max_predictions: int) -> int:
    """BERT's count: min(max_predictions, max(1, round(rate * n))), never above n."""
    if num_candidates <= 0:
        return 0
    count = min(max_predictions, max(1, round_half_up(rate * num_candidates)))
    return min(count, num_candidates)


def choose_positions(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct positions drawn uniformly from `candidates`, sorted."""
    chosen = rng.choice(np.asarray(candidates), size=count, replace=False)
    return np.sort(chosen).astype(np.int32)


def word_start_flags(tokens: np.ndarray, vocab: Vocabulary, whole_word: bool) -> np.ndarray:
    """bool [n]: True where a token of `tokens` begins a word (the first always does);
    every token when `whole_word` is off, so spans then count tokens."""
    if not whole_word:
        return np.ones(len(tokens), bool)
    if vocab.word_start is None:
        raise ValueError(
            "whole-word masking needs the vocabulary's word_start table "
            "(pretrain.tokenizer provides it for SentencePiece models)"
        )
    starts = vocab.word_start[np.asarray(tokens)].copy()
    starts[:1] = True
    return starts


def replace_spans(
    tokens: np.ndarray,
    spans: list[tuple[int, int]],
    rng: np.random.Generator,
    vocab: Vocabulary,
    rule: ReplacementRule,
) -> np.ndarray:
    """A copy of `tokens` with each [start, end) span corrupted as a whole by the
    80/10/10 rule (one draw per span: all [MASK], all random ordinary tokens, or kept),
    as SpanBERT does."""
    corrupted = np.array(tokens, dtype=np.int32, copy=True)
    for start, end in spans:
        draw = rng.random()
        if draw < rule.mask_rate:
            corrupted[start:end] = vocab.mask
        elif draw < rule.mask_rate + rule.random_rate:
            corrupted[start:end] = vocab.ordinary_ids[rng.integers(0, len(vocab.ordinary_ids), end - start)]
    return corrupted


def word_groups(
    tokens: np.ndarray, candidates: np.ndarray, vocab: Vocabulary
) -> list[np.ndarray]:
    """Groups candidate positions into whole words.

    A candidate whose piece does not start a word joins the word of the candidate
    just before it; everything else starts a new word.
    """
    if vocab.word_start is None:
        raise ValueError(
            "whole-word masking needs the vocabulary's word_start table "
            "(pretrain.tokenizer provides it for SentencePiece models)"
        )
    groups: list[list[int]] = []
    previous = -2
    for position in np.asarray(candidates).tolist():
        continues_word = not vocab.word_start[tokens[position]] and position == previous + 1
        if continues_word and groups:
            groups[-1].append(position)
        else:
            groups.append([position])
        previous = position
    return [np.asarray(group, np.int32) for group in groups]


def choose_whole_words(
    groups: list[np.ndarray], count: int, rng: np.random.Generator
) -> np.ndarray:
    """Whole words in random order, each taken if it still fits in `count` (BERT's
    rule: a word that would overshoot is skipped, so the count may fall short only
    when no remaining word fits)."""
    chosen: list[np.ndarray] = []
    taken = 0
    for index in rng.permutation(len(groups)):
        group = groups[index]
        if taken + len(group) <= count:
            chosen.append(group)
            taken += len(group)
        if taken == count:
            break
    if not chosen:
        return np.zeros(0, np.int32)
    return np.sort(np.concatenate(chosen)).astype(np.int32)


def draw_span_length(rng: np.random.Generator, span_rate: float, max_span: int) -> int:
    """1 with probability 1 - span_rate, else uniform in 2..max_span (UniLM's
    80% single tokens, 20% bigrams or trigrams)."""
    if max_span < 2 or rng.random() >= span_rate:
        return 1
    return int(rng.integers(2, max_span + 1))


def choose_spans(
    candidates: np.ndarray,
    count: int,
    rng: np.random.Generator,
    span_rate: float,
    max_span: int,
) -> np.ndarray:
    """Exactly `count` positions made of short contiguous spans of candidates.

    Span starts are visited in random order; each draws a length with
    `draw_span_length` and takes the uncovered candidates that follow it
    contiguously, cut short at a non-candidate or when `count` is reached.
    """
    candidates = np.asarray(candidates)
    is_candidate = np.zeros(int(candidates.max(initial=-1)) + 2, dtype=bool)
    is_candidate[candidates] = True
    covered = np.zeros_like(is_candidate)
    taken = 0
    for start in rng.permutation(candidates).tolist():
        if taken == count:
            break
        if covered[start]:
            continue
        length = draw_span_length(rng, span_rate, max_span)
        position = start
        while length > 0 and taken < count and is_candidate[position] and not covered[position]:
            covered[position] = True
            taken += 1
            length -= 1
            position += 1
    return np.flatnonzero(covered).astype(np.int32)


def replace_tokens(
    tokens: np.ndarray,
    positions: np.ndarray,
    rng: np.random.Generator,
    vocab: Vocabulary,
    rule: ReplacementRule,
) -> np.ndarray:
    """A copy of `tokens` with `positions` corrupted by the 80/10/10 rule; random
    replacements are drawn from the ordinary (non-special) ids only."""
    corrupted = np.array(tokens, dtype=np.int32, copy=True)
    positions = np.asarray(positions, dtype=np.int64)
    draws = rng.random(len(positions))
    random_ids = vocab.ordinary_ids[rng.integers(0, len(vocab.ordinary_ids), len(positions))]
    to_mask = draws < rule.mask_rate
    to_random = (draws >= rule.mask_rate) & (draws < rule.mask_rate + rule.random_rate)
    corrupted[positions[to_mask]] = vocab.mask
    corrupted[positions[to_random]] = random_ids[to_random]
    return corrupted


def split_pair(chunk_length: int, sentence_starts: np.ndarray, rng: np.random.Generator) -> int:
    """Where segment A ends and B begins in a chunk that holds a sentence pair.

    A random sentence boundary when the chunk has several sentences (BERT's
    choice); inside the text at a random token when it is a single sentence, so
    one long sentence still yields a pair. Requires chunk_length >= 2.
    """
    boundaries = sentence_starts[(sentence_starts > 0) & (sentence_starts < chunk_length)]
    if len(boundaries):
        return int(rng.choice(boundaries))
    return int(rng.integers(1, chunk_length))
