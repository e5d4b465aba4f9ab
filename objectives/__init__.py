"""Pretraining objectives as data transforms: text chunk in, `Example` out.

Pure NumPy, no JAX and no model knowledge. Objectives are named in configs by
their registered names (`registered_names()`); a new objective is one module with
a settings dataclass, an `Objective` subclass and a `@register` builder, imported
below.
"""

from objectives import (  # noqa: F401  (registers them)
    bart,
    clm,
    electra,
    mass,
    mlm,
    prefix_lm,
    span_corruption,
    spanbert,
    ul2,
    unilm,
)
from objectives.example import (
    ENCODER_ONLY,
    L2R,
    PREFIX,
    R2L,
    TOKEN_FIELDS,
    AttentionKind,
    Example,
    TextChunk,
    make_example,
)
from objectives.terms import LossTerm
from objectives.mixture import Mixture, build_mixture, parse_mixture_spec
from objectives.registry import (
    ARCHITECTURE_OBJECTIVES,
    Objective,
    default_settings,
    lookup,
    make_settings,
    register,
    registered_names,
)
from objectives.vocab import SPECIAL_TOKENS, Vocabulary

__all__ = [
    "ARCHITECTURE_OBJECTIVES", "ENCODER_ONLY", "L2R", "PREFIX", "R2L", "SPECIAL_TOKENS", "TOKEN_FIELDS",
    "AttentionKind", "Example", "LossTerm", "Mixture", "Objective", "TextChunk", "Vocabulary",
    "build_mixture", "default_settings", "lookup", "make_example", "make_settings",
    "parse_mixture_spec", "register", "registered_names",
]
