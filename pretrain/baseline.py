"""The unigram baseline: what a model that ignores all context would score.

A held-out loss means little on its own: 6.5 nats is excellent for one vocabulary
and objective and no learning at all for another. The baseline predicts every
target from the frequencies of the *training* targets of the same objective alone
(add-one smoothed over the vocabulary), and is scored on exactly the held-out
targets the model is scored on. A model whose held-out loss is not clearly below
it has learnt nothing beyond token frequencies; MLM accuracy equal to the most
frequent token's rate says the same.

Pure NumPy over packed batches (`targets`, `weights`, `objective_id`), so it works
for every objective and mixture without knowing any of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Batch = Mapping[str, np.ndarray]
SMOOTHING = 1.0  # add-one (Laplace) pseudo-count per vocabulary entry


def target_counts(batches: Iterable[Batch], num_objectives: int, vocab_size: int,
                  max_targets: int = 500_000) -> np.ndarray:
    """float64 [num_objectives, vocab_size]: the weighted count of each target token
    per objective, over `batches` until `max_targets` weighted targets were seen."""
    counts = np.zeros((num_objectives, vocab_size), np.float64)
    for batch in batches:
        weights = np.asarray(batch["weights"], np.float64).ravel()
        kept = weights > 0
        np.add.at(counts, (np.asarray(batch["objective_id"]).ravel()[kept], np.asarray(batch["targets"]).ravel()[kept]),
                  weights[kept])
        if counts.sum() >= max_targets:
            break
    return counts


def unigram_losses(counts: np.ndarray, heldout: Sequence[Batch]) -> np.ndarray:
    """float64 [num_objectives]: the mean cross-entropy (nats) of the held-out weighted
    targets of each objective under that objective's smoothed training unigram
    distribution (NaN for an objective with no held-out target)."""
    smoothed = counts + SMOOTHING
    log_probs = np.log(smoothed) - np.log(smoothed.sum(axis=1, keepdims=True))
    loss = np.zeros(len(counts), np.float64)
    weight = np.zeros(len(counts), np.float64)
    for batch in heldout:
        weights = np.asarray(batch["weights"], np.float64).ravel()
        kept = weights > 0
        objective = np.asarray(batch["objective_id"]).ravel()[kept]
        targets = np.asarray(batch["targets"]).ravel()[kept]
        np.add.at(loss, objective, -log_probs[objective, targets] * weights[kept])
        np.add.at(weight, objective, weights[kept])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, loss / weight, np.nan)


def unigram_baseline(train_batches: Iterable[Batch], heldout: Sequence[Batch], names: Sequence[str],
                     vocab_size: int, max_targets: int = 500_000) -> dict[str, float]:
    """{'eval/baseline/<objective>': loss, ..., 'eval/baseline': overall}: the unigram
    baseline of each objective on the held-out batches, and over all of them
    (weighted by each objective's held-out targets, as `eval/loss` is)."""
    counts = target_counts(train_batches, len(names), vocab_size, max_targets)
    losses = unigram_losses(counts, heldout)
    weights = np.zeros(len(names), np.float64)
    for batch in heldout:
        kept = np.asarray(batch["weights"]).ravel() > 0
        np.add.at(weights, np.asarray(batch["objective_id"]).ravel()[kept],
                  np.asarray(batch["weights"], np.float64).ravel()[kept])
    out = {f"eval/baseline/{name}": float(loss) for name, loss in zip(names, losses) if np.isfinite(loss)}
    if weights.sum() > 0:
        out["eval/baseline"] = float(np.nansum(losses * weights) / weights.sum())
    return out
