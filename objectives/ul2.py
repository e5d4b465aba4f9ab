"""UL2's mixture of denoisers (Tay et al., 2022), in the single-stack form.

Seven denoisers, each a leaf of its own (metrics per denoiser):

| leaf          | paradigm | what                                    | mode token |
|---------------|----------|-----------------------------------------|------------|
| ul2/r3_0.15   | R        | span corruption, mean span 3, density 0.15 | [NLU]   |
| ul2/r8_0.15   | R        | mean span 8, density 0.15               | [NLU]      |
| ul2/x3_0.5    | X        | mean span 3, density 0.5                | [NLG]      |
| ul2/x8_0.5    | X        | mean span 8, density 0.5                | [NLG]      |
| ul2/x64_0.15  | X        | mean span 64, density 0.15              | [NLG]      |
| ul2/x64_0.5   | X        | mean span 64, density 0.5               | [NLG]      |
| ul2/s         | S        | prefix LM, split uniform (T5's prefix_lm at density 0.5) | [S2S] |

The R and X denoisers are `span_corruption`'s, the S denoiser `prefix_lm`'s; the
paradigm (mode) token opens every input, before the data (UL2's appendix code
prepends it to the corrupted inputs). Rates: S 20%, R 40% and X 40%, each split
evenly over its denoisers: the share the paper gives S (the UL2 implementations that
cite it use these numbers); the appendix code's default is uniform over the seven
(r_rate=2/7, x_rate=4/7, s_rate=1/7 reproduces it).
"""

from __future__ import annotations

import dataclasses

from objectives.prefix_lm import PrefixLM, PrefixLMConfig
from objectives.registry import Objective, register
from objectives.span_corruption import SpanCorruption, SpanCorruptionConfig
from objectives.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class UL2Config:
    """Settings of UL2's mixture of denoisers (defaults from the paper)."""

    r_denoisers: tuple = ((3.0, 0.15), (8.0, 0.15))  # (mean span, density) of each R denoiser
    x_denoisers: tuple = ((3.0, 0.5), (8.0, 0.5), (64.0, 0.15), (64.0, 0.5))  # ... of each X denoiser
    r_rate: float = 0.4  # share of R, split evenly over its denoisers
    x_rate: float = 0.4  # share of X
    s_rate: float = 0.2  # share of S (prefix LM)
    s_noise_density: float = 0.5  # S's split: 0.5 is uniform over the chunk
    paradigm_tokens: bool = True  # open each input with [NLU] / [NLG] / [S2S]


def _name(paradigm: str, mean: float, density: float) -> str:
    return f"ul2/{paradigm}{mean:g}_{density:g}"


@register("ul2", UL2Config)
def build_ul2(config: UL2Config, vocab: Vocabulary, first_id: int) -> list[tuple[Objective, float]]:
    rates = (config.r_rate, config.x_rate, config.s_rate)
    if min(rates) < 0 or sum(rates) <= 0:
        raise ValueError(f"ul2 rates r_rate={config.r_rate}, x_rate={config.x_rate}, s_rate={config.s_rate} must be "
                         ">= 0 and not all 0")
    token = (lambda name: vocab.token(name, needed_by="objective 'ul2'")) if config.paradigm_tokens else (
        lambda name: None)
    leaves: list[tuple[Objective, float]] = []
    for paradigm, denoisers, rate, mode in (("r", config.r_denoisers, config.r_rate, "[NLU]"),
                                            ("x", config.x_denoisers, config.x_rate, "[NLG]")):
        if rate <= 0:
            continue
        for mean, density in denoisers:
            settings = SpanCorruptionConfig(noise_density=float(density), mean_noise_span_length=float(mean))
            leaf = SpanCorruption(_name(paradigm, mean, density), first_id + len(leaves), vocab, settings,
                                  opening=token(mode))
            leaves.append((leaf, rate / len(denoisers)))
    if config.s_rate > 0:
        leaf = PrefixLM("ul2/s", first_id + len(leaves), vocab, PrefixLMConfig(config.s_noise_density),
                        opening=token("[S2S]"))
        leaves.append((leaf, config.s_rate))
    return leaves
