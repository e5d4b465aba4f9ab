"""MASS span masking in its single-stack form (Song et al., 2019).

As MASS's code does it (`mask_start`, `mask_sent`), for a text of n tokens one
contiguous span t[u .. u+k-1] with k = round(0.5 n) (Python's round, half to even)
is chosen: at the start (u = 1; never the first token, which feeds the decoder) with
probability 0.2, at the end (u = n - k) with 0.2, otherwise uniformly from
randint(1, n - k), which never draws the end. The row holds

  encoder part: the text with the span corrupted by 80/10/10, positions 0..n-1,
                token type 0, no loss; PREFIX, except the positions that hold
                [MASK], which are ENCODER_ONLY;
  decoder part: t[u-1 .. u+k-2] (the span shifted right), L2R, the *original*
                positions u-1 .. u+k-2, token type 1, targets t[u .. u+k-1].

So the decoder sees its own left context and the encoder without its [MASK]ed
positions: MASS's decoder attends to the encoder under `enc_mask = x1 != mask_index`.
`decoder_sees_masked_source=True` makes the whole encoder PREFIX (the decoder then
reads the [MASK]ed positions too). A row of seq_len holds a text of about
seq_len / 1.5 tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from objectives import layout, noise
from objectives.example import ENCODER_ONLY, L2R, PREFIX, Example, TextChunk, make_example
from objectives.layout import Prompt
from objectives.registry import Objective, register
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class MASSConfig:
    """Settings of MASS (defaults from the paper)."""

    span_fraction: float = 0.5  # k = round(span_fraction * n)
    start_rate: float = 0.2  # span placed right after the first token
    end_rate: float = 0.2  # span placed at the end (the rest: uniform)
    mask_token_rate: float = 0.8  # encoder span tokens replaced by [MASK]
    random_token_rate: float = 0.1  # ... by a random ordinary token (the rest stay)
    decoder_sees_masked_source: bool = False  # MASS's code hides [MASK]ed source positions from the decoder


class MASS(Objective):
    """Single-stack MASS (see module docstring)."""

    min_text_tokens = 2
    token_types = frozenset({0, 1})
    special_tokens = frozenset({"[MASK]"})

    def generation_modes(self) -> tuple[str, ...]:
        return ("seq2seq",)

    def prompt(self, mode: str, tokens: np.ndarray, max_new_tokens: int) -> Prompt:
        """The span at the end: encoder `source [MASK]*k` (PREFIX, type 0), decoder
        starting from the last source token at its position (L2R, type 1); k is
        max_new_tokens, and the decoder predicts the span by next-token prediction."""
        if mode != "seq2seq":
            return super().prompt(mode, tokens, max_new_tokens)
        n, k = len(tokens), max_new_tokens
        if n == 0:
            raise ValueError("a MASS prompt needs at least one source token (the decoder starts from the last)")
        return layout.prompt([(tokens, PREFIX, 0), ([self.vocab.mask] * k, self.masked_kind, 0),
                              ([tokens[-1]], L2R, 1)], positions=[*range(n + k), n - 1], next_position=n, target_type=1, max_new_tokens=k)

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary, config: MASSConfig):
        super().__init__(name, objective_id, vocab)
        if not 0.0 < config.span_fraction < 1.0:
            raise ValueError(f"mass.span_fraction={config.span_fraction} must lie in (0, 1)")
        if config.start_rate < 0 or config.end_rate < 0 or config.start_rate + config.end_rate > 1:
            raise ValueError(
                f"mass.start_rate={config.start_rate} and mass.end_rate={config.end_rate} "
                "must be non-negative and sum to at most 1"
            )
        self.config = config
        self.rule = noise.ReplacementRule(config.mask_token_rate, config.random_token_rate)
        self.masked_kind = PREFIX if config.decoder_sees_masked_source else ENCODER_ONLY
        self.attention_kinds = frozenset({PREFIX, L2R, self.masked_kind})

    def span_length(self, n: int) -> int:
        """k = round(span_fraction n) as MASS's Python round (half to even), kept in
        1..n-1 so the decoder has a first input."""
        return min(max(1, round(self.config.span_fraction * n)), n - 1)

    def text_budget(self, seq_len: int) -> int:
        n = seq_len
        while n >= 2 and n + self.span_length(n) > seq_len:
            n -= 1
        return n

    def span_start(self, n: int, k: int, rng: np.random.Generator) -> int:
        """u in 1..n-k: 1 with start_rate, n-k with end_rate, else MASS's
        randint(1, n-k), uniform over 1..n-k-1 (1 when that range is empty)."""
        draw = rng.random()
        if draw < self.config.start_rate:
            return 1
        if draw < self.config.start_rate + self.config.end_rate:
            return n - k
        return int(rng.integers(1, n - k)) if n - k > 1 else 1

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        text = chunk.tokens
        n = len(text)
        k = self.span_length(n)
        u = self.span_start(n, k, rng)
        span = np.arange(u, u + k)
        encoder = noise.replace_tokens(text, span, rng, self.vocab, self.rule)
        return make_example(
            inputs=np.concatenate([encoder, text[u - 1 : u + k - 1]]),
            targets=np.concatenate([text, text[u : u + k]]),
            weights=np.concatenate([np.zeros(n, np.float32), np.ones(k, np.float32)]),
            positions=np.concatenate([np.arange(n), span - 1]),
            attention_kind=np.concatenate([np.where(encoder == self.vocab.mask, self.masked_kind, PREFIX),
                                           np.full(k, L2R)]),
            token_types=np.concatenate([np.zeros(n, np.int32), np.ones(k, np.int32)]),
            objective_id=self.objective_id,
        )


@register("mass", MASSConfig)
def build_mass(config: MASSConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    return [(MASS("mass", first_id, vocab, config), 1.0)]
