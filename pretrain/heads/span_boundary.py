"""SpanBERT's span boundary objective (SBO) head (Joshi et al., 2020; facebookresearch/
SpanBERT, `BertPairTargetPredictionHead`): each masked token of a span is predicted from
the hidden states of the two tokens just outside the span and an embedding of its
position inside the span, through a 2-layer MLP (dense, GELU, LayerNorm, twice) and the
vocabulary projection tied to the token embedding, with a bias of its own.

The term's two fields give, at each predicted token, its distance to the left boundary
and to the right one (0: not predicted here); relative distances survive packing, which
shifts examples along the row. The position inside the span is the left distance - 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.heads import register_head
from pretrain.loss import vocabulary_statistics
from pretrain.layers import gelu, layer_norm
from pretrain.layers import param as parameter

POSITION_WIDTH = 200  # SpanBERT's --pair-positional-embedding-size


@register_head("span_boundary")
class SpanBoundary(nnx.Module):
    """Boundary states [D] x 2 + position embedding [200] -> MLP -> tied vocabulary logits.

    The position table has `max_positions` rows (SpanBERT's has `max_pair_targets`,
    15, and never reads beyond them; neither does this one, whose objective stops at
    the same 15 targets per span, so only the table's size differs)."""

    def __init__(self, config: Any, rngs: nnx.Rngs):
        d, e = config.model_dim, config.embedding_width
        self.config = config
        self.position_embedding = parameter(rngs, (config.max_positions, POSITION_WIDTH), (None, None))
        self.kernel_1 = parameter(rngs, (2 * d + POSITION_WIDTH, d), (None, "embed"))
        self.bias_1 = parameter(rngs, (d,), ("embed",), jax.nn.initializers.zeros)
        self.norm_1 = layer_norm(config, rngs)
        self.kernel_2 = parameter(rngs, (d, e), ("embed", "embed_out"))  # to the tied embeddings' width
        self.bias_2 = parameter(rngs, (e,), ("embed",), jax.nn.initializers.zeros)
        self.norm_2 = layer_norm(config, rngs, e)
        self.output_bias = parameter(rngs, (config.vocab_size,), ("vocab",), jax.nn.initializers.zeros)

    def representations(self, hidden: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
        """[B, L, E]: at each predicted token (left distance > 0), the MLP over its span's
        boundary states and its position inside the span (anything elsewhere)."""
        dtype = self.config.compute_dtype
        length = hidden.shape[1]
        positions = jnp.arange(length)
        at = lambda offsets: jnp.take_along_axis(  # noqa: E731
            hidden, jnp.clip(positions + offsets, 0, length - 1)[..., None], axis=1)
        inside = jnp.take(self.position_embedding[...], jnp.maximum(left - 1, 0), axis=0).astype(dtype)
        x = jnp.concatenate([at(-left), at(right), inside], axis=-1)
        for kernel, bias, norm in ((self.kernel_1, self.bias_1, self.norm_1),
                                   (self.kernel_2, self.bias_2, self.norm_2)):
            x = gelu(self.config, x @ kernel[...].astype(dtype) + bias[...].astype(dtype))
            x = norm(x).astype(dtype)
        return x

    def statistics(self, model: nnx.Module, hidden: jax.Array, batch: Mapping[str, jax.Array], term: Any
                   ) -> dict[str, jax.Array]:
        """Cross-entropy and accuracy sums of the span tokens' `targets`, over the
        tokens the term marks (its first field, the left distance, > 0)."""
        (left_field, _), (right_field, _) = term.fields
        left, right = batch[left_field], batch[right_field]
        weights = (left > 0).astype(jnp.float32)
        represented = self.representations(hidden, left, right)
        total, stats = vocabulary_statistics(None, {}, model.token_embedding[...], self.output_bias[...],
                                             represented, batch["targets"], weights, jnp.zeros_like(left), 1,
                                             self.config.compute_dtype)
        return {"loss_sum": total, "correct_sum": stats["correct_sum"][0], "weight_sum": stats["weight_sum"][0]}
