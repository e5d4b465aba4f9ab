"""Every metric of pretrain.transfer.scores against a library's: scikit-learn for
classification, scipy.stats for correlation, seqeval (its default, conlleval mode) for
BIO spans and token accuracy. Seeded random inputs of several sizes, then the edge
cases where a ratio is undefined; where our defined value differs from the library's
(scipy's NaN for a constant series), the test states ours and why."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from seqeval import metrics as seqeval
from seqeval.metrics.sequence_labeling import get_entities
from sklearn import metrics as sklearn

from pretrain.transfer import kinds, scores

SEEDS = (0, 1, 2, 3)
SIZES = (2, 5, 40, 500)
TAGS = ("O", "B-A", "I-A", "B-B", "I-B")
TOLERANCE = 1e-12
# scikit-learn's notice on a confusion matrix of one label (one-class inputs), not a failure
SINGLE_LABEL = pytest.mark.filterwarnings("ignore:A single label was found")


def assert_close(ours: float, theirs: float) -> None:
    assert isinstance(ours, float) and abs(ours - theirs) <= TOLERANCE, (ours, theirs)


def assert_classification_matches(gold: list[int], predicted: list[int]) -> None:
    """accuracy, macro_f1 and mcc against scikit-learn; f1 too where the labels are binary.
    zero_division=0.0 is scikit-learn's default value, asked for explicitly to silence its warning."""
    assert_close(scores.accuracy(gold, predicted), sklearn.accuracy_score(gold, predicted))
    assert_close(scores.macro_f1(gold, predicted), sklearn.f1_score(gold, predicted, average="macro",
                                                                    zero_division=0.0))
    assert_close(scores.mcc(gold, predicted), sklearn.matthews_corrcoef(gold, predicted))
    if set(gold) | set(predicted) <= {0, 1}:
        assert_close(scores.f1(gold, predicted), sklearn.f1_score(gold, predicted, average="binary", pos_label=1,
                                                                  zero_division=0.0))


def assert_tagging_matches(gold: list[list[str]], predicted: list[list[str]]) -> None:
    """span_f1 against seqeval's micro F1 (default mode: conlleval's chunking) and
    token_accuracy against seqeval's flattened accuracy."""
    assert_close(scores.span_f1(gold, predicted), seqeval.f1_score(gold, predicted, zero_division=0))
    assert_close(scores.token_accuracy(gold, predicted), seqeval.accuracy_score(gold, predicted))


@SINGLE_LABEL
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("classes", (2, 3, 5))
def test_classification_matches_sklearn_on_random_labels(seed: int, size: int, classes: int):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, classes, size)
    # mostly right, so every metric is away from 0; the rest uniform, so classes are confused
    predicted = np.where(rng.random(size) < 0.6, gold, rng.integers(0, classes, size))
    assert_classification_matches(gold.tolist(), predicted.tolist())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
def test_correlations_match_scipy_on_random_values(seed: int, size: int):
    rng = np.random.default_rng(seed)
    gold = rng.normal(size=size)
    predicted = gold + rng.normal(size=size)
    assert_close(scores.pearson(gold, predicted), stats.pearsonr(gold, predicted).statistic)
    assert_close(scores.spearman(gold, predicted), stats.spearmanr(gold, predicted).statistic)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", (10, 40, 500))
def test_spearman_averages_tied_ranks_as_scipy(seed: int, size: int):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 5, size).astype(np.float64)  # STS-B-like 0..5 scores: many ties on both sides
    predicted = np.where(rng.random(size) < 0.5, gold, rng.integers(0, 5, size))
    assert_close(scores.spearman(gold, predicted), stats.spearmanr(gold, predicted).statistic)
    assert_close(scores.pearson(gold, predicted), stats.pearsonr(gold, predicted).statistic)


def random_tags(rng: np.random.Generator, length: int) -> list[str]:
    """Any tag sequence, ill-formed ones included (I- after O, I- of another type)."""
    return [TAGS[i] for i in rng.integers(0, len(TAGS), length)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sentences", (1, 3, 30))
def test_span_f1_matches_seqeval_on_random_tags(seed: int, sentences: int):
    rng = np.random.default_rng(seed)
    gold = [random_tags(rng, int(rng.integers(1, 12))) for _ in range(sentences)]
    # a fifth of the tags redrawn: spans cut short, extended, retyped or split, most left whole
    predicted = [[TAGS[rng.integers(len(TAGS))] if rng.random() < 0.2 else tag for tag in row] for row in gold]
    assert_tagging_matches(gold, predicted)


@pytest.mark.parametrize("seed", SEEDS)
def test_spans_decode_bio_as_seqeval(seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        tags = random_tags(rng, int(rng.integers(0, 15)))
        # seqeval: (type, start, end inclusive); ours: (start, end exclusive, type)
        assert scores.spans(tags) == {(start, end + 1, kind) for kind, start, end in get_entities(tags)}


# Edge cases.

@SINGLE_LABEL
@pytest.mark.parametrize("gold, predicted", [
    ([1, 1, 1], [1, 1, 1]),  # one class only, all right: accuracy, F1 and macro-F1 1.0, MCC undefined -> 0.0
    ([0, 0, 0], [0, 0, 0]),  # one class only, no positives: F1 undefined -> 0.0
    ([2, 2, 2, 2], [2, 0, 2, 1]),  # one gold class, others predicted
    ([0, 1, 2, 2, 1], [0, 0, 2, 2, 0]),  # class 1 never predicted
    ([0, 1, 2, 2, 1], [1, 1, 1, 1, 1]),  # constant predictions
    ([0, 1, 1, 0], [0, 0, 0, 0]),  # constant predictions, binary, positive class never predicted
    ([0, 1, 1, 0], [1, 1, 1, 1]),  # constant predictions, binary, all positive
    ([1], [1]), ([1], [0]), ([0], [0]), ([3], [3]),  # length 1
])
def test_classification_edge_cases_match_sklearn(gold: list[int], predicted: list[int]):
    assert_classification_matches(gold, predicted)


def test_classification_edge_cases_take_the_documented_values():
    # the values the cases above agree with scikit-learn on, stated: an undefined ratio is 0.0
    assert scores.mcc([1, 1, 1], [1, 1, 1]) == 0.0 and scores.mcc([0, 1, 2], [1, 1, 1]) == 0.0
    assert scores.f1([0, 0, 0], [0, 0, 0]) == 0.0 and scores.f1([0, 1], [0, 0]) == 0.0
    assert scores.macro_f1([1, 1, 1], [1, 1, 1]) == 1.0 and scores.accuracy([], []) == 0.0


@pytest.mark.parametrize("gold, predicted", [
    ([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 3.0, 1.0]),  # a tie in the predictions
    ([1.0, 1.0, 2.0, 2.0, 3.0], [5.0, 5.0, 5.0, 1.0, 2.0]),  # ties on both sides
    ([1.0, 2.0], [2.0, 1.0]),  # the shortest defined series
    ([0.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.5]),  # one value differs on each side
])
def test_correlation_ties_and_short_series_match_scipy(gold: list[float], predicted: list[float]):
    assert_close(scores.pearson(gold, predicted), stats.pearsonr(gold, predicted).statistic)
    assert_close(scores.spearman(gold, predicted), stats.spearmanr(gold, predicted).statistic)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@pytest.mark.parametrize("gold, predicted", [
    ([0.5, 1.0, 3.0], [2.0, 2.0, 2.0]),  # constant predictions: a collapsed regressor
    ([2.0, 2.0, 2.0], [0.5, 1.0, 3.0]),  # constant gold
    ([1.0, 1.0], [1.0, 1.0]),  # both constant
])
def test_correlation_of_a_constant_series_is_zero_where_scipy_says_nan(gold: list[float], predicted: list[float]):
    # scipy: NaN (undefined). Ours: 0.0, so a dev score still compares and step selection stays defined.
    assert np.isnan(stats.pearsonr(gold, predicted).statistic) and np.isnan(stats.spearmanr(gold, predicted).statistic)
    assert scores.pearson(gold, predicted) == 0.0 and scores.spearman(gold, predicted) == 0.0


def test_correlation_of_fewer_than_two_values_is_zero_where_scipy_refuses():
    # scipy: pearsonr raises on one value, spearmanr says NaN. Ours: 0.0, for the same reason as a constant series.
    with pytest.raises(ValueError):
        stats.pearsonr([1.0], [2.0])
    assert np.isnan(stats.spearmanr([1.0], [2.0]).statistic)
    assert scores.pearson([1.0], [2.0]) == 0.0 and scores.spearman([1.0], [2.0]) == 0.0
    assert scores.pearson([], []) == 0.0 and scores.spearman([], []) == 0.0


@pytest.mark.parametrize("gold, predicted", [
    ([["O", "O"], ["O"]], [["O", "O"], ["O"]]),  # no spans anywhere: F1 undefined -> 0.0, as conlleval says
    ([["O", "O"], ["O"]], [["B-A", "O"], ["I-B"]]),  # no gold spans, some predicted
    ([["B-A", "I-A"], ["O"]], [["O", "O"], ["O"]]),  # gold spans, none predicted
    ([["B-A", "I-A", "O"]], [["B-A", "O", "O"]]),  # a partly matched span is wrong
    ([["B-A", "I-A", "O"]], [["B-A", "I-A", "I-A"]]),  # so is an overrunning one
    ([["B-A", "I-A"]], [["B-B", "I-B"]]),  # and a retyped one
    ([["I-A", "I-A", "O"]], [["B-A", "I-A", "O"]]),  # an I- after O starts a span, as B- does
    ([["B-A", "I-B"]], [["B-A", "B-B"]]),  # an I- of another type starts a span
    ([["B-A"]], [["B-A"]]), ([["I-A"]], [["O"]]),  # length 1
    ([[], ["B-A"]], [[], ["B-A"]]),  # an empty sentence
])
def test_tagging_edge_cases_match_seqeval(gold: list[list[str]], predicted: list[list[str]]):
    assert_tagging_matches(gold, predicted)


def test_tagging_edge_cases_take_the_documented_values():
    assert scores.span_f1([["O", "O"]], [["O", "O"]]) == 0.0 and scores.span_f1([["O"]], [["B-A"]]) == 0.0
    assert scores.span_f1([["B-A", "I-A", "O"]], [["B-A", "O", "O"]]) == 0.0
    assert scores.span_f1([["I-A", "I-A", "O"]], [["B-A", "I-A", "O"]]) == 1.0


def test_kinds_score_dispatches_to_the_checked_metrics():
    rng = np.random.default_rng(0)
    gold, predicted = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    out = kinds.score(["accuracy", "macro_f1", "f1", "mcc"], ["no", "yes"], gold, predicted)
    assert out == {"accuracy": scores.accuracy(gold, predicted), "macro_f1": scores.macro_f1(gold, predicted),
                   "f1": scores.f1(gold, predicted), "mcc": scores.mcc(gold, predicted)}
    tag_gold = [rng.integers(0, len(TAGS), 8).tolist() for _ in range(5)]
    tag_predicted = [rng.integers(0, len(TAGS), 8).tolist() for _ in range(5)]
    names = lambda rows: [[TAGS[t] for t in row] for row in rows]  # noqa: E731
    out = kinds.score(["span_f1", "token_accuracy"], TAGS, tag_gold, tag_predicted)
    assert_close(out["span_f1"], seqeval.f1_score(names(tag_gold), names(tag_predicted), zero_division=0))
    assert_close(out["token_accuracy"], seqeval.accuracy_score(names(tag_gold), names(tag_predicted)))
