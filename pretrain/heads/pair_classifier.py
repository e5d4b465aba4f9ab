"""A 2-way classifier over each example's first token through BERT's pooler (dense +
tanh), as `BertForPreTraining`'s `cls.seq_relationship`: the head of BERT's
next-sentence prediction, and of any term that classifies a pair of segments
(ALBERT's sentence order, say)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pretrain.heads import register_head
from pretrain.layers import param as parameter


@register_head("pair_classifier")
class PairClassifier(nnx.Module):
    """Pooler [D, D] + tanh, then a [D, 2] classifier; read where the term's label
    field holds a label (each pair's first token)."""

    # Its counterpart in transformers: BertForPreTraining's pooler and cls.seq_relationship.
    hf_architecture = "bert"

    @staticmethod
    def to_hf(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Its parameters (keys relative to the head) as BertForPreTraining's state dict entries."""
        return {"bert.pooler.dense.weight": params["pooler_kernel"].T, "bert.pooler.dense.bias": params["pooler_bias"],
                "cls.seq_relationship.weight": params["classifier_kernel"].T,
                "cls.seq_relationship.bias": params["classifier_bias"]}

    @staticmethod
    def from_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Its parameters from a BertForPreTraining state dict (None: the state has none)."""
        if "cls.seq_relationship.weight" not in state:
            return None
        return {"pooler_kernel": state["bert.pooler.dense.weight"].T, "pooler_bias": state["bert.pooler.dense.bias"],
                "classifier_kernel": state["cls.seq_relationship.weight"].T,
                "classifier_bias": state["cls.seq_relationship.bias"]}

    def __init__(self, config: Any, rngs: nnx.Rngs):
        d = config.model_dim
        self.config = config
        self.pooler_kernel = parameter(rngs, (d, d), ("embed", "embed_out"))
        self.pooler_bias = parameter(rngs, (d,), ("embed",), jax.nn.initializers.zeros)
        self.classifier_kernel = parameter(rngs, (d, 2), ("embed", None))
        self.classifier_bias = parameter(rngs, (2,), (None,), jax.nn.initializers.zeros)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """Logits [..., 2] (float32) from hidden states [..., D]."""
        dtype = self.config.compute_dtype
        pooled = jnp.tanh(hidden @ self.pooler_kernel[...].astype(dtype) + self.pooler_bias[...].astype(dtype))
        return (pooled @ self.classifier_kernel[...].astype(dtype)).astype(jnp.float32) + self.classifier_bias[...]

    def statistics(self, model: nnx.Module, hidden: jax.Array, batch: Mapping[str, jax.Array], term: Any
                   ) -> dict[str, jax.Array]:
        """Cross-entropy and accuracy sums over the labelled tokens (label field != fill)."""
        field, fill = term.marker
        labelled = (batch[field] != fill).astype(jnp.float32)
        labels = jnp.where(batch[field] != fill, batch[field], 0)
        logits = self(hidden)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return {"loss_sum": (losses * labelled).sum(), "correct_sum": (correct * labelled).sum(),
                "weight_sum": labelled.sum()}
