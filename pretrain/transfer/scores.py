"""Task metrics, in NumPy: every number a downstream table reports.

  accuracy, macro_f1 (the mean of per-class F1 over classes in the gold labels or the
  predictions), f1 (of class 1, GLUE's MRPC/QQP), mcc (Matthews correlation,
  multi-class form, GLUE's CoLA), pearson and spearman (regression, STS-B), span_f1
  (micro F1 of exact (start, end, type) spans decoded from BIO tags, as conlleval
  does: an I- tag that does not continue a span of its type starts one) and
  token_accuracy (tagging).

These are the formulas; which of them a task reports, and how its gold and predicted
values reach them (class indices, values, tag names), is its kind's
(`pretrain.transfer.kinds`, whose `score` computes metrics by name). All return plain
floats; an undefined ratio (no positive class, no spans) is 0.0, as
scikit-learn and conlleval report it, and so is the correlation of a constant series or
of fewer than two values, where scipy says NaN: a collapsed model's dev score must
still compare, so that selecting the best step stays defined. tests/test_scores.py
checks each metric against scikit-learn, scipy and seqeval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    return _ratio((gold == predicted).sum(), len(gold))


def _f1(gold: np.ndarray, predicted: np.ndarray, label: int) -> float:
    true_positive = ((predicted == label) & (gold == label)).sum()
    precision = _ratio(true_positive, (predicted == label).sum())
    recall = _ratio(true_positive, (gold == label).sum())
    return _ratio(2 * precision * recall, precision + recall)


def macro_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    labels = np.union1d(gold, predicted)
    return float(np.mean([_f1(gold, predicted, label) for label in labels])) if len(labels) else 0.0


def f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """F1 of the positive class (label 1)."""
    return _f1(np.asarray(gold), np.asarray(predicted), 1)


def mcc(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Matthews correlation coefficient (Gorodkin's multi-class form; the usual one for two classes)."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    labels = np.union1d(gold, predicted)
    confusion = np.array([[((gold == a) & (predicted == b)).sum() for b in labels] for a in labels], np.float64)
    total, correct = confusion.sum(), np.trace(confusion)
    predicted_counts, gold_counts = confusion.sum(axis=0), confusion.sum(axis=1)
    numerator = correct * total - predicted_counts @ gold_counts
    denominator = np.sqrt((total**2 - predicted_counts @ predicted_counts) * (total**2 - gold_counts @ gold_counts))
    return _ratio(numerator, denominator)


def _correlation(correlate: Callable[[np.ndarray, np.ndarray], Any], gold: Sequence[float],
                 predicted: Sequence[float]) -> float:
    """`correlate`'s statistic, or 0.0 where it is undefined (a constant series, fewer
    than two values)."""
    gold, predicted = np.asarray(gold, np.float64), np.asarray(predicted, np.float64)
    if len(gold) < 2 or (gold == gold[0]).all() or (predicted == predicted[0]).all():
        return 0.0
    return float(correlate(gold, predicted).statistic)


def pearson(gold: Sequence[float], predicted: Sequence[float]) -> float:
    """Pearson's r (scipy.stats.pearsonr)."""
    return _correlation(stats.pearsonr, gold, predicted)


def spearman(gold: Sequence[float], predicted: Sequence[float]) -> float:
    """Spearman's rho, ties given their average rank (scipy.stats.spearmanr)."""
    return _correlation(stats.spearmanr, gold, predicted)


def spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(start, end exclusive, type) of each BIO span, decoded as conlleval does."""
    found, start, kind = set(), None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and start is not None and name == kind
        if start is not None and not continues:
            found.add((start, position, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and not continues):
            start, kind = position, name
    return found


def span_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Micro F1 of exact spans over all sentences (tags as strings, e.g. 'B-CODE')."""
    correct = found = expected = 0
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        gold_spans, predicted_spans = spans(gold_tags), spans(predicted_tags)
        correct += len(gold_spans & predicted_spans)
        found += len(predicted_spans)
        expected += len(gold_spans)
    precision, recall = _ratio(correct, found), _ratio(correct, expected)
    return _ratio(2 * precision * recall, precision + recall)


def token_accuracy(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    pairs = [(g, p) for gold_tags, predicted_tags in zip(gold, predicted, strict=True)
             for g, p in zip(gold_tags, predicted_tags, strict=True)]
    return _ratio(sum(g == p for g, p in pairs), len(pairs))

