"""T5's span corruption (Raffel et al., 2020), in the single-stack form.

The noise mask is T5's `random_spans_noise_mask`: for a chunk of L tokens exactly
round(L d) noise tokens (kept in 1..L-1) in max(1, round(noise / mean_span)) spans,
noise and non-noise span lengths each a uniformly random composition of their token
counts, laid out alternately and starting with non-noise (so a chunk always ends in
noise). `noise_span_to_unique_sentinel` replaces each noise span of the input by one
sentinel [S0], [S1], ... in order; the target is each sentinel followed by the span it
stands for; both end with [EOS]. One stack holds both in one row:

  encoder  input with sentinels, [EOS]        PREFIX, type 0, no loss
  decoder  [BOS] then the target but its last L2R, type 1, positions continuing the
           token, predicting the target       encoder's; loss on every target token

Worked example (d and the draws as in the docstring of T5's noise functions): t0..t11
with noise spans {4} and {10, 11} give the encoder `t0 t1 t2 t3 [S0] t5 t6 t7 t8 t9
[S1] [EOS]` and the target `[S0] t4 [S1] t10 t11 [EOS]`.

How many text tokens a row of seq_len holds is worked out as T5's
`random_spans_helper` works out the raw length for an encoder input length, with the
encoder and the decoder sharing the row: the largest T whose input ((T - noise) +
spans + 1) plus target (noise + spans + 1) fit seq_len. Generation fills [MASK]s:
each becomes a sentinel, and the generated spans are spliced back.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from objectives import layout
from objectives.example import L2R, PREFIX, Example, TextChunk, source_target_example
from objectives.layout import Prompt
from objectives.registry import Objective, register
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class SpanCorruptionConfig:
    """Settings of T5's span corruption (defaults from T5's `span_corruption` task)."""

    noise_density: float = 0.15  # fraction of tokens corrupted
    mean_noise_span_length: float = 3.0  # mean span length


def noise_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a chunk of `length` tokens, as T5 counts them
    (tf.round rounds half to even, as Python's round does)."""
    length = max(length, 2)
    noise = min(max(round(length * density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def random_segmentation(count: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of `count` into `parts` positive lengths."""
    cuts = np.sort(rng.choice(count - 1, parts - 1, replace=False) + 1) if parts > 1 else np.zeros(0, np.int64)
    return np.diff(np.concatenate([[0], cuts, [count]])).astype(np.int64)


def random_spans_noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """bool [length]: T5's noise mask (see module docstring)."""
    original, length = length, max(length, 2)
    noise, spans = noise_counts(length, density, mean_span)
    noise_lengths = random_segmentation(noise, spans, rng)
    kept_lengths = random_segmentation(length - noise, spans, rng)
    mask = np.concatenate([np.concatenate([np.zeros(k, bool), np.ones(n, bool)])
                           for k, n in zip(kept_lengths, noise_lengths)])
    return mask[:original]


def random_spans_helper(inputs_length: int, density: float, mean_span: float, extra_inputs: int = 1,
                        extra_targets: int = 1) -> tuple[int, int]:
    """T5's `random_spans_helper`: (raw tokens, targets length) for an encoder input of
    `inputs_length` tokens; each span adds `extra_*` tokens (a sentinel), each side one
    [EOS]."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise = round(tokens * density)
        spans = round(noise / mean_span)
        return (tokens - noise) + spans * extra_inputs + 1, noise + spans * extra_targets + 1

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    inputs, targets = lengths(tokens)
    if density == 0.5 and targets > inputs:
        tokens -= 1
        targets -= 1
    return tokens, targets


def row_length(tokens: int, density: float, mean_span: float) -> int:
    """The single-stack row of a chunk of `tokens`: input + [EOS] + target + [EOS]."""
    _, spans = noise_counts(tokens, density, mean_span)
    return tokens + 2 * spans + 2


class SpanCorruption(Objective):
    """T5's span corruption in one stack (see module docstring). `opening`, when given,
    is a token put before the input (UL2's paradigm token)."""

    min_text_tokens = 2
    attention_kinds = frozenset({PREFIX, L2R})
    special_tokens = frozenset({"[BOS]", "[EOS]", "[MASK]"})
    token_types = frozenset({0, 1})

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary, config: SpanCorruptionConfig,
                 opening: int | None = None):
        super().__init__(name, objective_id, vocab)
        if not 0 < config.noise_density < 1:
            raise ValueError(f"{name}.noise_density={config.noise_density} must lie in (0, 1)")
        if not config.mean_noise_span_length >= 1:
            raise ValueError(f"{name}.mean_noise_span_length={config.mean_noise_span_length} must be >= 1")
        self.config, self.opening, self._budgets = config, opening, {}
        vocab.sentinel(0, needed_by=f"objective {name!r}")  # a clear message now rather than at the first example

    def text_budget(self, seq_len: int) -> int:
        if seq_len not in self._budgets:
            c, extra = self.config, int(self.opening is not None)
            tokens = 0
            while row_length(tokens + 1, c.noise_density, c.mean_noise_span_length) + extra <= seq_len:
                tokens += 1
            self._budgets[seq_len] = tokens
        return self._budgets[seq_len]

    def corrupt(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) of `tokens` under noise `mask`, each with its [EOS] (module docstring)."""
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        sentinels = np.array([self.vocab.sentinel(i, needed_by=f"objective {self.name!r}")
                              for i in range(len(starts))], np.int32)
        inputs, targets, span = [], [], -1
        for position, token in enumerate(tokens):
            if mask[position]:
                if span + 1 < len(starts) and starts[span + 1] == position:
                    span += 1
                    inputs.append(sentinels[span])
                    targets.append(sentinels[span])
                targets.append(token)
            else:
                inputs.append(token)
        return (np.asarray([*inputs, self.vocab.eos], np.int32), np.asarray([*targets, self.vocab.eos], np.int32))

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        c = self.config
        mask = random_spans_noise_mask(len(chunk), c.noise_density, c.mean_noise_span_length, rng)
        source, target = self.corrupt(chunk.tokens, mask)
        if self.opening is not None:
            source = np.concatenate([[self.opening], source]).astype(np.int32)
        return self._row(source, target)

    def _row(self, source: np.ndarray, target: np.ndarray) -> Example:
        return source_target_example(source, target, self.vocab.bos, self.objective_id)

    # -- generation: fill [MASK]s by generating the spans ------------------------------

    def generation_modes(self) -> tuple[str, ...]:
        return ("fill",)

    def prompt(self, mode: str, tokens: np.ndarray, max_new_tokens: int) -> Prompt:
        """The encoder input of `tokens` with each [MASK] as the next sentinel, then the
        decoder's [BOS]; the spans are generated after it."""
        if mode != "fill":
            return super().prompt(mode, tokens, max_new_tokens)
        masks = np.flatnonzero(np.asarray(tokens) == self.vocab.mask)
        source = np.asarray(tokens, np.int32).copy()
        source[masks] = [self.vocab.sentinel(i, needed_by=f"objective {self.name!r}") for i in range(len(masks))]
        source = np.concatenate([[self.opening] if self.opening is not None else [], source, [self.vocab.eos]])
        return layout.prompt([(source, PREFIX, 0), ([self.vocab.bos], L2R, 1)], target_type=1,
                             max_new_tokens=max_new_tokens)

    def splice(self, tokens: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """`tokens` with its i-th [MASK] replaced by what follows [Si] in `generated` (up
        to the next sentinel or [EOS]); a span never generated fills with nothing."""
        spans: dict[int, list[int]] = {}
        current = None
        index_of = {sentinel: i for i, sentinel in enumerate(self.vocab.sentinels)}
        for token in np.asarray(generated).tolist():
            if token == self.vocab.eos:
                break
            if token in index_of:
                current = index_of[token]
                spans.setdefault(current, [])
            elif current is not None:
                spans[current].append(token)
        out, number = [], 0
        for token in np.asarray(tokens).tolist():
            if token == self.vocab.mask:
                out.extend(spans.get(number, []))
                number += 1
            else:
                out.append(token)
        return np.asarray(out, np.int32)


@register("span_corruption", SpanCorruptionConfig)
def build_span_corruption(config: SpanCorruptionConfig, vocab: Vocabulary, first_id: int
                          ) -> list[tuple[Objective, float]]:
    return [(SpanCorruption("span_corruption", first_id, vocab, config), 1.0)]
