"""BART's text infilling and sentence permutation (Lewis et al., 2020), in one stack.

As fairseq's `DenoisingDataset` does it, in its order:
1. sentence permutation: ceil(n p) of the chunk's n sentences (p = 1: all) trade
   places in a random order;
2. text infilling over whole words (SentencePiece word starts): ceil(words
   mask_ratio) words are masked in spans whose lengths are drawn from a Poisson(λ)
   truncated where its mass falls below 1e-7 and cut to exactly that many words;
   a span starts at a random word start and covers whole words; each span becomes
   one [MASK] (replace_length 1), or one random token with probability
   `random_ratio`; spans of length 0 become insertions: that many tokens put at
   random inner positions, the first ceil(n random_ratio) of them random, the rest
   [MASK];
3. the target is the original text in order, [EOS] after it.

One stack holds both: the encoder `[BOS] corrupted [EOS]` (PREFIX, type 0, no loss),
then the decoder `[BOS] text` (L2R, type 1, positions continuing), predicting
`text [EOS]`. A row of seq_len holds a text of (seq_len - 3) / 2.1 tokens, room for
the insertions (whose few extra beyond 10% of the text are dropped). Generation
reconstructs: the prompt (with [MASK]s where text is missing) is the encoder input,
and 'fill' takes the generated reconstruction as the filled text.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from objectives import layout, noise
from objectives.example import L2R, PREFIX, Example, TextChunk, source_target_example
from objectives.layout import Prompt
from objectives.registry import Objective, register
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class BARTConfig:
    """Settings of BART's denoising (defaults from the paper and fairseq's recipe)."""

    mask_ratio: float = 0.3  # share of words masked
    poisson_lambda: float = 3.0  # span lengths (the paper; fairseq's large recipe uses 3.5)
    random_ratio: float = 0.1  # a span (or insertion) becomes a random token instead of [MASK]
    permute_sentences: float = 1.0  # share of sentences permuted
    whole_word: bool = True  # spans cover whole SentencePiece words


def poisson_lengths(lam: float) -> np.ndarray:
    """The truncated Poisson(λ) probabilities of span lengths 0, 1, ...: up to and
    including the first length whose probability falls below 1e-7, renormalised
    (fairseq's categorical)."""
    probabilities, k, value = [], 0, math.exp(-lam)
    while True:
        probabilities.append(value)
        k += 1
        if value < 1e-7 or k == 128:
            break
        value = value * lam / k
    probabilities = np.asarray(probabilities)
    return probabilities / probabilities.sum()


def span_lengths(count: int, probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Span lengths drawn until they reach `count`, the last cut so they sum to it exactly."""
    lengths = np.zeros(0, np.int64)
    while lengths.sum() < count:
        lengths = np.concatenate([lengths, rng.choice(len(probabilities), size=count, p=probabilities)])
    cumulative = np.cumsum(lengths)
    last = int(np.searchsorted(cumulative, count))
    lengths = lengths[: last + 1].copy()
    lengths[last] = count - (cumulative[last - 1] if last else 0)
    return lengths


class BART(Objective):
    """BART's denoising in one stack (see module docstring)."""

    min_text_tokens = 2
    attention_kinds = frozenset({PREFIX, L2R})
    special_tokens = frozenset({"[BOS]", "[EOS]", "[MASK]"})
    token_types = frozenset({0, 1})

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary, config: BARTConfig):
        super().__init__(name, objective_id, vocab)
        for field, value in (("mask_ratio", config.mask_ratio), ("random_ratio", config.random_ratio),
                             ("permute_sentences", config.permute_sentences)):
            if not 0 <= value <= 1:
                raise ValueError(f"bart.{field}={value} must lie in [0, 1]")
        if not config.poisson_lambda > 0:
            raise ValueError(f"bart.poisson_lambda={config.poisson_lambda} must be > 0 (the paper: 3)")
        self.config = config
        self.probabilities = poisson_lengths(config.poisson_lambda)

    def text_budget(self, seq_len: int) -> int:
        return max(2, int((seq_len - 3) / 2.1))

    def permute(self, tokens: np.ndarray, starts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The chunk with ceil(n p) of its n sentences trading places (fairseq's order of draws)."""
        bounds = [int(s) for s in starts if 0 < s < len(tokens)]
        pieces = np.split(tokens, bounds)
        n = len(pieces)
        chosen = rng.permutation(n)[: math.ceil(n * self.config.permute_sentences)]
        ordering = np.arange(n)
        ordering[chosen] = chosen[rng.permutation(len(chosen))]
        return np.concatenate([pieces[i] for i in ordering]).astype(np.int32)

    def infill(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(the text with its spans each replaced by one token, insertions to make)."""
        c, vocab = self.config, self.vocab
        is_start = noise.word_start_flags(tokens, vocab, c.whole_word)
        starts = np.flatnonzero(is_start)
        count = math.ceil(len(starts) * c.mask_ratio)
        if count == 0:
            return tokens.copy(), 0
        lengths = span_lengths(count, self.probabilities, rng)
        inserts = int((lengths == 0).sum())
        lengths = lengths[lengths > 0]
        spans = rng.permutation(starts)[: len(lengths)]
        random_span = rng.random(len(spans)) < c.random_ratio
        word_ends = np.append(starts[1:], len(tokens))  # the end of the word starting at starts[i]
        keep = np.ones(len(tokens), bool)
        replace = tokens.copy()
        for start, words, random in zip(spans, lengths[: len(spans)], random_span):
            first_word = int(np.searchsorted(starts, start))
            end = word_ends[min(first_word + int(words) - 1, len(starts) - 1)]
            keep[start + 1 : end] = False
            replace[start] = vocab.ordinary_ids[rng.integers(len(vocab.ordinary_ids))] if random else vocab.mask
        # A span whose start lies inside another span goes with it (as in fairseq).
        return replace[keep], inserts

    def insert(self, source: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` tokens at random inner positions of `source` (never before its first or
        after its last token): the first ceil(count random_ratio) random, the rest [MASK]."""
        if count == 0:
            return source
        total = len(source) + count
        slots = rng.permutation(total - 2)[:count] + 1
        randoms = math.ceil(count * self.config.random_ratio)
        out = np.full(total, -1, np.int64)
        out[slots[:randoms]] = self.vocab.ordinary_ids[rng.integers(len(self.vocab.ordinary_ids), size=randoms)]
        out[slots[randoms:]] = self.vocab.mask
        out[out == -1] = source
        return out.astype(np.int32)

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        text = chunk.tokens
        permuted = self.permute(text, chunk.sentence_starts, rng)
        corrupted, inserts = self.infill(permuted, rng)
        source = np.concatenate([[self.vocab.bos], corrupted, [self.vocab.eos]]).astype(np.int32)
        room = max(0, len(text) + 2 + int(0.1 * len(text)) - len(source))  # the budget's room for insertions
        source = self.insert(source, min(inserts, room), rng)
        return self.row(source, text)

    def row(self, source: np.ndarray, text: np.ndarray) -> Example:
        """Encoder `source`, then the decoder reconstructing `text [EOS]`."""
        return source_target_example(source, np.append(text, self.vocab.eos), self.vocab.bos, self.objective_id)

    def generation_modes(self) -> tuple[str, ...]:
        return ("seq2seq", "fill")

    def prompt(self, mode: str, tokens: np.ndarray, max_new_tokens: int) -> Prompt:
        """Reconstruction: `[BOS] tokens [EOS]` (PREFIX, type 0; [MASK]s where text is
        missing), then the decoder's [BOS]; the whole text is generated after it."""
        if mode not in self.generation_modes():
            return super().prompt(mode, tokens, max_new_tokens)
        return layout.prompt([([self.vocab.bos, *tokens, self.vocab.eos], PREFIX, 0), ([self.vocab.bos], L2R, 1)],
                             target_type=1, max_new_tokens=max_new_tokens)

    def splice(self, tokens: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """The reconstruction itself: BART regenerates the whole text, up to its [EOS]."""
        generated = np.asarray(generated, np.int32)
        ends = np.flatnonzero(generated == self.vocab.eos)
        return generated[: ends[0]] if len(ends) else generated


@register("bart", BARTConfig)
def build_bart(config: BARTConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    return [(BART("bart", first_id, vocab, config), 1.0)]
