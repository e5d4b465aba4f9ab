"""Objectives side by side under one budget: train each run, score all, write a report.

    python -m pretrain.compare --config=configs/compare.py --workdir=runs/compare

The config (`configs/compare.py`) lists runs (an objective or mixture each, and
optionally a sweep of one budget field) and one budget: model, data, tokenizer,
optimizer, steps, batch and sequence length. The workdir then holds

    tokenizer.model            trained once; every run uses it, so all share one held-out set
    runs/<name>/               a `pretrain.train` run directory, plus compare_run.json
                               (the run's config and its accumulated training wall time)
    report.md                  the matrix, tokens seen, parameters, wall time, command, config
    loss_curves.png            training loss of every run, one figure
    matrix.png                 the held-out matrix as a heatmap
    comparison.json            everything in report.md, machine-readable

Rerunning the command trains nothing that is finished, resumes what is not (the
trainer restores its newest checkpoint), reuses each run's `evaluation.json` when
it matches the checkpoint and held-out settings, and rewrites the report. A run
directory trained with another config than the one the command now asks for is
an error naming the run, never silently mixed into the table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

import objectives
from absl import flags

from pretrain import cli, compare_report
from pretrain.config_checks import validate_config
from pretrain.resolve import resolve_config
from pretrain.evaluate import RESULT_FILENAME, evaluate_run, write_json
from pretrain.host_memory import keep_freed_memory
from pretrain.inference import checkpoint_steps
from pretrain.input_pipeline import build_input_pipeline
from pretrain.tokenizer import MODEL_FILENAME
from pretrain.distill import DistillationTrainer
from pretrain.train import Trainer
from pretrain.transfer import comparison, compression, downstream_report, tasks
from pretrain.transfer.trainer import finetune_problems

RUN_RECORD = "compare_run.json"


@dataclasses.dataclass
class Run:
    """One row of the comparison."""

    name: str
    config: ml_collections.ConfigDict  # its full training config
    directory: str
    group: str = ""  # the run it is a pretraining seed of (its own name when there is one seed)
    trained_now: bool = False  # this invocation trained (or resumed) it
    wall_time_s: float = 0.0  # training wall time, summed over invocations
    evaluation: dict | None = None  # pretrain.evaluate's result for its final checkpoint
    teacher: Run | None = None  # a distilled row's teacher (its config is then a configs/distill.py config)

    def __post_init__(self) -> None:
        self.group = self.group or self.name

    @property
    def objective(self) -> str:
        """The run's objective spec (a name or a mixture; a distilled row's, its teacher's)."""
        return self.teacher.objective if self.teacher is not None else self.config.objective


def _set_field(config: ml_collections.ConfigDict, dotted: str, value: Any, where: str) -> None:
    """config.<dotted> = value; a field the budget does not have is an error naming `where`."""
    *parents, leaf = dotted.split(".")
    node = config
    for index, key in enumerate(parents + [leaf]):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            path = ".".join((parents + [leaf])[: index + 1])
            raise ValueError(f"{where}: the budget has no field {path!r}; name a field of configs/pretrain.py "
                             "(e.g. 'objectives.mass.span_fraction', 'objectives.mlm.mask_rate', 'seq_len')")
        if key != leaf:
            node = node[key]
    with node.ignore_type():
        node[leaf] = value


def _apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str,
                     prefix: str = "") -> None:
    """Sets every leaf of the nested `overrides` on `config` (see `_set_field`)."""
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            _apply_overrides(config, value, where, f"{prefix}{key}.")
        else:
            _set_field(config, f"{prefix}{key}", value, where)


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two nested configs."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def budget_parameters(budget: ml_collections.ConfigDict) -> int:
    """Parameters of the budget's model with its tokenizer's vocabulary (shapes only)."""
    from flax import nnx

    from pretrain.inference import model_config
    from pretrain.model import create_model, parameter_count

    shape = model_config(budget, budget.tokenizer.vocab_size)
    return parameter_count(nnx.eval_shape(lambda: create_model(shape)))


def resolved_budget(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The budget with its steps set: `budget.total_steps` when given, else from
    `budget_tokens`, else `budget_tokens_per_parameter` x the model's parameters
    (rounded up to whole batches); warmup (a tenth) and checkpoints (a third) follow
    when left at 0. A new config: the one given is not edited."""
    budget = copy.deepcopy(config.budget)
    tokens_per_step = budget.batch_size * budget.seq_len
    if config.budget_tokens > 0:
        budget.total_steps = math.ceil(config.budget_tokens / tokens_per_step)
    elif budget.total_steps <= 0:
        if config.budget_tokens_per_parameter <= 0:
            raise ValueError("config.budget.total_steps, config.budget_tokens and config.budget_tokens_per_parameter "
                             "are all 0; set one (e.g. --config.budget_tokens_per_parameter=20)")
        budget.total_steps = math.ceil(config.budget_tokens_per_parameter * budget_parameters(budget) / tokens_per_step)
    if budget.optimizer.warmup_steps <= 0:
        budget.optimizer.warmup_steps = max(1, budget.total_steps // 10)
    if budget.checkpoint_every <= 0:
        budget.checkpoint_every = max(1, budget.total_steps // 3)
    return budget


def budget_line(config: ml_collections.ConfigDict, budget: ml_collections.ConfigDict) -> str:
    """How the steps of every run were chosen, in words."""
    tokens = budget.total_steps * budget.batch_size * budget.seq_len
    parameters = budget_parameters(budget)
    how = ("config.budget_tokens" if config.budget_tokens > 0 else "config.budget.total_steps"
           if config.budget.total_steps > 0 else f"{config.budget_tokens_per_parameter:g} tokens per parameter")
    return (f"budget: {budget.total_steps:,} steps x {budget.batch_size} rows x {budget.seq_len} tokens = "
            f"{tokens / 1e6:.2f} M tokens per run, {tokens / parameters:.1f} per parameter of the {parameters:,}-"
            f"parameter model (from {how})")


def run_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Run name -> full training config (budget + objective + overrides, the sweep expanded),
    each validated before anything trains."""
    if not len(config.runs):
        raise ValueError("config.runs is empty; list at least one run (name -> objective), see configs/compare.py")
    budget = resolved_budget(config)
    runs: dict[str, ml_collections.ConfigDict] = {}
    for name, spec in config.runs.items():
        run = copy.deepcopy(budget)
        run.objective = spec.objective
        _apply_overrides(run, spec.overrides.to_dict() if "overrides" in spec else {}, f"config.runs.{name}.overrides")
        runs[name] = run
    sweep = config.sweep
    if sweep.run or sweep.field or len(sweep.grid):
        if sweep.run not in runs:
            raise ValueError(f"config.sweep.run={sweep.run!r} is not a run; choose one of {', '.join(runs)}")
        if not len(sweep.grid):
            raise ValueError("config.sweep.grid is empty; give the values of config.sweep.field, e.g. '(0.3,0.5)'")
        base = runs.pop(sweep.run)
        for value in sweep.grid:
            variant = copy.deepcopy(base)
            _set_field(variant, sweep.field, value, "config.sweep.field")
            runs[f"{sweep.run}-{sweep.field.rsplit('.', 1)[-1]}={value}"] = variant
    seeds = tuple(config.pretrain_seeds)
    if not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise ValueError(f"config.pretrain_seeds={config.pretrain_seeds!r} must be a non-empty tuple of integers")
    seeded = {}
    for name, run in runs.items():  # one run per seed, named <run>-seed<s> when there are several
        for seed in seeds:
            variant = copy.deepcopy(run)
            variant.seed = seed
            seeded[f"{name}-seed{seed}" if len(seeds) > 1 else name] = variant
    runs = seeded
    for name, run in runs.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"run name {name!r} cannot be a directory name; use letters, digits, '-', '_', '+'")
        try:
            validate_config(resolve_config(run), jax.device_count())  # what its trainer will check
        except ValueError as error:
            problems = " ".join(str(error).split())  # one line per run
            raise ValueError(f"config.runs.{name} (objective {run.objective!r}): {problems}") from None
    return runs


def group_of(name: str, seeds: Sequence[int]) -> str:
    """The run a seeded run name belongs to ('mlm-seed1' -> 'mlm' when seeds has several)."""
    if len(seeds) > 1:
        for seed in seeds:
            if name.endswith(f"-seed{seed}"):
                return name[: -len(f"-seed{seed}")]
    return name


def check_downstream(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> None:
    """Refuses a downstream block with unknown tasks, methods or fields before anything trains."""
    if not comparison.cells(config.downstream):
        return
    comparison.rows(runs, config.downstream)  # names the fusion's runs
    fractions = comparison.fractions(config.downstream)  # each in (0, 1]
    layouts = ("auto", "bidirectional", "causal")
    if config.downstream.control_layout not in layouts:
        raise ValueError(f"config.downstream.control_layout={config.downstream.control_layout!r} must be one of "
                         f"{layouts}")
    for task, method in comparison.cells(config.downstream):
        row = comparison.Row("check", runs[0].directory)
        problems = finetune_problems(comparison.finetune_config(config.downstream, row, task, method),
                                     jax.device_count())
        if problems:
            raise ValueError(f"config.downstream ({task}, {method}): {' '.join(' '.join(problems).split())}")
        if "aux_lm" in method.split("+"):
            raise ValueError(f"config.downstream.methods={config.downstream.methods!r}: aux_lm mixes language-model "
                             "rows into the task's batches, which the comparison's vmapped sweeps do not; run it with "
                             "pretrain.finetune, or leave it out")
    for task in dict.fromkeys(task for task, _ in comparison.cells(config.downstream)):
        whole = tasks.load_task(comparison.finetune_config(config.downstream, row, task, "full"), runs[0].config.data)
        for fraction in fractions:  # a fraction that empties a class is named now, not after pretraining
            try:
                tasks.label_subset(whole, fraction, seed=config.downstream.subset_seed)
            except ValueError as error:
                raise ValueError(f"config.downstream.label_fractions: {error}") from None


def _record_path(directory: str) -> str:
    return os.path.join(directory, RUN_RECORD)


def _read_record(directory: str) -> dict:
    path = _record_path(directory)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def finished_step(directory: str) -> int:
    """The newest checkpoint step of a run directory (0: none yet)."""
    try:
        return checkpoint_steps(directory)[-1]
    except FileNotFoundError:
        return 0


def shared_tokenizer(budget: ml_collections.ConfigDict, workdir: str) -> str:
    """`workdir/tokenizer.model`, trained on the budget's data when missing."""
    path = os.path.join(workdir, MODEL_FILENAME)
    if not os.path.exists(path):
        build_input_pipeline(budget, workdir)
    return path


def distilled_runs(config: ml_collections.ConfigDict, runs: Sequence[Run], workdir: str) -> list[Run]:
    """With 'distil' among `config.compression.techniques`, one distilled row per run: a
    student of `compression.distill_layers` layers (0: half) learning the run
    (`pretrain.distill`, DistilBERT's loss) for `compression.distill_steps` steps (0: the
    run's own), with the budget's batch, optimizer and seed."""
    from configs.distill import LOOP_FIELDS, get_config as distill_config

    if "distil" not in compression.techniques(config.compression.techniques):
        return []
    out = []
    for run in runs:
        student = distill_config()
        student.teacher = run.directory
        for field in LOOP_FIELDS:
            student[field] = copy.deepcopy(run.config[field])
        student.total_steps = config.compression.distill_steps or run.config.total_steps
        student.student.num_layers = config.compression.distill_layers
        student.sample_at_end = False
        name = compression.DISTILLED.format(row=run.name)
        out.append(Run(name, student, os.path.join(workdir, "runs", name.replace("/", "-")), teacher=run))
    return out


def train_run(run: Run, tokenizer_path: str) -> None:
    """Trains (or resumes) `run` to its total_steps; a finished run is left alone."""
    os.makedirs(run.directory, exist_ok=True)
    wanted = json.loads(run.config.to_json_best_effort())
    record = _read_record(run.directory)
    if record and record.get("config") != wanted:
        changed = changed_fields(record["config"], wanted)
        raise ValueError(f"run {run.name!r} in {run.directory} was trained with another config (changed: "
                         f"{', '.join(changed[:6])}); delete that directory to retrain it, or pass a new --workdir")
    run.wall_time_s = float(record.get("wall_time_s", 0.0))
    if finished_step(run.directory) >= run.config.total_steps:
        return
    target = os.path.join(run.directory, MODEL_FILENAME)
    if not os.path.exists(target):
        shutil.copy(tokenizer_path, target)
    print(f"== training {run.name} ({run.objective}) in {run.directory}", flush=True)
    started = time.perf_counter()
    try:
        (DistillationTrainer if run.teacher is not None else Trainer)(run.config, run.directory).run()
    finally:
        run.wall_time_s += time.perf_counter() - started
        run.trained_now = True
        write_json({"config": wanted, "wall_time_s": run.wall_time_s}, _record_path(run.directory))


def matrix_objectives(evaluation: ml_collections.ConfigDict, runs: Sequence[Run]) -> list[str] | None:
    """The objectives of the held-out matrix: `config.evaluation.objectives` when it names
    some, every registered one for 'all' (None), else (the default '') the objectives the
    runs trained, in order."""
    spec = evaluation.objectives.strip()
    if spec == "all":
        return None
    if spec:
        return [n.strip() for n in spec.split(",") if n.strip()]
    return list(dict.fromkeys(name for run in runs for name in objectives.parse_mixture_spec(run.objective)))


def score_run(run: Run, budget: ml_collections.ConfigDict, evaluation: ml_collections.ConfigDict,
              names: Sequence[str] | None = None) -> dict:
    """The run's held-out matrix row under `names` (None: every registered objective),
    reused from its evaluation.json when it is for the same checkpoint step and
    held-out settings."""
    names = list(names) if names is not None else None
    settings = dict(seq_len=budget.seq_len, batch_size=evaluation.batch_size, seed=evaluation.seed,
                    max_documents=evaluation.max_documents, objective_names=names)
    path = os.path.join(run.directory, RESULT_FILENAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
        if cached.get("step") == finished_step(run.directory) and cached.get("settings") == settings:
            return cached
    result = evaluate_run(run.directory, data_config=budget.data, **settings)
    result["settings"] = settings
    write_json(result, path)
    return result


def compare(config: ml_collections.ConfigDict, workdir: str, command: str = "") -> list[Run]:
    """Trains, evaluates and reports every run of `config` in `workdir` (see module docstring)."""
    return compare_with_downstream(config, workdir, command)[0]


def compare_with_downstream(config: ml_collections.ConfigDict, workdir: str, command: str = ""
                            ) -> tuple[list[Run], dict[str, Any] | None]:
    """`compare`, also returning the downstream results ({row: {column: summary}}, with
    each seed's test predictions; None without a downstream phase)."""
    started = time.perf_counter()
    configs = run_configs(config)  # every run validated before any trains
    runs = [Run(name, run_config, os.path.join(workdir, "runs", name), group_of(name, config.pretrain_seeds))
            for name, run_config in configs.items()]
    first_seeds = [run for run in runs if run.config.seed == config.pretrain_seeds[0]]  # fine-tuned downstream
    check_downstream(config, first_seeds)
    compression.techniques(config.compression.techniques)  # an unknown technique is named before anything trains
    print(budget_line(config, runs[0].config), flush=True)
    os.makedirs(workdir, exist_ok=True)
    tokenizer_path = shared_tokenizer(config.budget, workdir)
    for run in runs:
        train_run(run, tokenizer_path)
    distilled = distilled_runs(config, first_seeds, workdir)  # rows of their own, after their teachers
    for run in distilled:
        train_run(run, tokenizer_path)
    runs, first_seeds = [*runs, *distilled], [*first_seeds, *distilled]
    for run in runs:
        run.evaluation = score_run(run, config.budget, config.evaluation, matrix_objectives(config.evaluation, runs))
    fingerprints = {run.name: run.evaluation["heldout"]["fingerprint"] for run in runs}
    if len(set(fingerprints.values())) > 1:
        raise ValueError(f"the runs were scored on different held-out sets ({fingerprints}); their tokenizers or "
                         "data differ: give every run the budget's data and the workdir's tokenizer")
    downstream = None
    if comparison.cells(config.downstream):
        named = [dataclasses.replace(run, name=run.group) for run in first_seeds]
        downstream = comparison.run_downstream(named, config.downstream, workdir, config.compression)
        print(f"== verdict: {downstream_report.verdict(downstream)}", flush=True)
    for flag in compare_report.baseline_flags(runs):
        print(f"== warning: {flag}", flush=True)
    compare_report.write(workdir, runs, config, command, time.perf_counter() - started, downstream)
    return runs, downstream


def command_line(argv: Sequence[str]) -> str:
    """The shell command that reproduces this invocation."""
    return " ".join(["python -m pretrain.compare", *(shlex.quote(arg) for arg in argv[1:])])


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.compare`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "the comparison's directory; rerun the command to resume",
                                  flag_values=flag_values)
    config = cli.define_config(flag_values, argv, "configs/compare.py", "comparison config file")
    cli.parse(flag_values, argv, __doc__)

    def command() -> str:
        if not workdir.value:
            raise ValueError("--workdir is required: where the runs and the report go, e.g. --workdir=runs/compare")
        started = time.perf_counter()
        runs = compare(cli.config_value(config, argv), workdir.value, command_line(argv))
        report = os.path.join(os.path.abspath(workdir.value), compare_report.REPORT)
        trained = [run.name for run in runs if run.trained_now]
        return (f"{len(runs)} runs ({', '.join(trained) or 'none'} trained now); wall time "
                f"{time.perf_counter() - started:.0f} s; report: {report}")

    print(cli.run_reporting_bad_input(command), flush=True)


if __name__ == "__main__":
    keep_freed_memory()  # before JAX starts its threads: no page faults on every step (pretrain/host_memory.py)
    main()
