"""The model's auxiliary heads, by name: what an objective's loss terms train.

A loss term (`objectives.terms.LossTerm`) names the head it trains; the model builds
one head of each name its config lists (`TransformerConfig.heads`), and the loss asks
each head for its term's statistics. A head is an `nnx.Module` built as
`Head(config, rngs)` with one method,

    statistics(model, hidden, batch, term) -> {'loss_sum', 'correct_sum', 'weight_sum'}

scalar sums over the positions where the term is taken (`term.marker`), so they add
up across devices and micro-batches like the token loss's; the loss divides
`loss_sum` (differentiable; the other two need not be) by the term's global count. A head
that must run before the body (ELECTRA's generator, which writes the inputs the body
reads) has instead

    prepare(model, batch, term, deterministic=...) -> (batch the body reads, statistics)

A head with a counterpart in `transformers` says so: `hf_architecture` (the
architecture whose pretraining model carries it, see `pretrain.hf.convert`) and static
`to_hf(params)` / `from_hf(state)` between its parameters (keys relative to the head)
and that model's state dict; a head without one stays behind on export. A new head is
one module here, registered with `@register_head`; the vocabulary head stays the
model's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_HEADS: dict[str, type] = {}


def register_head(name: str) -> Callable[[type], type]:
    """Decorates a head class so loss terms can name it `name`."""

    def decorate(cls: type) -> type:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        _HEADS[name] = cls
        return cls

    return decorate


def head_names() -> tuple[str, ...]:
    """Every registered head name, sorted."""
    return tuple(sorted(_HEADS))


def head_class(name: str) -> type:
    """The class registered as `name`, or a message listing the known heads."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(head_names())}")
    return _HEADS[name]


def hf_architecture(name: str) -> str | None:
    """The `transformers` architecture whose pretraining model has head `name`, or None."""
    return getattr(head_class(name), "hf_architecture", None)


def build_head(name: str, config: Any, rngs: Any) -> Any:
    """A fresh head `name` for a Transformer of `config`."""
    return head_class(name)(config, rngs)


from pretrain.heads import (  # noqa: E402,F401  (registers them)
    generator, hidden_projection, pair_classifier, replaced_token, span_boundary)
