"""The downstream half of `pretrain.compare`: which objective gives the better model for a task.

After pretraining, every run (and a random-init control of the same shape and
tokenizer, and optionally a fusion of several runs) is fine-tuned on every task
of `config.downstream.tasks` with every method of `config.downstream.methods`,
once per seed of `config.downstream.seeds` (`pretrain.transfer.trainer.run_seeds`,
so finished fine-tunings are not trained again). Each cell of the table is the
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
            directory = os.path.join(workdir, "downstream", row.name, task, method)
            print(f"== fine-tuning {row.name} on {task} ({method}) in {directory}", flush=True)
            results[row.name][f"{task}/{method}"] = run_seeds(finetune_config(downstream, row, task, method),
                                                              directory)
    return results


def _best(means: Sequence[float], stds: Sequence[float]) -> int | None:
    """The index of the best mean when it beats the runner-up by more than their pooled std."""
    if len(means) < 2:
        return None
    order = np.argsort(means)[::-1]
    first, second = order[0], order[1]
    pooled = math.sqrt((stds[first] ** 2 + stds[second] ** 2) / 2)
    return int(first) if means[first] - means[second] > pooled else None


def table(results: Mapping[str, Mapping[str, Any]], digits: int = 3) -> str:
    """Markdown: rows are runs, columns task/method, cells test mean ± std (see module docstring)."""
    names = list(results)
    columns = list(results[names[0]])
    header = ["run", *[f"{column} ({results[names[0]][column]['metric']})" for column in columns]]
    body = [[name] for name in names]
    for column in columns:
        metric = results[names[0]][column]["metric"]
        means = [results[name][column]["test"][metric]["mean"] for name in names]
        stds = [results[name][column]["test"][metric]["std"] for name in names]
        best = _best(means, stds)
        for index, name in enumerate(names):
            cell = f"{means[index]:.{digits}f} ± {stds[index]:.{digits}f}"
            body[index].append(f"**{cell}**" if index == best else cell)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in columns) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])


def caption(results: Mapping[str, Mapping[str, Any]]) -> str:
    first = next(iter(next(iter(results.values())).values()))
    return (f"Test scores at each fine-tuning run's dev-selected step, mean ± std (sample) over {first['seeds']} "
            "seeds per cell. A cell is bold only where its mean beats the runner-up of its column by more than their "
            f"pooled std; `{CONTROL}` is the same model shape and tokenizer trained from scratch on the task.")


def plot(results: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """Grouped bars of the test means with error bars of one std, one group per task/method."""
    names = list(results)
    columns = list(results[names[0]])
    figure = Figure(figsize=(max(5.0, 1.6 * len(columns) * max(1, len(names)) / 3 + 3), 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        means = [results[name][c]["test"][results[name][c]["metric"]]["mean"] for c in columns]
        stds = [results[name][c]["test"][results[name][c]["metric"]]["std"] for c in columns]
        axes.bar(np.arange(len(columns)) + (index - (len(names) - 1) / 2) * width, means, width, yerr=stds,
                 capsize=3, label=name)
    axes.set_xticks(range(len(columns)),
                    [f"{c}\n({results[names[0]][c]['metric']})" for c in columns], fontsize=8)
    axes.set_ylabel("test score at the dev-selected step")
    axes.set_title("Downstream: mean ± std over fine-tuning seeds")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
