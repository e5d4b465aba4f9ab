"""ELECTRA's discriminator head (google-research/electra, `_get_discriminator_output`;
transformers' `ElectraDiscriminatorPredictions`): dense to the model width, the model's
GELU, dense to one logit per token; a sigmoid cross-entropy against whether the token
the body read differs from the original (`inputs != targets`), over the tokens the
term marks; a token is predicted replaced where its logit is positive."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pretrain.heads import register_head
from pretrain.layers import gelu
from pretrain.layers import param as parameter


@register_head("replaced_token")
class ReplacedTokenDetector(nnx.Module):
    """[D, D] dense + GELU, then [D, 1]: a replaced-token logit per position."""

    hf_architecture = "electra"  # ElectraForPreTraining's discriminator_predictions

    @staticmethod
    def to_hf(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Its parameters as ElectraForPreTraining's `discriminator_predictions`."""
        return {"discriminator_predictions.dense.weight": params["dense_kernel"].T,
                "discriminator_predictions.dense.bias": params["dense_bias"],
                "discriminator_predictions.dense_prediction.weight": params["prediction_kernel"].T,
                "discriminator_predictions.dense_prediction.bias": params["prediction_bias"]}

    @staticmethod
    def from_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Its parameters from an ElectraForPreTraining state dict (None: it has none)."""
        if "discriminator_predictions.dense.weight" not in state:
            return None
        return {"dense_kernel": state["discriminator_predictions.dense.weight"].T,
                "dense_bias": state["discriminator_predictions.dense.bias"],
                "prediction_kernel": state["discriminator_predictions.dense_prediction.weight"].T,
                "prediction_bias": state["discriminator_predictions.dense_prediction.bias"]}

    def __init__(self, config: Any, rngs: nnx.Rngs):
        d = config.model_dim
        self.config = config
        self.dense_kernel = parameter(rngs, (d, d), ("embed", "embed_out"))
        self.dense_bias = parameter(rngs, (d,), ("embed",), jax.nn.initializers.zeros)
        self.prediction_kernel = parameter(rngs, (d, 1), ("embed", None))
        self.prediction_bias = parameter(rngs, (1,), (None,), jax.nn.initializers.zeros)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """Replaced-token logits [B, L] (float32) from hidden states [B, L, D]."""
        dtype = self.config.compute_dtype
        x = gelu(self.config, hidden @ self.dense_kernel[...].astype(dtype) + self.dense_bias[...].astype(dtype))
        return (x @ self.prediction_kernel[...].astype(dtype)).astype(jnp.float32)[..., 0] + self.prediction_bias[0]

    def statistics(self, model: nnx.Module, hidden: jax.Array, batch: Mapping[str, jax.Array], term: Any
                   ) -> dict[str, jax.Array]:
        """Sigmoid cross-entropy and accuracy sums over the marked tokens."""
        field, fill = term.marker
        taken = (batch[field] != fill).astype(jnp.float32)
        replaced = batch["inputs"] != batch["targets"]
        logits = self(hidden)
        losses = optax.sigmoid_binary_cross_entropy(logits, replaced.astype(jnp.float32))
        correct = ((logits > 0) == replaced).astype(jnp.float32)
        return {"loss_sum": (losses * taken).sum(), "correct_sum": (correct * taken).sum(),
                "weight_sum": taken.sum()}
