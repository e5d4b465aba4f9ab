"""Is a difference between two rows of a downstream table real? Two tests, and a power estimate.

  welch             Welch's t-test over seeds (`scipy.stats.ttest_ind(equal_var=False)`):
                    each seed's test score is one sample; it asks whether another
                    fine-tuning seed would give the same order.
  paired_bootstrap  a paired bootstrap over test examples (Koehn 2004; Berg-Kirkpatrick
                    et al. 2012): the test set is resampled with replacement, the same
                    resample for both rows, and each row's score is its mean over the
                    seeds' dev-selected models on that resample; it asks whether another
                    test set of this size would give the same order. Two-sided p:
                    twice the smaller share of resamples on either side of zero.
  seeds_needed      how many seeds per row a two-sided Welch test at alpha 0.05 and power
                    0.8 would need to find a difference of the observed size, given the
                    observed spread (normal approximation: 2 ((z_a + z_b) s / d)^2).

Scores are the task's metric, as its kind reads gold and predicted values
(`pretrain.transfer.kinds.score`). Additive metrics (accuracy,
token accuracy, span F1) are resampled from per-example counts in one matrix product;
the others are recomputed on each resample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from pretrain.transfer import kinds, scores

RESAMPLES = 1000
ALPHA = 0.05
POWER = 0.8


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test between two samples of seed scores; None
    when either has fewer than two seeds or neither varies."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def seeds_needed(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Seeds per row for a two-sided test at `alpha` to find the observed difference
    with probability `power` (None: no spread or no difference to find)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return None
    difference = abs(a.mean() - b.mean())
    spread = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    if difference == 0 or spread == 0:
        return None
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return max(2, math.ceil(2 * (z * spread / difference) ** 2))


def _counts(metric: str, labels: Sequence[str], gold: Sequence, predicted: Sequence) -> np.ndarray | None:
    """Per-example additive counts [n, k] from which the metric is a ratio, or None."""
    if metric == "accuracy":
        return np.stack([np.asarray(gold) == np.asarray(predicted), np.ones(len(gold), bool)], 1).astype(np.float64)
    if metric == "token_accuracy":
        return np.asarray([[sum(g == p for g, p in zip(gs, ps, strict=True)), len(gs)]
                           for gs, ps in zip(gold, predicted, strict=True)], np.float64)
    if metric == "span_f1":
        rows = []
        for gs, ps in zip(gold, predicted, strict=True):
            gold_spans = scores.spans([labels[t] for t in gs])
            predicted_spans = scores.spans([labels[t] for t in ps])
            rows.append([len(gold_spans & predicted_spans), len(predicted_spans), len(gold_spans)])
        return np.asarray(rows, np.float64)
    return None


def _from_counts(metric: str, totals: np.ndarray) -> np.ndarray:
    """The metric of summed counts [..., k]."""
    ratio = lambda n, d: np.divide(n, d, out=np.zeros_like(n), where=d > 0)  # noqa: E731
    if metric == "span_f1":
        precision, recall = ratio(totals[..., 0], totals[..., 1]), ratio(totals[..., 0], totals[..., 2])
        return ratio(2 * precision * recall, precision + recall)
    return ratio(totals[..., 0], totals[..., 1])


def resampled_scores(metric: str, labels: Sequence[str], gold: Sequence, predicted: Sequence,
                     resamples: np.ndarray) -> np.ndarray:
    """The metric of one model's predictions on each resample of the test set
    (`resamples`: [R, n] example indices)."""
    counts = _counts(metric, labels, gold, predicted)
    if counts is not None:
        weights = np.stack([np.bincount(row, minlength=len(gold)) for row in resamples]).astype(np.float64)
        return _from_counts(metric, weights @ counts)
    return np.asarray([kinds.score((metric,), labels, [gold[i] for i in row], [predicted[i] for i in row])[metric]
                       for row in resamples])


def paired_bootstrap(metric: str, labels: Sequence[str], gold: Sequence, predictions_a: Sequence[Sequence],
                     predictions_b: Sequence[Sequence], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of row a against row b over test examples: each row's score on a
    resample is the mean over its seeds' predictions. Returns the observed difference
    (a - b), its 95% interval over resamples and the two-sided p-value."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(gold), size=(resamples, len(gold)))
    mean_a = np.mean([resampled_scores(metric, labels, gold, p, indices) for p in predictions_a], axis=0)
    mean_b = np.mean([resampled_scores(metric, labels, gold, p, indices) for p in predictions_b], axis=0)
    observed = (np.mean([kinds.score((metric,), labels, gold, p)[metric] for p in predictions_a])
                - np.mean([kinds.score((metric,), labels, gold, p)[metric] for p in predictions_b]))
    differences = mean_a - mean_b
    p = min(1.0, 2 * min(np.mean(differences <= 0), np.mean(differences >= 0)))
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"difference": float(observed), "interval": [float(low), float(high)], "p": float(p),
            "resamples": resamples}


def marker(p: float | None) -> str:
    """The table's marker of a p-value: † p < 0.05, ‡ p < 0.01, '' otherwise."""
    if p is None:
        return ""
    return "‡" if p < 0.01 else "†" if p < 0.05 else ""
