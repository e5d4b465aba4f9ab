"""The comparison's outputs: report.md, loss_curves.png, matrix.png and comparison.json.

Rows are runs, columns the evaluation objectives of `pretrain.evaluate`. The
best value of each column is bold in the tables; the heatmap colours each column
from its best (green) to its worst (red), since losses of different objectives
live on different scales, and prints the numbers in the cells. Plots use
matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.evaluate import write_json
from pretrain.model import preset_name
from pretrain.transfer import compression_report, downstream_report
from pretrain.transfer.comparison import EFFICIENCY_PLOT, PLOT

if TYPE_CHECKING:
    from pretrain.compare import Run

REPORT = "report.md"
LOSS_CURVES = "loss_curves.png"
MATRIX = "matrix.png"
SUMMARY = "comparison.json"


def loss_curve(directory: str) -> tuple[list[int], list[float]]:
    """(steps, training losses) logged in a run's metrics.jsonl."""
    steps, losses = [], []
    path = os.path.join(directory, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if "loss" in record:
                    steps.append(int(record["step"]))
                    losses.append(float(record["loss"]))
    return steps, losses


BASELINE_MARGIN = 0.05  # nats: a held-out loss closer than this to its unigram baseline has learnt little


def baseline_flags(runs: Sequence[Run]) -> list[str]:
    """A line for every run whose final held-out loss is not clearly below its unigram
    baseline (both from its training log's last evaluation)."""
    flags = []
    for run in runs:
        path = os.path.join(run.directory, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if '"eval/baseline"' in line]
        if records and records[-1]["eval/loss"] > records[-1]["eval/baseline"] - BASELINE_MARGIN:
            flags.append(f"{run.name} did not get past its unigram baseline: held-out loss "
                         f"{records[-1]['eval/loss']:.3f} against {records[-1]['eval/baseline']:.3f} (step "
                         f"{records[-1]['step']}); its body is a weak start, so its downstream row says little")
    return flags


def groups(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs grouped by the run they are pretraining seeds of, in order."""
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.group, []).append(run)
    return list(out.values())


def matrix(runs: Sequence[Run], metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(objective names, means [groups, objectives], sample stds [groups, objectives]) of
    one metric over each group's pretraining seeds (std 0 for a single seed). A cell a
    run could not be scored in (an objective scored through heads only its own runs
    have, `pretrain.evaluate.unscorable`) is NaN."""
    names = list(dict.fromkeys(name for run in runs for name in run.evaluation["objectives"]))
    values = [np.array([[run.evaluation["objectives"].get(name, {}).get(metric, np.nan) for name in names]
                        for run in group], dtype=np.float64) for group in groups(runs)]
    means = np.array([v.mean(axis=0) for v in values])
    stds = np.array([v.std(axis=0, ddof=1) if len(v) > 1 else np.zeros(len(names)) for v in values])
    return names, means, stds


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 2) -> str:
    """A Markdown table; the first `text_columns` left-aligned, numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def matrix_table(runs: Sequence[Run], metric: str, lower_is_better: bool, digits: int = 3) -> str:
    """The runs x objectives table of `metric` in Markdown, the best of each column bold;
    mean ± std over pretraining seeds when runs have several."""
    names, values, stds = matrix(runs, metric)
    scored = ~np.isnan(values)
    best = np.where(scored, values, np.inf if lower_is_better else -np.inf)
    best = best.min(axis=0) if lower_is_better else best.max(axis=0)
    seeded = any(len(group) > 1 for group in groups(runs))
    rows = []
    for r, group in enumerate(groups(runs)):
        texts = ["n/a" if np.isnan(v) else f"{v:.{digits}f} ± {s:.{digits}f}" if seeded else f"{v:.{digits}f}"
                 for v, s in zip(values[r], stds[r])]
        cells = [f"**{t}**" if values[r][c] == best[c] and scored[:, c].sum() > 1 else t
                 for c, t in enumerate(texts)]
        rows.append([group[0].group, f"`{group[0].objective}`", *cells])
    return _table(["run", "trained on", *names], rows)


def runs_table(runs: Sequence[Run]) -> str:
    """Steps, tokens, parameters, final training loss and wall time of every run."""
    rows = []
    for run in runs:
        evaluation = run.evaluation
        steps, losses = loss_curve(run.directory)
        tokens = evaluation.get("tokens_seen")
        rows.append([run.name, f"`{run.objective}`", f"{evaluation['step']:,}",
                     f"{tokens:,}" if tokens is not None else "n/a", f"{evaluation['parameters']:,}",
                     f"{losses[-1]:.3f}" if losses else "n/a", f"{run.wall_time_s:.0f} s"])
    return _table(["run", "objective", "steps", "tokens seen", "parameters", "final training loss",
                   "training wall time"], rows)


def smoothed(values: Sequence[float], decay: float = 0.8) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = decay * average + (1 - decay) * value
        out.append(average / (1 - decay**count))
    return out


def plot_loss_curves(runs: Sequence[Run], path: str) -> None:
    """Training loss against step, every run on one figure (faint: as logged; bold: smoothed)."""
    figure = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run in runs:
        steps, losses = loss_curve(run.directory)
        raw = axes.plot(steps, losses, linewidth=0.8, alpha=0.35)[0]
        axes.plot(steps, smoothed(losses), color=raw.get_color(), linewidth=1.8, label=f"{run.name} ({run.objective})")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (each run's own objective)")
    axes.text(0.99, 0.98, "faint: per logged step; bold: moving average", transform=axes.transAxes, ha="right",
              va="top", fontsize=7, color="0.4")
    axes.set_title("Training loss under one budget")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def plot_matrix(runs: Sequence[Run], path: str) -> None:
    """The held-out matrix as a heatmap: loss (accuracy) in each cell; each column's colour
    scale spans its own rows, from its best to its worst loss (the range printed under
    the column's name), since objectives' losses live on different scales."""
    names, loss, _ = matrix(runs, "loss")
    _, accuracy, _ = matrix(runs, "accuracy")
    low, high = np.nanmin(loss, axis=0), np.nanmax(loss, axis=0)  # every column has a scored run: its trainer
    span = high - low
    shade = (loss - low) / np.where(span > 0, span, 1.0)  # 0: best of the column; NaN (not scored): blank
    figure = Figure(figsize=(1.3 * len(names) + 2.5, 0.6 * len(loss) + 2.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shade, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    for r in range(len(loss)):
        for c in range(len(names)):
            text = "n/a" if np.isnan(loss[r, c]) else f"{loss[r, c]:.2f}\n({accuracy[r, c]:.0%})"
            axes.text(c, r, text, ha="center", va="center", fontsize=8)
    ranges = [f"{name}\n{low[c]:.2f}-{high[c]:.2f} nats" for c, name in enumerate(names)]
    axes.set_xticks(range(len(names)), ranges, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(len(loss)), [group[0].group for group in groups(runs)], fontsize=8)
    axes.set_xlabel("evaluated as")
    axes.set_ylabel("trained run")
    axes.set_title("Held-out loss (accuracy)")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04)
    colorbar.set_ticks([0, 1], labels=["best in column", "worst"])
    figure.tight_layout()
    figure.savefig(path)


def _budget_line(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> str:
    model, first = config.budget.model, runs[0].config
    slots = first.total_steps * first.batch_size * first.seq_len
    return (f"Every run: model `{preset_name(model)}` ({model.num_layers} layers, width {model.model_dim}, "
            f"{model.num_heads} heads, {runs[0].evaluation['parameters']:,} parameters), data "
            f"`{config.budget.data.kind}`, one SentencePiece tokenizer of {config.budget.tokenizer.vocab_size:,} "
            f"pieces, {first.total_steps:,} steps x {first.batch_size} rows x {first.seq_len} tokens = "
            f"{slots:,} token slots, AdamW at peak learning rate {first.optimizer.learning_rate:g} "
            f"({first.optimizer.warmup_steps:,} warmup steps, {first.optimizer.schedule} decay).")  # as the runs ran


def _task_baselines(downstream: Mapping[str, Any]) -> str:
    """'column: majority 0.05, chance 0.02; ...' from the summaries' task baselines."""
    seen = {}
    for row in downstream.values():
        for column, summary in row.items():
            if summary.get("baselines") and column not in seen:
                seen[column] = ", ".join(f"{k} {v:.3f}" for k, v in summary["baselines"].items())
    return "; ".join(f"{column}: {text}" for column, text in seen.items())


def markdown(runs: Sequence[Run], config: ml_collections.ConfigDict, command: str, wall_time_s: float,
             downstream: Mapping[str, Any] | None = None) -> str:
    """The whole report.md."""
    heldout = runs[0].evaluation["heldout"]
    training = sum(run.wall_time_s for run in runs)
    seeds = tuple(config.pretrain_seeds)
    flags = baseline_flags(runs)
    downstream_part = [] if not downstream else [
        "## Downstream (higher is better)", downstream_report.verdict(downstream),
        downstream_report.table(downstream), downstream_report.caption(downstream),
        *(["\n".join(f"- {line}" for line in downstream_report.fusion_lines(downstream))]
          if downstream_report.fusion_lines(downstream) else []),
        f"![sample efficiency]({EFFICIENCY_PLOT})", f"![downstream scores]({PLOT})",
        "### Learning rates chosen on dev", downstream_report.rates_table(downstream),
        "### Steps to reach the control's final dev score (of the cell's steps)",
        downstream_report.steps_table(downstream),
        *(["### Compressed (pretrain/transfer/compression.py)", compression_report.table(downstream),
           compression_report.caption(), f"![score against size]({compression_report.PLOT})"]
          if compression_report.table(downstream) else []),
        "### Significance", downstream_report.significance_table(downstream),
        "Difference: the row's mean test score minus the other's; in pooled SEs: divided by sqrt(s1²/n1 + "
        "s2²/n2) over seeds. Bootstrap: paired over test examples, each row "
        "the mean of its seeds' dev-selected models on each of 1,000 resamples (two-sided p). Welch: over seeds "
        "(n/a below 2 seeds). Seeds needed: per row, for a two-sided Welch test at alpha 0.05 with power 0.8 to find "
        "a difference of this size at the observed spread.",
        *([f"Majority-class and chance test scores: {baselines}"] if (baselines := _task_baselines(downstream))
          else [])]
    return "\n\n".join([
        "# Objective comparison",
        f"```bash\n{command}\n```",
        _budget_line(config, runs),
        *(["**Warning:** " + "; ".join(flags) + "."] if flags else []),
        *downstream_part,
        "## Held-out loss (lower is better)" + (f", mean ± std over pretraining seeds {seeds}" if len(seeds) > 1
                                                 else ""),
        matrix_table(runs, "loss", lower_is_better=True),
        "## Held-out accuracy (higher is better)",
        matrix_table(runs, "accuracy", lower_is_better=False),
        "Columns are objectives the model is scored under (`pretrain.evaluate`, paper-default settings), "
        "whatever it was trained with: each column is that objective's own loss on its own held-out examples, "
        "weighted where it puts its loss (every token for a causal LM, whose perplexity is exp(loss); the masked "
        "or corrupted tokens for the denoisers; one column per leaf of an objective with parts). "
        f"Held-out set: {heldout['documents']} documents, seq_len {heldout['seq_len']}, seed {heldout['seed']}, "
        f"identical for every run (fingerprint `{heldout['fingerprint']}`).",
        "## Runs",
        runs_table(runs),
        f"Training wall time, all runs: {training:.0f} s; this invocation (training what was not finished, "
        f"evaluation, report): {wall_time_s:.0f} s. Training losses of different objectives are not comparable "
        "with each other; the matrix is.",
        f"![training loss]({LOSS_CURVES})",
        f"![held-out matrix]({MATRIX})",
        f"<details><summary>config</summary>\n\n```yaml\n{config}```\n\n</details>\n",
    ])


def write(workdir: str, runs: Sequence[Run], config: ml_collections.ConfigDict, command: str,
          wall_time_s: float, downstream: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Writes report.md, the PNGs and comparison.json into `workdir`; returns their paths."""
    paths = {name: os.path.join(workdir, name) for name in (REPORT, LOSS_CURVES, MATRIX, SUMMARY)}
    plot_loss_curves(runs, paths[LOSS_CURVES])
    plot_matrix(runs, paths[MATRIX])
    if downstream:
        paths[PLOT] = os.path.join(workdir, PLOT)
        downstream_report.plot(downstream, paths[PLOT])
        paths[EFFICIENCY_PLOT] = os.path.join(workdir, EFFICIENCY_PLOT)
        downstream_report.efficiency_plot(downstream, paths[EFFICIENCY_PLOT])
        if compression_report.table(downstream):
            paths[compression_report.PLOT] = os.path.join(workdir, compression_report.PLOT)
            compression_report.plot(downstream, paths[compression_report.PLOT])
    with open(paths[REPORT], "w", encoding="utf-8") as handle:
        handle.write(markdown(runs, config, command, wall_time_s, downstream))
    summary: dict[str, Any] = {
        "command": command, "wall_time_s": wall_time_s, "config": json.loads(config.to_json_best_effort()),
        "runs": {run.name: {"objective": run.objective, "directory": run.directory, "wall_time_s": run.wall_time_s,
                            "trained_now": run.trained_now, "evaluation": run.evaluation} for run in runs},
        "downstream": {name: {column: {k: v for k, v in summary.items() if k != "test_predictions"}
                              for column, summary in row.items()} for name, row in (downstream or {}).items()}}
    write_json(summary, paths[SUMMARY])
    return paths
