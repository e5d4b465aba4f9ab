"""The downstream part of a comparison's report: tables, the verdict, and plots.

Reads only the results `pretrain.transfer.comparison.run_downstream` returns
({row: {column: summary}}); computes nothing that needs a model.

  table             test mean ± std per row and column; bold where the best mean beats the
                    runner-up by more than their pooled std; † / ‡ where the paired bootstrap
                    against the control gives p < 0.05 / 0.01; with one seed, std is n/a and
                    nothing is bold
  rates_table       the learning rate each cell chose on dev
  steps_table       fine-tuning steps each row needs to reach the control's final dev score
                    (its seeds' mean dev curve against the control's mean final dev score)
  significance_table  every row against the control and the best row: differences, both
                    p-values, and the seeds a difference of that size would need
  verdict           one paragraph from the numbers
  plot, efficiency_plot  bars per column; score against labelled examples per task/method
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from pretrain.transfer.comparison import CONTROL, is_fusion
from pretrain.transfer.significance import marker

Results = Mapping[str, Mapping[str, Any]]
SIGNIFICANT = 0.05


def _best(means: Sequence[float | None], stds: Sequence[float | None]) -> int | None:
    """The index of the best mean when it beats the runner-up by more than their pooled
    std (missing cells left out; never with a missing std: one seed shows no spread)."""
    present = [i for i, mean in enumerate(means) if mean is not None]
    if len(present) < 2 or any(stds[i] is None for i in present):
        return None
    order = sorted(present, key=lambda i: means[i], reverse=True)
    first, second = order[0], order[1]
    pooled = math.sqrt((stds[first] ** 2 + stds[second] ** 2) / 2)
    return first if means[first] - means[second] > pooled else None


def columns(results: Results) -> list[str]:
    """Every column, in the order first seen."""
    return list(dict.fromkeys(column for row in results.values() for column in row))


def _cell(results: Results, name: str, column: str) -> tuple[float | None, float | None]:
    summary = results[name].get(column)
    if summary is None:
        return None, None
    value = summary["test"][summary["metric"]]
    return value["mean"], (value["std"] if summary["seeds"] > 1 else None)


def _metric(results: Results, column: str) -> str:
    return next(row[column]["metric"] for row in results.values() if column in row)


def _bootstrap_p(summary: Mapping[str, Any], key: str) -> float | None:
    test = summary.get(key)
    return None if not test else test["bootstrap"]["p"]


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])


def table(results: Results, digits: int = 3) -> str:
    """Markdown: rows, columns task/method[@fraction], cells test mean ± std (module docstring)."""
    names, cols = list(results), columns(results)
    body = [[name] for name in names]
    for column in cols:
        cells_ = [_cell(results, name, column) for name in names]
        best = _best([m for m, _ in cells_], [s for _, s in cells_])
        for index, (mean, std) in enumerate(cells_):
            if mean is None:
                body[index].append("n/a")
                continue
            text = f"{mean:.{digits}f} ± " + ("n/a" if std is None else f"{std:.{digits}f}")
            text = f"**{text}**" if index == best else text
            body[index].append(text + marker(_bootstrap_p(results[names[index]][column], "vs_control")))
    return _markdown(["run", *[f"{c} ({_metric(results, c)})" for c in cols]], body)


def caption(results: Results) -> str:
    first = next(iter(next(iter(results.values())).values()))
    return (f"Test scores at each fine-tuning run's dev-selected step, mean ± std (sample) over {first['seeds']} "
            "seeds per cell, each cell at the learning rate it chose on dev (seed 0 at every rate of the grid, the "
            "other seeds at the best). `@f`: fine-tuned on a stratified fraction f of the training split (dev and "
            "test unchanged). A cell is bold only where its mean beats the runner-up of its column by more than their "
            f"pooled std; † / ‡: differs from `{CONTROL}` (the same model shape and tokenizer trained from scratch on "
            "the task) with p < 0.05 / 0.01 in a paired bootstrap over test examples (1,000 resamples).")


def rates_table(results: Results) -> str:
    """The learning rate each cell chose on dev."""
    names, cols = list(results), columns(results)
    body = [[name, *[f"{results[name][c]['learning_rate']:g}" if c in results[name] else "n/a" for c in cols]]
            for name in names]
    return _markdown(["run", *cols], body)


def steps_to_control(results: Results, name: str, column: str) -> int | None:
    """The first evaluated step at which the row's seeds' mean dev score reaches the
    control's mean final dev score (None: never, or no control)."""
    if CONTROL not in results or column not in results[CONTROL] or column not in results[name]:
        return None
    target = np.mean([curve[-1][1] for curve in results[CONTROL][column]["dev_curves"]])
    curves = results[name][column]["dev_curves"]
    steps = [step for step, _ in curves[0]]
    mean = np.mean([[value for _, value in curve] for curve in curves], axis=0)
    reached = [step for step, value in zip(steps, mean) if value >= target]
    return reached[0] if reached else None


def steps_table(results: Results) -> str:
    """Steps each row needs to reach the control's final dev score, of the cell's steps."""
    names, cols = list(results), [c for c in columns(results) if CONTROL in results and c in results[CONTROL]]
    body = []
    for name in names:
        row = [name]
        for column in cols:
            if column not in results[name]:
                row.append("n/a")
                continue
            reached = steps_to_control(results, name, column)
            row.append(f"{'never' if reached is None else reached} / {results[name][column]['steps']}")
        body.append(row)
    return _markdown(["run", *cols], body)


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def standard_errors(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> float | None:
    """The difference of two cells' means in pooled standard errors over seeds,
    (m1 - m2) / sqrt(s1²/n1 + s2²/n2); None below two seeds or without spread."""
    a, b = (np.asarray(c["test"][c["metric"]]["per_seed"], np.float64) for c in (mine, theirs))
    if len(a) < 2 or len(b) < 2:
        return None
    error = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return None if error == 0 else float((a.mean() - b.mean()) / error)


def significance_table(results: Results) -> str:
    """Every row against the control and the column's best row."""
    body = []
    for column in columns(results):
        for name, row in results.items():
            for key in ("vs_control", "vs_best"):
                test = row.get(column, {}).get(key)
                if not test:
                    continue
                bootstrap = test["bootstrap"]
                errors = standard_errors(row[column], results[test["row"]][column])
                body.append([f"{name} vs {test['row']}", column, f"{test['difference']:+.3f}",
                             "n/a" if errors is None else f"{errors:+.1f}",
                             f"[{bootstrap['interval'][0]:+.3f}, {bootstrap['interval'][1]:+.3f}]",
                             _p(bootstrap["p"]), _p(test["welch_p"]),
                             "n/a" if test["seeds_needed"] is None else str(test["seeds_needed"])])
    return _markdown(["rows", "column", "difference", "in pooled SEs", "bootstrap 95% interval", "bootstrap p",
                      "Welch p (seeds)", "seeds needed"], body)


def verdict(results: Results) -> str:
    """One paragraph: per column, which rows beat the control and lose to it (paired
    bootstrap p < 0.05), and the best row against the runner-up."""
    sentences = []
    for column in columns(results):
        present = {name: row[column] for name, row in results.items() if column in row}
        metric = _metric(results, column)
        better = [f"{n} {_p(s['vs_control']['bootstrap']['p'])}" for n, s in present.items()
                  if s.get("vs_control") and s["vs_control"]["difference"] > 0
                  and s["vs_control"]["bootstrap"]["p"] < SIGNIFICANT]
        worse = [n for n, s in present.items() if s.get("vs_control") and s["vs_control"]["difference"] < 0
                 and s["vs_control"]["bootstrap"]["p"] < SIGNIFICANT]
        pretrained = [n for n in present if n != CONTROL]
        best = max(present, key=lambda n: present[n]["test"][metric]["mean"])
        text = f"On {column} ({metric})"
        if CONTROL in present:
            text += (f", {len(better)} of {len(pretrained)} pretrained rows beat the control"
                     + (f" (bootstrap p: {', '.join(better)})" if better else "")
                     + (f" and {', '.join(worse)} lose to it" if worse else ""))
        others = [s for n, s in present.items() if n != best]
        runner = max(others, key=lambda s: s["test"][metric]["mean"]) if others else None
        test = next((s.get("vs_best") for n, s in present.items() if s is runner), None)
        text += f"; the best row is {best} ({present[best]['test'][metric]['mean']:.3f})"
        if test:
            name = next(n for n, s in present.items() if s is runner)
            text += f", {-test['difference']:.3f} ahead of {name} (bootstrap p {_p(test['bootstrap']['p'])})"
        sentences.append(text + ".")
    return " ".join(sentences)


def fusion_lines(results: Results) -> list[str]:
    """Per column, whether the fusion row beats each single pretrained run it fuses."""
    lines = []
    for name, row in results.items():
        if not is_fusion(name):
            continue
        parts = name[len("fusion(") : -1].split("+")
        for column, summary in row.items():
            metric = summary["metric"]
            mean = summary["test"][metric]["mean"]
            others = {part: results[part][column]["test"][metric]["mean"] for part in parts
                      if column in results.get(part, {})}
            if not others:
                continue
            best = max(others, key=others.get)
            verdict_ = "beats" if all(mean > v for v in others.values()) else "does not beat"
            lines.append(f"{name} on {column}: {mean:.3f}, {verdict_} every body it fuses (best single: {best} "
                         f"{others[best]:.3f}, difference {mean - others[best]:+.3f})")
    return lines


def plot(results: Results, path: str) -> None:
    """Grouped bars of the test means with error bars of one std, one group per column."""
    names, cols = list(results), columns(results)
    figure = Figure(figsize=(max(5.0, 1.6 * len(cols) * max(1, len(names)) / 3 + 3), 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        cells_ = [_cell(results, name, c) for c in cols]
        means = [np.nan if m is None else m for m, _ in cells_]
        stds = [0.0 if s is None else s for _, s in cells_]
        axes.bar(np.arange(len(cols)) + (index - (len(names) - 1) / 2) * width, means, width, yerr=stds,
                 capsize=3, label=name)
    axes.set_xticks(range(len(cols)), [f"{c}\n({_metric(results, c)})" for c in cols], fontsize=7)
    axes.set_ylabel("test score at the dev-selected step")
    axes.set_title("Downstream: mean ± std over fine-tuning seeds")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def efficiency_plot(results: Results, path: str) -> None:
    """Sample efficiency: per task/method, the test score against the labelled training
    examples (log x), one line per row with a band of one std over seeds."""
    groups = list(dict.fromkeys(c.split("@")[0] for c in columns(results)))
    wide = min(2, len(groups))
    high = math.ceil(len(groups) / wide)
    figure = Figure(figsize=(4.6 * wide, 3.6 * high), dpi=120)
    FigureCanvasAgg(figure)
    for index, group in enumerate(groups):
        axes = figure.add_subplot(high, wide, index + 1)
        for name, row in results.items():
            points = sorted((s["train_examples"], s["test"][s["metric"]]["mean"], s["test"][s["metric"]]["std"])
                            for c, s in row.items() if c.split("@")[0] == group)
            if not points:
                continue
            x, mean, std = (np.asarray(v, np.float64) for v in zip(*points))
            line = axes.plot(x, mean, marker="o", label=name, linestyle="--" if name == CONTROL else "-")[0]
            axes.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
        axes.set_xscale("log")
        sizes = sorted({s["train_examples"] for row in results.values() for c, s in row.items()
                        if c.split("@")[0] == group})
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xticks(sizes, [f"{n:,}" for n in sizes])
        axes.set_xlabel("labelled training examples")
        axes.set_ylabel(f"test {_metric(results, next(c for c in columns(results) if c.startswith(group)))}")
        axes.set_title(group, fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
