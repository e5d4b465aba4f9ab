"""The downstream half of `pretrain.compare`: which objective gives the better model for a task.

After pretraining, every run (and a random-init control of the same shape and
tokenizer, and optionally a fusion of several runs) is fine-tuned on every task
of `config.downstream.tasks` with every method of `config.downstream.methods`,
on every label fraction of `config.downstream.label_fractions` (nested, stratified
subsets of the training split: `tasks.label_subset`). The protocol of each such
cell is BERT's (appendix A.3):

  1. seed 0 is fine-tuned at every rate of `downstream.learning_rates`; the rate
     whose dev-selected score is best is the cell's rate (every row, the control
     included, gets its own best rate);
  2. the other seeds are fine-tuned at that rate;
  3. each seed's test score is read at its dev-selected step.

The runs of each step are one vmapped program (`pretrain.transfer.sweep`); a
finished cell is saved as `workdir/downstream/<row>/<task>/<method>/<fraction>/cell.json`
and not trained again. A fusion fine-tunes like any row (`probe` freezes its bodies
and trains the gate and head; `full` trains the bodies jointly with them).

Each cell of the table is the test score mean ± std over seeds, as in T5's objective
study. A mean is bold only where it beats the runner-up of its column by more than
their pooled standard deviation, sqrt((s1² + s2²) / 2); a table of overlapping
spreads has no bold cell, which is the honest reading of it. Beside it,
`pretrain.transfer.significance` tests every row against the control and against
the best row (Welch over seeds, paired bootstrap over test examples).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.inference import checkpoint_steps
from pretrain.transfer import compression, significance, sweep, tasks
from pretrain.transfer.trainer import load_bodies, seed_config, summarize_seeds

CONTROL = "random-init"
PLOT = "downstream.png"
EFFICIENCY_PLOT = "sample_efficiency.png"
CELL_FILENAME = "cell.json"


@dataclasses.dataclass
class Row:
    """One row of the downstream table: a pretrained run, the control, or a fusion."""

    name: str
    init: str  # comma-separated run directories ('' for the control)
    shape_from: str = ""
    layout: str = ""  # the fine-tuning config's layout for this row ('': the config's own)


def rows(runs: Sequence[Any], downstream: Any) -> list[Row]:
    """The table's rows: each run, the random-init control, and the fusion (if asked)."""
    out = [Row(run.name, run.directory) for run in runs]
    if downstream.control:
        out.append(Row(CONTROL, "", shape_from=runs[0].directory, layout=downstream.control_layout))
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
    """(task, method) of every column group."""
    tasks_ = [t.strip() for t in downstream.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in downstream.methods.split(",") if m.strip()]
    return [(task, method) for task in tasks_ for method in methods]


def fractions(downstream: Any) -> list[float]:
    """The label fractions, smallest first (1.0: the whole training split)."""
    values = sorted({float(f) for f in downstream.label_fractions}) or [1.0]
    bad = [f for f in values if not 0 < f <= 1]
    if bad:
        raise ValueError(f"config.downstream.label_fractions={tuple(downstream.label_fractions)!r}: {bad[0]!r} "
                         "must lie in (0, 1], e.g. '(0.1,1.0)'")
    return values


def column(task: str, method: str, fraction: float) -> str:
    """A table column: 'task/method', with '@fraction' below the whole training split."""
    return f"{task}/{method}" + ("" if fraction == 1 else f"@{fraction:g}")


def is_fusion(row_name: str) -> bool:
    return row_name.startswith("fusion(")


def freezes(method: str) -> bool:
    """Whether a method spec trains only the task parameters (a probe of frozen bodies)."""
    return "probe" in method.split("+")


def finetune_config(downstream: Any, row: Row, task: str, method: str) -> Any:
    """The fine-tuning config of one row on one (task, method)."""
    config = copy.deepcopy(downstream.finetune)
    with config.unlocked():
        config.task, config.method, config.init, config.shape_from = task, method, row.init, row.shape_from
        config.layout = row.layout or config.layout
        config.seeds = tuple(downstream.seeds)
    return config


def rate_key(rate: float) -> str:
    return f"{rate:g}"


Train = Callable[[Sequence[sweep.Member], int, int], list[dict[str, Any]]]


def tune_cell(train: Train, *, seeds: Sequence[int], learning_rates: Sequence[float], total_steps: int,
              eval_every: int) -> dict[str, Any]:
    """BERT's protocol for one cell: seed `seeds[0]` at every rate, the rate with the best
    dev score (the smaller on a tie) for the other seeds; `train(members, steps,
    eval_every)` fine-tunes members together. Returns the grid's dev scores, the chosen
    rate and one result per seed (in `seeds` order)."""
    first = train([sweep.Member(seeds[0], rate) for rate in learning_rates], total_steps, eval_every)
    grid = {rate_key(r["learning_rate"]): r["dev"][r["metric"]] for r in first}
    chosen = max(first, key=lambda r: (r["dev"][r["metric"]], -r["learning_rate"]))
    rest = train([sweep.Member(seed, chosen["learning_rate"]) for seed in seeds[1:]], total_steps, eval_every)
    return {"grid": grid, "learning_rate": chosen["learning_rate"], "results": [chosen, *rest]}


class BodyCache:
    """The bodies of every row, restored once per run directory (a pretrained body is the
    same for every seed; the control's random body is made per seed)."""

    def __init__(self) -> None:
        self._bodies: dict[tuple[str, str, int], Any] = {}
        self.tokenizer = None

    def bodies_of(self, config: Any) -> Callable[[int], Any]:
        def of(seed: int):
            key = (config.init, config.shape_from, seed if not config.init.strip() else 0)
            if key not in self._bodies:
                self._bodies[key], tokenizer = load_bodies(seed_config(config, key[2]))
                self.tokenizer = self.tokenizer or tokenizer
            return self._bodies[key]

        return of


def _fingerprint(config: Any, row: Row, task: tasks.Task, fraction: float, downstream: Any,
                 steps: int, eval_every: int) -> dict[str, Any]:
    """What a saved cell must match to be reused: the fine-tuning config, the task's
    examples, the bodies' checkpoints, the protocol."""
    steps_of = {}
    for run in [r for r in row.init.split(",") if r.strip()]:
        try:
            steps_of[run] = checkpoint_steps(run)[-1]
        except (FileNotFoundError, IndexError):
            steps_of[run] = 0
    return {"finetune": json.loads(config.to_json_best_effort()), "task": task.fingerprint, "fraction": fraction,
            "learning_rates": list(learning_rates(downstream, config.method)), "seeds": list(downstream.seeds),
            "bodies": steps_of, "total_steps": steps, "eval_every": eval_every}


def _summary(cell: Mapping[str, Any], task: tasks.Task, method: str, fraction: float) -> dict[str, Any]:
    results = cell["results"]
    summary = summarize_seeds(results)
    summary.update(method=method, fraction=fraction, train_examples=len(task.splits["train"]),
                   learning_rate=cell["learning_rate"], grid=cell["grid"], steps=results[0]["last_step"],
                   dev={task.metric: float(np.mean([r["dev"][task.metric] for r in results]))},
                   dev_curves=[[(e["step"], e["dev"][task.metric]) for e in r["evaluations"]] for r in results],
                   test_predictions=[r["test_predictions"] for r in results],
                   nonfinite=[r["seed"] for r in results if r.get("nonfinite_step")], baselines=tasks.baseline_scores(task),
                   train_seconds=cell.get("train_seconds", 0.0), compile_seconds=cell.get("compile_seconds", 0.0))
    if "compressed" in results[0]:
        summary["compressed"] = compressed_summary(results, task.metric)
    return summary


def compressed_summary(results: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """{technique: its test metric and its retained fraction of the uncompressed one (each
    seed's compressed / uncompressed score), mean ± std over seeds, with the variant's
    parameters, bytes and inference tokens/s}, 'none' included for the sizes."""
    out = {}
    for technique, measured in results[0]["measurements"].items():
        entry = dict(measured)
        if technique != "none":
            scores = np.asarray([r["compressed"][technique][metric] for r in results], np.float64)
            base = np.asarray([r["test"][metric] for r in results], np.float64)
            retained = np.where(base != 0, scores / np.where(base != 0, base, 1.0), np.nan)
            for name, values in (("test", scores), ("retained", retained)):
                entry[name] = {"mean": float(np.mean(values)),
                               "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                               "per_seed": [float(v) for v in values]}
        out[technique] = entry
    return out


def post_training_settings(compression_config: Any) -> dict[str, Any] | None:
    """What the sweeps need of `config.compression` to score their members compressed
    (`pretrain.transfer.compression`), or None when no post-training technique is asked for."""
    if compression_config is None:
        return None
    chosen = [t for t in compression.techniques(compression_config.techniques) if t in compression.POST_TRAINING]
    if not chosen:
        return None
    return {"techniques": chosen, **{name: compression_config[name] for name in (
        "prune_fraction", "prune_step_fraction", "importance_batches", "speed_repeats")}}


def run_downstream(runs: Sequence[Any], downstream: Any, workdir: str, compression_config: Any = None
                   ) -> dict[str, Any]:
    """Fine-tunes every row on every (task, method, label fraction) by the protocol of
    the module docstring; returns {row: {column: summary}}, each summary with its
    significance against the control and the best row. With post-training techniques in
    `compression_config` (`config.compression`), every row but the control is also scored
    compressed (`pretrain.transfer.compression`; the summary's `compressed`)."""
    settings = post_training_settings(compression_config)
    table_rows, groups, fraction_list = rows(runs, downstream), cells(downstream), fractions(downstream)
    seeds = tuple(int(s) for s in downstream.seeds)
    bodies, cache = BodyCache(), sweep.ProgramCache()
    data: dict[tuple[str, float], sweep.TaskData] = {}
    results: dict[str, dict[str, Any]] = {row.name: {} for row in table_rows}
    for task_name in dict.fromkeys(t for t, _ in groups):  # each task tokenized once per fraction, for every cell
        config = finetune_config(downstream, table_rows[0], task_name, groups[0][1])
        whole = tasks.load_task(config, bodies.bodies_of(config)(seeds[0])[0].run_config.data)
        for fraction in fraction_list:
            subset = tasks.label_subset(whole, fraction, seed=downstream.subset_seed)
            data[(task_name, fraction)] = sweep.TaskData(subset, bodies.tokenizer, seq_len=config.seq_len,
                                                         batch_size=config.batch_size, packed=config.packed)

    def cost(row: Row, task_name: str, method: str, fraction: float) -> float:
        """Relative compute of a cell (for the time estimate): steps x runs x bodies, a
        frozen body's forward pass a third of training."""
        config = finetune_config(downstream, row, task_name, method)
        runs_ = len(learning_rates(downstream, method)) + len(seeds) - 1
        weight = (1 / 3 if freezes(method) else 1.0) * max(1, len([r for r in row.init.split(",") if r.strip()]))
        return training_steps(config, data[(task_name, fraction)]) * runs_ * weight

    plan = [(row, task, method, fraction) for row in table_rows for task, method in groups for fraction in fraction_list]
    costs = [cost(*cell) for cell in plan]
    started, trained, trained_cost, trained_seconds = time.perf_counter(), 0, 0.0, 0.0
    for number, (row, task_name, method, fraction) in enumerate(plan, start=1):
        config = finetune_config(downstream, row, task_name, method)
        rates = learning_rates(downstream, method)
        of = bodies.bodies_of(config)
        task_data = data[(task_name, fraction)]
        steps = training_steps(config, task_data)
        eval_every = sweep.evaluation_interval(steps, config.evaluations) if config.evaluations else config.eval_every
        compress = settings if row.name != CONTROL else None
        fingerprint = _fingerprint(config, row, task_data.task, fraction, downstream, steps, eval_every)
        if compress:
            fingerprint["compression"] = compress
        directory = os.path.join(workdir, "downstream", row.name, task_name, method, f"fraction_{fraction:g}")
        path = os.path.join(directory, CELL_FILENAME)
        cell = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
            cell = saved if saved.get("fingerprint") == fingerprint else None
        elapsed = time.perf_counter() - started
        rate = trained_seconds / trained_cost if trained_cost else 0.0
        left = "" if not rate else f", about {rate * sum(costs[number - 1:]) / 60:.1f} min left"
        print(f"== cell {number}/{len(plan)}: {row.name} on {column(task_name, method, fraction)} "
              f"({len(task_data.task.splits['train']):,} training examples, {steps} steps, rates "
              f"{', '.join(map(rate_key, rates))}, seeds {seeds}){' (saved)' if cell else ''}; "
              f"{elapsed / 60:.1f} min elapsed{left}", flush=True)
        if cell is None:
            compiled_before, cell_started = cache.compile_seconds, time.perf_counter()

            def train(members, total_steps, every):
                return sweep.train_members(config, task_data, of, members, total_steps=total_steps,
                                           eval_every=every, cache=cache, compression=compress)

            cell = tune_cell(train, seeds=seeds, learning_rates=rates, total_steps=steps, eval_every=eval_every)
            cell.update(fingerprint=fingerprint, train_seconds=time.perf_counter() - cell_started,
                        compile_seconds=cache.compile_seconds - compiled_before)
            os.makedirs(directory, exist_ok=True)
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                json.dump(cell, handle)
            os.replace(path + ".tmp", path)
            trained, trained_cost = trained + 1, trained_cost + costs[number - 1]
            trained_seconds += cell["train_seconds"]
        results[row.name][column(task_name, method, fraction)] = _summary(cell, task_data.task, method, fraction)
    add_significance(results, {column(t, m, f): data[(t, f)].task
                               for t, m in groups for f in fraction_list})
    print(f"== downstream: {len(plan)} cells ({trained} trained now) in {(time.perf_counter() - started) / 60:.1f} "
          f"min, {cache.compilations} compilations ({cache.compile_seconds:.0f} s)", flush=True)
    return results


def learning_rates(downstream: Any, method: str) -> tuple[float, ...]:
    """The grid of a method: `frozen_learning_rates` for a probe of frozen bodies, else
    `learning_rates`; an empty grid is the fine-tuning config's one rate."""
    grid = downstream.frozen_learning_rates if freezes(method) else downstream.learning_rates
    return tuple(float(r) for r in grid) or (float(downstream.finetune.optimizer.learning_rate),)


def training_steps(config: Any, task_data: sweep.TaskData) -> int:
    """A cell's optimizer steps: `epochs` passes over its training split, at least
    `min_steps` (few labels still get a run that converges), or `total_steps` when
    epochs is 0."""
    if config.epochs > 0:
        return max(int(config.min_steps), sweep.epoch_steps(task_data, config.epochs))
    return int(config.total_steps)


def add_significance(results: dict[str, dict[str, Any]], tasks_by_column: Mapping[str, tasks.Task]) -> None:
    """Adds to each summary its tests against the control (`vs_control`) and against the
    column's best row (`vs_best`): Welch's p over seeds, the paired bootstrap over test
    examples, and the seeds a difference of that size would need."""
    for column_name, task in tasks_by_column.items():
        present = {name: row[column_name] for name, row in results.items() if column_name in row}
        if not present:
            continue
        metric = task.metric
        gold = task.gold("test")
        best = max(present, key=lambda name: present[name]["test"][metric]["mean"])
        for name, summary in present.items():
            for key, other in (("vs_control", CONTROL), ("vs_best", best)):
                if other == name or other not in present:
                    continue
                mine, theirs = summary["test"][metric]["per_seed"], present[other]["test"][metric]["per_seed"]
                summary[key] = {
                    "row": other, "difference": float(np.mean(mine) - np.mean(theirs)),
                    "welch_p": significance.welch(mine, theirs),
                    "bootstrap": significance.paired_bootstrap(metric, task.labels, gold,
                                                               summary["test_predictions"],
                                                               present[other]["test_predictions"]),
                    "seeds_needed": significance.seeds_needed(mine, theirs)}
