"""TinyBERT's learned projection of a student's hidden states into its teacher's width
(`fit_dense` in TinyBERT's code): one dense layer shared by every mapped layer, trained
by the hidden-state MSE of `pretrain.distillation`. No loss term names it: distillation
adds it when the widths differ (`pretrain.distill`), and it stays behind on export."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from pretrain.heads import register_head
from pretrain.layers import param as parameter


@register_head("hidden_projection")
class HiddenProjection(nnx.Module):
    """Hidden states [..., D] -> [..., config.hidden_projection_dim (0: D)]: a kernel and a bias."""

    def __init__(self, config: Any, rngs: nnx.Rngs):
        self.config = config
        width = config.hidden_projection_dim or config.model_dim
        self.kernel = parameter(rngs, (config.model_dim, width), ("embed", "embed_out"))
        self.bias = parameter(rngs, (width,), ("embed_out",), jax.nn.initializers.zeros)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        dtype = self.config.compute_dtype
        return hidden @ self.kernel[...].astype(dtype) + self.bias[...].astype(dtype)
