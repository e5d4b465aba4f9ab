"""The downstream half of `pretrain.compare`: which objective gives the better model for a task.

After pretraining, every run (and a random-init control of the same shape and
tokenizer, and optionally a fusion of several runs) is fine-tuned on every task
of `config.downstream.tasks` with every method of `config.downstream.methods`,
once per seed of `config.downstream.seeds` (`pretrain.transfer.trainer.run_seeds`,
so finished fine-tunings are not trained again). A fusion freezes its bodies, so
its row is filled only in the columns of methods that freeze them too (`probe`),
where it is compared with each body it fuses; elsewhere its cells are n/a. Each cell of the table is the
test score at the dev-selected step, mean ± std over seeds, as in T5's objective
study. A mean is bold only where it beats the runner-up of its column by more than
their pooled standard deviation, sqrt((s1² + s2²) / 2); a table of overlapping
spreads has no bold cell, which is the honest reading of it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.transfer.trainer import run_seeds

CONTROL = "random-init"
PLOT = "downstream.png"


@dataclasses.dataclass
class Row:
    """One row of the downstream table: a pretrained run, the control, or a fusion."""

    name: str
    init: str  # comma-separated run directories ('' for the control)
    shape_from: str = ""


def rows(runs: Sequence[Any], downstream: Any) -> list[Row]:
    """The table's rows: each run, the random-init control, and the fusion (if asked)."""
    out = [Row(run.name, run.directory) for run in runs]
    if downstream.control:
        out.append(Row(CONTROL, "", shape_from=runs[0].directory))
    fused = [name.strip() for name in downstream.fusion.split(",") if name.strip()]
    if fused:
        by_name = {run.name: run for run in runs}
        missing = [name for name in fused if name not in by_name]
        if missing or len(fused) < 2:
            raise ValueError(f"config.downstream.fusion={downstream.fusion!r} must name at least two runs of the "
                             f"comparison ({', '.join(by_name)}); {missing or 'one'} is not")
        out.append(Row("fusion(" + "+".join(fused) + ")", ",".join(by_name[name].directory for name in fused)))
    return out


def cells(downstream: Any) -> list[tuple[str, str]]:
    """(task, method) of every column."""
    tasks = [t.strip() for t in downstream.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in downstream.methods.split(",") if m.strip()]
    return [(task, method) for task in tasks for method in methods]


def is_fusion(row_name: str) -> bool:
    return row_name.startswith("fusion(")


def freezes(method: str) -> bool:
    """Whether a method spec trains only the task parameters, as a fusion does."""
    return "probe" in method.split("+")


def finetune_config(downstream: Any, row: Row, task: str, method: str) -> Any:
    """The fine-tuning config of one row on one (task, method)."""
    config = copy.deepcopy(downstream.finetune)
    with config.unlocked():
        config.task, config.method, config.init, config.shape_from = task, method, row.init, row.shape_from
        config.seeds = tuple(downstream.seeds)
    return config


def run_downstream(runs: Sequence[Any], downstream: Any, workdir: str) -> dict[str, Any]:
    """Fine-tunes every row on every (task, method), each in
    `workdir/downstream/<row>/<task>/<method>/`; returns {row: {task/method: summary}}."""
    results: dict[str, Any] = {}
    for row in rows(runs, downstream):
        results[row.name] = {}
        for task, method in cells(downstream):
            if is_fusion(row.name) and not freezes(method):
                continue  # n/a: fusion is a probe of several bodies
            directory = os.path.join(workdir, "downstream", row.name, task, method)
            print(f"== fine-tuning {row.name} on {task} ({method}) in {directory}", flush=True)
            results[row.name][f"{task}/{method}"] = run_seeds(finetune_config(downstream, row, task, method),
                                                              directory)
    return results


def _best(means: Sequence[float | None], stds: Sequence[float | None]) -> int | None:
    """The index of the best mean when it beats the runner-up by more than their pooled
    std (missing cells left out)."""
    present = [i for i, mean in enumerate(means) if mean is not None]
    if len(present) < 2:
        return None
    order = sorted(present, key=lambda i: means[i], reverse=True)
    first, second = order[0], order[1]
    pooled = math.sqrt((stds[first] ** 2 + stds[second] ** 2) / 2)
    return first if means[first] - means[second] > pooled else None


def _columns(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every task/method column, in the order first seen."""
    return list(dict.fromkeys(column for row in results.values() for column in row))


def _cell(results: Mapping[str, Mapping[str, Any]], name: str, column: str) -> tuple[float | None, float | None]:
    summary = results[name].get(column)
    if summary is None:
        return None, None
    value = summary["test"][summary["metric"]]
    return value["mean"], value["std"]


def _metric(results: Mapping[str, Mapping[str, Any]], column: str) -> str:
    return next(row[column]["metric"] for row in results.values() if column in row)


def table(results: Mapping[str, Mapping[str, Any]], digits: int = 3) -> str:
    """Markdown: rows are runs, columns task/method, cells test mean ± std (see module docstring)."""
    names, columns = list(results), _columns(results)
    header = ["run", *[f"{column} ({_metric(results, column)})" for column in columns]]
    body = [[name] for name in names]
    for column in columns:
        cells_ = [_cell(results, name, column) for name in names]
        best = _best([m for m, _ in cells_], [s for _, s in cells_])
        for index, (mean, std) in enumerate(cells_):
            text = "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
            body[index].append(f"**{text}**" if index == best else text)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in columns) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])


def caption(results: Mapping[str, Mapping[str, Any]]) -> str:
    first = next(iter(next(iter(results.values())).values()))
    return (f"Test scores at each fine-tuning run's dev-selected step, mean ± std (sample) over {first['seeds']} "
            "seeds per cell. A cell is bold only where its mean beats the runner-up of its column by more than their "
            f"pooled std; `{CONTROL}` is the same model shape and tokenizer trained from scratch on the task; a "
            "fusion freezes its bodies, so it is run (and compared) in the frozen-body (probe) columns only.")


def fusion_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
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
            verdict = "beats" if all(mean > v for v in others.values()) else "does not beat"
            lines.append(f"{name} on {column}: {mean:.3f}, {verdict} every body it fuses (best single: {best} "
                         f"{others[best]:.3f}, difference {mean - others[best]:+.3f})")
    return lines


def plot(results: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """Grouped bars of the test means with error bars of one std, one group per task/method."""
    names, columns = list(results), _columns(results)
    figure = Figure(figsize=(max(5.0, 1.6 * len(columns) * max(1, len(names)) / 3 + 3), 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        cells_ = [_cell(results, name, c) for c in columns]
        means = [np.nan if m is None else m for m, _ in cells_]
        stds = [0.0 if s is None else s for _, s in cells_]
        axes.bar(np.arange(len(columns)) + (index - (len(names) - 1) / 2) * width, means, width, yerr=stds,
                 capsize=3, label=name)
    axes.set_xticks(range(len(columns)), [f"{c}\n({_metric(results, c)})" for c in columns], fontsize=8)
    axes.set_ylabel("test score at the dev-selected step")
    axes.set_title("Downstream: mean ± std over fine-tuning seeds")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
