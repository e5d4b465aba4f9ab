"""The pretraining loss: weighted token cross-entropy, plus NSP when the batch has it.

The model owns the loss; objectives only say where it is taken (`weights`) and
which objective made each token (`objective_id`), so per-objective loss and
accuracy come out of one pass for any mixture.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from pretrain.model import Transformer

Batch = Mapping[str, jax.Array]


def token_statistics(
    logits: jax.Array,  # float [B, L, V]
    targets: jax.Array,  # int [B, L]
    weights: jax.Array,  # float [B, L]
    objective_id: jax.Array,  # int [B, L]
    num_objectives: int,
) -> dict[str, jax.Array]:
    """Per-objective sums [num_objectives]: `loss_sum`, `correct_sum`, `weight_sum`."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    one_hot = jax.nn.one_hot(objective_id, num_objectives, dtype=jnp.float32) * weights[..., None]
    return {
        "loss_sum": jnp.einsum("bl,blo->o", losses, one_hot),
        "correct_sum": jnp.einsum("bl,blo->o", correct, one_hot),
        "weight_sum": one_hot.sum(axis=(0, 1)),
    }


def nsp_statistics(nsp_logits: jax.Array, nsp_labels: jax.Array) -> dict[str, jax.Array]:
    """Scalar sums of the NSP loss and accuracy over tokens whose label is >= 0
    (each sentence-pair example's first token)."""
    labelled = (nsp_labels >= 0).astype(jnp.float32)
    labels = jnp.maximum(nsp_labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, labels)
    correct = (jnp.argmax(nsp_logits, axis=-1) == labels).astype(jnp.float32)
    return {
        "nsp_loss_sum": (losses * labelled).sum(),
        "nsp_correct_sum": (correct * labelled).sum(),
        "nsp_weight_sum": labelled.sum(),
    }


def pretraining_loss(
    model: Transformer, batch: Batch, num_objectives: int, *, deterministic: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, statistics) of a packed batch.

    loss = sum of weighted token cross-entropies / sum of weights, plus the mean
    NSP cross-entropy when the model has an NSP head and the batch labels pairs.
    The statistics are sums, so they add up across devices and accumulation steps.
    """
    hidden = model(batch, deterministic=deterministic)
    stats = token_statistics(model.logits(hidden), batch["targets"], batch["weights"],
                             batch["objective_id"], num_objectives)
    loss = stats["loss_sum"].sum() / jnp.maximum(stats["weight_sum"].sum(), 1.0)
    if model.config.nsp_head and "nsp_labels" in batch:
        stats.update(nsp_statistics(model.nsp_logits(hidden), batch["nsp_labels"]))
        loss = loss + stats["nsp_loss_sum"] / jnp.maximum(stats["nsp_weight_sum"], 1.0)
    return loss, stats
