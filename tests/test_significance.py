"""Significance: Welch's test equals its textbook formula, the bootstrap's fast additive path
equals recomputing the metric on each resample, and the edge cases are exact."""

import math

import numpy as np
import pytest
from scipy import stats

from pretrain.transfer import kinds, significance


def test_welch_is_the_textbook_formula():
    a, b = [0.30, 0.32, 0.35], [0.25, 0.26, 0.24]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite
    assert significance.welch(a, b) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-12)
    assert significance.welch(a, b) == pytest.approx(0.024696, abs=1e-6)
    assert significance.welch([0.3], b) is None and significance.welch([0.2, 0.2], [0.1, 0.1]) is None


def test_seeds_needed_follows_the_normal_approximation():
    a, b = [0.30, 0.32, 0.34], [0.28, 0.30, 0.32]  # difference 0.02, sample std 0.02 each
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert significance.seeds_needed(a, b) == math.ceil(2 * z**2) == 16
    assert significance.seeds_needed(a, a) is None and significance.seeds_needed([0.3], b) is None


def test_the_paired_bootstrap_edge_cases_are_exact():
    gold = [0, 1, 2, 1, 0, 2, 1, 1]
    right, wrong = list(gold), [(g + 1) % 3 for g in gold]
    same = significance.paired_bootstrap("accuracy", ("a", "b", "c"), gold, [right], [right])
    assert same["difference"] == 0.0 and same["p"] == 1.0 and same["interval"] == [0.0, 0.0]
    apart = significance.paired_bootstrap("accuracy", ("a", "b", "c"), gold, [right, right], [wrong])
    assert apart["difference"] == 1.0 and apart["p"] == 0.0 and apart["interval"] == [1.0, 1.0]


@pytest.mark.parametrize("metric", ["accuracy", "span_f1", "token_accuracy", "macro_f1"])
def test_resampled_scores_equal_the_metric_recomputed_on_each_resample(metric):
    rng = np.random.default_rng(0)
    if metric in ("span_f1", "token_accuracy"):
        labels = ("O", "B-CODE", "I-CODE")
        lengths = rng.integers(1, 9, size=40)
        gold = [list(rng.integers(0, 3, size=n)) for n in lengths]
        predicted = [[t if rng.random() < 0.7 else int(rng.integers(0, 3)) for t in row] for row in gold]
    else:
        labels = ("a", "b", "c", "d")
        gold = list(rng.integers(0, 4, size=60))
        predicted = [g if rng.random() < 0.6 else int(rng.integers(0, 4)) for g in gold]
    resamples = rng.integers(0, len(gold), size=(25, len(gold)))
    fast = significance.resampled_scores(metric, labels, gold, predicted, resamples)
    slow = [kinds.score((metric,), labels, [gold[i] for i in row], [predicted[i] for i in row])[metric]
            for row in resamples]
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    assert len(set(np.round(fast, 9))) > 5  # the resamples differ, so the comparison can fail


def test_markers():
    assert [significance.marker(p) for p in (None, 0.2, 0.04, 0.009)] == ["", "", "†", "‡"]
