"""The downstream table's rules on literal results: the bold rule (best mean beats the
runner-up by more than their pooled std), the significance markers, std n/a with one
seed, and a missing cell."""

from __future__ import annotations

from pretrain.transfer import downstream_report


def cell(mean: float, std: float, seeds: int = 3, p_vs_control: float | None = None) -> dict:
    summary = {"metric": "accuracy", "seeds": seeds, "learning_rate": 1e-3,
               "test": {"accuracy": {"mean": mean, "std": std}}}
    if p_vs_control is not None:
        summary["vs_control"] = {"bootstrap": {"p": p_vs_control}}
    return summary


def test_bold_only_where_the_best_beats_the_runner_up_by_more_than_the_pooled_std():
    results = {
        # column a: 0.600 - 0.500 = 0.100 > sqrt((0.05^2 + 0.05^2) / 2) = 0.05 -> bold
        # column b: 0.560 - 0.500 = 0.060 < sqrt((0.1^2 + 0.02^2) / 2) = 0.0721 -> nothing bold
        "mlm": {"t/a": cell(0.6, 0.05, p_vs_control=0.004), "t/b": cell(0.56, 0.1, p_vs_control=0.03)},
        "clm": {"t/a": cell(0.5, 0.05, p_vs_control=0.2), "t/b": cell(0.5, 0.02, p_vs_control=0.01)},
        "random-init": {"t/a": cell(0.3, 0.01)},
    }
    assert downstream_report.table(results).splitlines() == [
        "| run | t/a (accuracy) | t/b (accuracy) |",
        "|---|---:|---:|",
        "| mlm | **0.600 ± 0.050**‡ | 0.560 ± 0.100† |",
        "| clm | 0.500 ± 0.050 | 0.500 ± 0.020† |",  # p = 0.01 is not < 0.01
        "| random-init | 0.300 ± 0.010 | n/a |",
    ]


def test_one_seed_shows_std_as_na_and_nothing_bold():
    results = {"mlm": {"t/a": cell(0.9, 0.0, seeds=1)}, "clm": {"t/a": cell(0.1, 0.0, seeds=1)}}
    assert downstream_report.table(results).splitlines()[2:] == ["| mlm | 0.900 ± n/a |", "| clm | 0.100 ± n/a |"]


def test_a_tie_at_the_pooled_std_is_not_bold():
    # 0.75 - 0.5 = 0.25 = sqrt((0.25^2 + 0.25^2) / 2), exact in binary: "more than" the pooled std fails
    results = {"mlm": {"t/a": cell(0.75, 0.25)}, "clm": {"t/a": cell(0.5, 0.25)}}
    assert "**" not in downstream_report.table(results)
