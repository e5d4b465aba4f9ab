"""T5's prefix language modelling (Raffel et al., 2020), in the single-stack form.

A chunk t of L tokens is split after k tokens, drawn as T5's `random_prefix_noise_mask`
draws it: k uniform over [max(1, round((1 - 2d)(L - 1))), L - 1] with noise density d
(0.5: uniform over [1, L - 1]). The row is a decoder-only prefix LM:

  inputs   [BOS] t_0 ... t_{L-1}
  targets  t_0 ... t_{L-1} [EOS]          (T5 appends EOS to every target)
  kinds    PREFIX for [BOS] and the prefix t_0..t_{k-1}, L2R for the rest
  types    0 for the prefix part, 1 for the target part
  weights  1 from the last prefix position on: the loss is on t_k .. t_{L-1}, [EOS]

The prefix sees itself bidirectionally and never the target; each target token sees
the prefix and the target before it. Generation continues a prompt laid out as the
prefix.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from objectives import layout
from objectives.example import L2R, PREFIX, Example, TextChunk, make_example
from objectives.layout import Prompt
from objectives.registry import Objective, register
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class PrefixLMConfig:
    """Settings of T5's prefix LM (defaults from its `prefix_lm` preprocessor)."""

    noise_density: float = 0.5  # the target's expected share; 0.5 draws the split uniformly


class PrefixLM(Objective):
    """T5's prefix LM in one stack (see module docstring). `opening` replaces [BOS] as
    the first token (UL2's paradigm token)."""

    min_text_tokens = 2
    attention_kinds = frozenset({PREFIX, L2R})
    special_tokens = frozenset({"[BOS]", "[EOS]"})
    token_types = frozenset({0, 1})

    def __init__(self, name: str, objective_id: int, vocab: Vocabulary, config: PrefixLMConfig,
                 opening: int | None = None):
        super().__init__(name, objective_id, vocab)
        if not 0 < config.noise_density <= 0.5:
            raise ValueError(f"prefix_lm.noise_density={config.noise_density} must lie in (0, 0.5] (T5's range)")
        self.config = config
        self.opening = vocab.bos if opening is None else opening

    def text_budget(self, seq_len: int) -> int:
        return seq_len - 1

    def split(self, length: int, rng: np.random.Generator) -> int:
        """The prefix length k for a chunk of `length` tokens (T5's rule, see module docstring)."""
        highest = length - 1
        lowest = min(highest, max(1, round((1 - 2 * self.config.noise_density) * (length - 1))))  # tf.round: half to even
        return int(rng.integers(lowest, highest + 1))

    def make_example(self, chunk: TextChunk, rng: np.random.Generator) -> Example:
        tokens = chunk.tokens
        k = self.split(len(tokens), rng)
        inputs = np.concatenate([[self.opening], tokens]).astype(np.int32)
        n = len(inputs)
        return make_example(
            inputs=inputs,
            targets=np.concatenate([tokens, [self.vocab.eos]]),
            weights=(np.arange(n) >= k).astype(np.float32),
            positions=np.arange(n),
            attention_kind=np.where(np.arange(n) <= k, PREFIX, L2R),
            token_types=(np.arange(n) > k).astype(np.int32),
            objective_id=self.objective_id,
        )

    def generation_modes(self) -> tuple[str, ...]:
        return ("continue", "seq2seq")

    def prompt(self, mode: str, tokens: np.ndarray, max_new_tokens: int) -> Prompt:
        """`[BOS] tokens` as the prefix (PREFIX, type 0); the target continues it (L2R, type 1)."""
        if mode not in self.generation_modes():
            return super().prompt(mode, tokens, max_new_tokens)
        return layout.prompt([([self.opening, *tokens], PREFIX, 0)], target_type=1, max_new_tokens=max_new_tokens)


@register("prefix_lm", PrefixLMConfig)
def build_prefix_lm(config: PrefixLMConfig, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    return [(PrefixLM("prefix_lm", first_id, vocab, config), 1.0)]
