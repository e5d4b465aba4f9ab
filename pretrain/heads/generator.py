"""ELECTRA's generator (Clark et al., 2020; google-research/electra, `run_pretraining.py`):
a small masked LM that runs before the body and writes its samples into the inputs
the body (the discriminator) reads.

As the reference code builds it (`untied_generator=True`,
`untied_generator_embeddings=False`):
- it reads the body's token, position and type embeddings and their LayerNorm (the
  shared `electra/embeddings` scope; `Transformer.embed_tokens`), projected to its own
  width where that differs (`generator/embeddings_project`);
- its stack has the body's depth (`generator_layers=1.0`), a quarter of its width
  (`generator_hidden_size=0.25`), 4x that as MLP width and width // 64 heads (at least
  one), as `get_generator_config` derives them;
- its MLM head is `get_token_logits`: dense to the embedding width, GELU, LayerNorm,
  the tied embedding table and an output bias of its own;
- it samples each replacement from its softmax at temperature 1 (by the inverse CDF
  of a draw the example carries, where the code adds Gumbel noise to the logits: the
  same distribution, with no random key in the step), and no gradient flows through
  the samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.heads import register_head
from pretrain.layers import gelu, layer_norm, make_blocks, run_blocks
from pretrain.layers import param as parameter
from pretrain.loss import vocabulary_samples, vocabulary_statistics

WIDTH_FRACTION = 0.25  # ELECTRA's generator_hidden_size


def generator_config(config: Any) -> Any:
    """The generator stack's shape for a body of `config` (see module docstring)."""
    width = max(1, int(round(config.model_dim * WIDTH_FRACTION)))
    return dataclasses.replace(config, model_dim=width, num_heads=max(1, width // 64), mlp_dim=4 * width, heads=(),
                               embedding_dim=0, mlm_transform_head=False)


class GeneratorPredictions(nnx.Module):
    """`get_token_logits` before the tied projection: dense to the embedding width, GELU,
    LayerNorm."""

    def __init__(self, config: Any, width: int, rngs: nnx.Rngs):
        e = config.embedding_width
        self.config = config
        self.kernel = parameter(rngs, (width, e), ("embed", "embed_out"))
        self.bias = parameter(rngs, (e,), ("embed",), jax.nn.initializers.zeros)
        self.norm = layer_norm(config, rngs, e)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        dtype = self.config.compute_dtype
        return self.norm(gelu(self.config, hidden @ self.kernel[...].astype(dtype)
                              + self.bias[...].astype(dtype))).astype(dtype)


@register_head("generator")
class Generator(nnx.Module):
    """The generator: projection, a stack of blocks, the MLM head (module docstring)."""

    def __init__(self, config: Any, rngs: nnx.Rngs):
        self.config = config
        self.stack_config = stack = generator_config(config)
        if config.embedding_width != stack.model_dim:
            self.projection_kernel = parameter(rngs, (config.embedding_width, stack.model_dim), ("embed", "embed_out"))
            self.projection_bias = parameter(rngs, (stack.model_dim,), ("embed",), jax.nn.initializers.zeros)
        self.blocks = make_blocks(stack, rngs)
        self.final_norm = layer_norm(stack, rngs) if config.pre_layer_norm else None
        self.predictions = GeneratorPredictions(config, stack.model_dim, rngs)
        self.output_bias = parameter(rngs, (config.vocab_size,), ("vocab",), jax.nn.initializers.zeros)

    def hidden(self, model: nnx.Module, batch: Mapping[str, jax.Array], *, deterministic: bool) -> jax.Array:
        """[B, L, G]: the generator's states over the (masked) `inputs`."""
        x = model.embed_tokens(batch["inputs"], batch["positions"], batch["token_types"], deterministic=deterministic)
        if hasattr(self, "projection_kernel"):
            dtype = self.config.compute_dtype
            x = x @ self.projection_kernel[...].astype(dtype) + self.projection_bias[...].astype(dtype)
        x, _, _ = run_blocks(self.blocks, self.stack_config, x, model.mask(batch), deterministic=deterministic)
        return x if self.final_norm is None else self.final_norm(x).astype(x.dtype)

    def prepare(self, model: nnx.Module, batch: Mapping[str, jax.Array], term: Any, *, deterministic: bool = True
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(the batch with a sample in `inputs` at every drawn position, the MLM loss
        and accuracy sums of the generator against `targets` there)."""
        field, _ = term.marker
        draws = batch[field]
        hidden = self.hidden(model, batch, deterministic=deterministic)
        graphdef, state = nnx.split(self.predictions)
        transform = lambda state, h: nnx.merge(graphdef, state)(h)  # noqa: E731
        embedding, bias, dtype = model.token_embedding[...], self.output_bias[...], self.config.compute_dtype
        total, stats = vocabulary_statistics(transform, state, embedding, bias, hidden, batch["targets"],
                                             (draws != 0).astype(jnp.float32), jnp.zeros_like(draws), 1, dtype)
        samples = vocabulary_samples(transform, state, embedding, bias, hidden, draws, dtype)
        rewritten = dict(batch, inputs=jnp.where(draws != 0, samples, batch["inputs"]).astype(batch["inputs"].dtype))
        return rewritten, {"loss_sum": total, "correct_sum": stats["correct_sum"][0],
                           "weight_sum": stats["weight_sum"][0]}
