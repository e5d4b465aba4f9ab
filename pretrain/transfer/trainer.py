"""Fine-tuning: a program of the training loop (`pretrain.loop`) that trains a task.

Everything about the run is the loop's, as for pretraining: the workdir lock and checks,
checkpoints and exact resume, SIGTERM and Ctrl-C, metrics.jsonl and TensorBoard, the
NaN guard. What differs is built here: the bodies restored from pretraining runs
(parameters only, bit for bit; the head is new), the task's batches, the task loss
(with an auxiliary LM loss for `aux_lm`), the method's optimizer, and an evaluation
that scores the dev split and every test set (`test`, and any further one such as
MNLI's `test_mismatched`) with the task's metrics. At the end the dev metric picks
the step and `result.json` records that step's dev and test scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import objectives
from pretrain.config_checks import parallel_problems, schema_problems
from pretrain.hf.imported_tokenizer import FILENAME as IMPORTED_TOKENIZER, ImportedTokenizer
from pretrain.hf.models import (adopt_shape, hf_directory_problems, hf_params, is_hf_directory, set_flat_params,
                                transformer_config)
from pretrain.inference import (CONFIG_FILENAME, checkpoint_steps, model_config, read_run_config, restore_into,
                                restore_params, run_tokenizer)
from pretrain.loss import weighted_token_statistics
from pretrain.metrics import flops_per_token
from pretrain.model import EMBEDDING_PARAMETERS, Transformer, attention_kernel, create_model
from pretrain.optimizer import settings_problems
from pretrain.quantization import QUANTIZATIONS, fake_quantized
from pretrain.tokenizer import Tokenizer
from pretrain.loop import Loop, loop_problems
from pretrain.train_step import initial_state, make_step
from pretrain.transfer import encoding, heads, kinds, methods, tasks
from pretrain.workdir import check_free_space, checkpoint_bytes

log = logging.getLogger("pretrain.train")
RESULT_FILENAME = "result.json"
# pooling='auto': the mean of the example's tokens for every layout. An MLM body without
# a sentence-pair term never trains its [CLS] and a causal body never reads its [EOS] as input, so
# 'first' and 'last' read a position the body never trained (README, Fine-tune).
AUTO_POOLING = "mean"
EVAL_SPLITS = ("dev", "test")  # what a sweep scores; a fine-tuning run scores `Task.evaluation_splits`


def finetune_problems(config: Any, device_count: int) -> list[str]:
    """Every problem of a fine-tuning config, naming field and fix."""
    from configs.finetune import get_config  # the schema; imported late, as configs import pretrain

    problems = schema_problems(config, get_config().to_dict(), free_form=("methods",))
    if problems:
        return problems
    problems = [*loop_problems(config), *parallel_problems(config, device_count)]
    problems += settings_problems({k: v for k, v in config.optimizer.items() if k != "warmup_fraction"},
                                  config.total_steps)
    if not 0 <= config.optimizer.warmup_fraction <= 1:
        problems.append(f"config.optimizer.warmup_fraction={config.optimizer.warmup_fraction!r} must lie in [0, 1]")
    if config.task not in tasks.SOURCES:
        problems.append(f"config.task={config.task!r} is not a task; choose one of {', '.join(tasks.SOURCES)}")
    elif config.task == "files" and not config.task_path:
        problems.append("config.task_path is empty but config.task='files'; set it to a directory with train, dev "
                        "and test .jsonl or .tsv files")
    elif config.task == "files":  # a look at the directory: before any body is restored, or the workdir made
        problems += tasks.files_problems(config.task_path)
    elif config.task == "tfds" and not config.task_tfds_name:
        problems.append("config.task_tfds_name is empty but config.task='tfds'; set it, e.g. 'glue/sst2'")
    if config.task_kind != "auto":
        try:
            kinds.lookup(config.task_kind, "config.task_kind", choices=("auto",))
        except ValueError as error:
            problems.append(str(error))
    for field in ("dev_fraction", "test_fraction"):
        if not 0 < config[field] < 1:
            problems.append(f"config.{field}={config[field]!r} must lie in (0, 1) (e.g. 0.1)")
    for field, choices in (("layout", ("auto", *encoding.LAYOUTS)), ("pooling", ("auto", *heads.POOLINGS)),
                           ("fusion", heads.FUSIONS)):
        if config[field] not in choices:
            problems.append(f"config.{field}={config[field]!r} must be one of {choices}")
    try:
        chosen = methods.parse_methods(config.method)
        unknown = sorted(set(config.methods) - set(methods.METHODS) - {"full"})
        if unknown:
            problems.append(f"config.methods.{unknown[0]} is not a method; methods with settings: "
                            f"{', '.join(sorted(config.methods))}")
        bodies = [r for r in config.init.split(",") if r.strip()]
        if "aux_lm" in chosen and ("probe" in chosen or len(bodies) > 1):
            problems.append(f"config.method={config.method!r}: aux_lm trains one body with its language-model "
                            "loss, so it cannot be combined with probe (a frozen body) or with fusion (several bodies)")
    except ValueError as error:
        problems.append(str(error))
    if not config.init.strip() and not config.shape_from:
        problems.append("config.init is empty (random initialisation) and config.shape_from is empty: a random "
                        "body takes its shape and tokenizer from a pretraining run; set --config.shape_from=<run dir>, "
                        "or --config.init=<run dir> to start from its weights")
    if config.quantize not in ("none", *QUANTIZATIONS):
        problems.append(f"config.quantize={config.quantize!r} must be 'none' or one of {QUANTIZATIONS} "
                        "(quantization-aware fine-tuning)")
    if config.distill_from:
        try:
            teacher_directory(config.distill_from)
        except ValueError as error:
            problems.append(str(error))
        for field in ("temperature", "soft_weight", "hard_weight"):
            value = config.distill[field]
            if not isinstance(value, (int, float)) or value < 0 or (field == "temperature" and value <= 0):
                bound = "> 0" if field == "temperature" else ">= 0"
                problems.append(f"config.distill.{field}={value!r} must be a number {bound}")
    seeds = config.seeds
    if not isinstance(seeds, (tuple, list)) or not seeds or not all(isinstance(s, int) for s in seeds):
        problems.append(f"config.seeds={seeds!r} must be a non-empty tuple of integers, e.g. '(0,1,2)'")
    return problems


def teacher_directory(path: str) -> str:
    """The fine-tuning run directory `config.distill_from` names: the directory itself when
    it holds a run (config.json and checkpoints), else its `seed_0` (a `pretrain.finetune`
    workdir of several seeds); anything else is one message."""
    for candidate in (path, os.path.join(path, "seed_0")):
        if os.path.isfile(os.path.join(candidate, CONFIG_FILENAME)) and \
                os.path.isdir(os.path.join(candidate, "checkpoints")):
            return candidate
    raise ValueError(f"config.distill_from={path!r} is not a fine-tuning run: it needs config.json and checkpoints/ "
                     "(a pretrain.finetune workdir, or one of its seed_<s> directories); fine-tune the teacher first")


@dataclasses.dataclass
class FinetunedRun:
    """A fine-tuning run read back: its config, task, tokenizer and task model with the
    parameters of its newest checkpoint (its final step)."""

    directory: str
    config: Any
    task: tasks.Task
    tokenizer: Tokenizer
    bodies: list[Body]
    model: heads.TaskModel
    step: int


def load_finetuned(directory: str) -> FinetunedRun:
    """The fine-tuning run in `directory` (config.json, checkpoints): its bodies' shapes from
    their runs, its task, and its task model restored from its newest checkpoint."""
    with open(os.path.join(directory, CONFIG_FILENAME), encoding="utf-8") as handle:
        config = ml_collections.ConfigDict(json.load(handle))
    bodies, tokenizer = load_bodies(config)
    task = tasks.load_task(config, bodies[0].run_config.data)
    model = task_model(config, bodies, task, config.seed)
    step, _ = restore_into(directory, model)
    return FinetunedRun(directory, config, task, tokenizer, bodies, model, step)


@dataclasses.dataclass
class Body:
    """A pretrained (or randomly initialised) body and where it came from."""

    run: str  # its pretraining run directory
    model: Transformer
    run_config: Any  # that run's config.json
    layout: str
    pooling: str
    pretrained: bool
    step: int  # its checkpoint's step (0: random)


def hf_run_config(directory: str) -> Any:
    """What a Hugging Face model directory stands in for: a pretraining config with its
    shape, on the built-in corpus, trained with the objective its class implies
    (`objectives.ARCHITECTURE_OBJECTIVES`), which sets the layout its task rows take."""
    from configs.pretrain import get_config

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
        architecture, _ = transformer_config(json.load(handle), directory)
    run_config = get_config(f"objective={objectives.ARCHITECTURE_OBJECTIVES[architecture]}")
    adopt_shape(run_config.model, directory)
    return run_config


def body_runs(config: Any) -> tuple[list[str], str]:
    """(the bodies' directories, the flag that named them): the runs of `config.init`, or
    (init='', the random-init control) the run of `config.shape_from`."""
    runs = [r.strip() for r in config.init.split(",") if r.strip()]
    return (runs, "--config.init") if runs else ([config.shape_from], "--config.shape_from")


def body_source(run: str, flag: str = "--config.init") -> tuple[Any, Tokenizer]:
    """(the pretraining config, the tokenizer) of a body's run directory or Hugging Face
    directory, without building its model; `flag` is the option that named it, for the
    messages about a directory that is not a run."""
    if is_hf_directory(run):  # a Hugging Face model: its own shape, weights and tokenizer
        problems = hf_directory_problems(run)
        if problems:
            raise ValueError(problems[0].replace("config.init.hf", flag.removeprefix("--")))
        return hf_run_config(run), ImportedTokenizer(os.path.join(run, IMPORTED_TOKENIZER))
    return read_run_config(run, flag), run_tokenizer(run)  # no tokenizer is one message; an import has tokenizer.json


def resolved_config(config: Any) -> Any:
    """The config with its steps set: `epochs` passes over the task's training split (at
    least `min_steps`) when epochs > 0, and `evaluations` evenly spaced evaluations when
    evaluations > 0 (else `eval_every`). A new config; the one given is not edited."""
    if config.epochs <= 0 and config.evaluations <= 0:
        return config
    resolved = config.copy_and_resolve_references()
    if config.epochs > 0:
        runs, flag = body_runs(config)
        run_config, tokenizer = body_source(runs[0], flag)
        task = tasks.load_task(config, run_config.data)
        per_epoch = encoding.batches_per_epoch(task, tokenizer, seq_len=config.seq_len,
                                               batch_size=config.batch_size, packed=config.packed)
        resolved.total_steps = max(int(config.min_steps), math.ceil(config.epochs * per_epoch))
    if config.evaluations > 0:
        resolved.eval_every = max(1, math.ceil(resolved.total_steps / config.evaluations))
        resolved.checkpoint_every = resolved.eval_every
    return resolved


def load_bodies(config: Any) -> tuple[list[Body], Tokenizer]:
    """The bodies of `config.init` (restored from each run's newest good checkpoint) or,
    with init='', one body shaped like `config.shape_from`, randomly initialised with
    the run's seed; and their tokenizer (one for all)."""
    runs, flag = body_runs(config)
    pretrained = flag == "--config.init"
    bodies, tokenizer, digest = [], None, None
    for run in runs:
        run_config, found = body_source(run, flag)
        with open(found.path, "rb") as handle:
            this = hashlib.sha256(handle.read()).hexdigest()
        if digest is not None and this != digest:
            raise ValueError(f"the bodies of config.init={config.init!r} have different tokenizers ({run} differs "
                             f"from {runs[0]}); fusion reads one batch, so fuse runs that share a tokenizer (the "
                             "runs of one pretrain.compare do)")
        tokenizer, digest = tokenizer or found, digest or this
        shape = model_config(run_config, tokenizer.vocab_size)
        if config.get("quantize") == "int8":  # quantization-aware: the matmuls' inputs as int8 inference has them
            shape = dataclasses.replace(shape, activation_quantization="int8")
        model = create_model(shape, seed=config.seed)
        if pretrained and is_hf_directory(run):
            set_flat_params(model, hf_params(run, model.config.num_heads)[1])
            step = 0
        elif pretrained:
            log.info("restoring the pretrained body from %s", run)
            step = restore_params(run, model)[0]
        else:
            step = 0
        layout = config.layout if config.layout != "auto" else encoding.layout_of(run_config.objective,
                                                                                   run_config.objectives)
        pooling = config.pooling if config.pooling != "auto" else AUTO_POOLING
        bodies.append(Body(os.path.abspath(run), model, run_config, layout, pooling, pretrained, step))
    return bodies, tokenizer


@dataclasses.dataclass(frozen=True)
class Teacher:
    """Task-time distillation: a fine-tuned teacher's task model (its parameters come to the
    step as frozen parameters) and the weights of its soft targets (`config.distill`)."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    temperature: float
    soft_weight: float
    hard_weight: float


def task_model(config: Any, bodies: Sequence[Body], task: tasks.Task, seed: int) -> heads.TaskModel:
    """The task model a fine-tuning config builds over its bodies: the task's head (its
    outputs, per example or per token) over the bodies' pooled or per-token states."""
    return heads.TaskModel([b.model for b in bodies], [b.layout for b in bodies], [b.pooling for b in bodies],
                           task.num_outputs, per_token=task.kind_spec.per_token,
                           scalar_mix=config.methods.probe.scalar_mix and "probe" in config.method.split("+"),
                           fusion=config.fusion, seed=seed)


def task_functions(graphdef: nnx.GraphDef, rest: nnx.State, kind: str, num_objectives: int, plan: methods.Plan,
                   total_steps: int, *, quantize: str = "none", teacher: Teacher | None = None,
                   teacher_params: Any = None) -> tuple[Callable, Callable, Callable]:
    """(loss_fn, totals_fn, eval_fn) of a task model of task kind `kind`: the kind's loss
    (plus the auxiliary LM loss of `aux_lm`, with its decaying weight), the global
    denominators (the kind's loss terms, LM token weight), and the forward pass that
    gives the loss sum, term count and predictions. The fine-tuning trainer and the
    comparison's vmapped sweeps (`pretrain.transfer.sweep`) train with these.

    `quantize` ('int8_weights', 'int8'): the weights are int8-quantized in the forward pass
    with a straight-through gradient (`pretrain.quantization.fake_quantized`), so training
    is quantization-aware and evaluation scores the quantized model. `teacher` (with its
    `teacher_params`): hard_weight x the task loss + soft_weight x the kind's soft-target
    loss against the teacher's outputs (`Kind.soft_target_sum`), over the same count."""
    aux, spec = plan.aux, kinds.lookup(kind)

    def as_run(params):
        return params if quantize == "none" else fake_quantized(params)

    def loss_fn(params, batch, totals, step):
        if plan.frozen_bodies:  # no gradient flows into a frozen body: its backward pass is never computed
            params = jax.tree_util.tree_map_with_path(
                lambda keys, x: jax.lax.stop_gradient(x) if heads.path_of(keys)[:1] == ("bodies",) else x, params)
        model = nnx.merge(graphdef, as_run(params), rest)
        outputs, hidden = model(batch)
        loss_sum, correct, count, _ = spec.loss(outputs, batch)
        loss = loss_sum / totals[0]
        if teacher is not None:
            taught, _ = nnx.merge(teacher.graphdef, teacher_params, teacher.rest)(batch)
            soft = spec.soft_target_sum(outputs, jax.lax.stop_gradient(taught), batch, teacher.temperature)
            loss = teacher.hard_weight * loss + teacher.soft_weight * soft / totals[0]
        zeros = jnp.zeros((num_objectives,), jnp.float32)
        stats = {"loss_sum": zeros.at[0].set(loss_sum), "correct_sum": zeros.at[0].set(correct),
                 "weight_sum": zeros.at[0].set(count)}
        if aux is not None:
            body = model.bodies[0]
            aux_sum, aux_stats = weighted_token_statistics(body, hidden[0], batch["targets"], batch["weights"],
                                                           batch["objective_id"], num_objectives)
            loss = loss + methods.aux_coefficient(aux, step, total_steps) * aux_sum / totals[1]
            stats = {name: value.at[0].set(stats[name][0]) for name, value in aux_stats.items()}
        return loss, stats

    def totals_fn(batch):
        return spec.count(batch), batch["weights"].sum()

    def eval_fn(params, batch):
        outputs, _ = nnx.merge(graphdef, as_run(params), rest)(batch)
        loss_sum, _, count, predictions = spec.loss(outputs, batch)
        return {"loss_sum": loss_sum, "count": count, "predictions": predictions}

    return loss_fn, totals_fn, eval_fn


def collect_predictions(task: tasks.Task, split: str, batches: Sequence[Mapping[str, np.ndarray]],
                        results: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> tuple[list, list, float, float]:
    """(gold, predicted, loss sum, loss terms) of a split in example order, from its
    evaluation batches and `eval_fn`'s result for each: what a batch predicts where its
    `task_example` names an example is decoded by the task's kind (a word cut from its
    row keeps the kind's default, O for tags)."""
    found: list[kinds.Found] = []
    loss = count = 0.0
    for batch, result in zip(batches, results, strict=True):
        loss, count = loss + float(result["loss_sum"]), count + float(result["count"])
        where = batch["task_example"] >= 0
        found.extend(zip(batch["task_example"][where], batch["task_word"][where],
                         np.asarray(result["predictions"])[where]))
    predicted = task.kind_spec.decode(task.splits[split], task.labels, found, tokenizer)
    return task.gold(split), predicted, loss, count


# A test split is small below SMALL_TEST_EXAMPLES examples or, with classes, below
# SMALL_TEST_PER_CLASS examples per class on average: its scores then swing with the
# few examples a class has (one example of 129 moves accuracy by 0.8 points).
SMALL_TEST_EXAMPLES = 100
SMALL_TEST_PER_CLASS = 5


def small_test_warning(task: tasks.Task, config: Any, pretraining_data: Any) -> str | None:
    """The one warning a fine-tuning run logs when `task`'s test split is small (see
    SMALL_TEST_EXAMPLES), naming its size, its classes and what makes it larger; None
    when it is not. `config` is the fine-tuning config, `pretraining_data` the `data`
    section of the body's pretraining, whose held-out split a built-in task tests on."""
    size = len(task.splits["test"])
    classes = task.kind_spec.classes(task.labels)
    needed = max(SMALL_TEST_EXAMPLES, SMALL_TEST_PER_CLASS * classes)
    if size >= needed:
        return None
    counted = f"{size} examples for {classes} classes ({size / classes:.1f} per class)" if classes else f"{size} examples"
    if 0 < config.task_max_examples <= size:
        fix = f"--config.task_max_examples={config.task_max_examples} keeps it this small; raise it, or 0 keeps all"
    elif task.name in tasks.BUILTIN and pretraining_data.kind == "pydocs":
        fix = (f"it is the pydocs held-out split of the body's pretraining (data.heldout_fraction="
               f"{pretraining_data.heldout_fraction:g}), so pretrain with --config.data.heldout_fraction=0.1 for a "
               "test set worth its mean")
    elif task.name in tasks.BUILTIN:
        fix = f"raise --config.test_fraction (now {config.test_fraction:g})"
    else:
        fix = "a larger test set gives scores worth their mean"
    return (f"the test split of {task.name} is small: {counted}, fewer than {needed} (the rule: at least "
            f"{SMALL_TEST_EXAMPLES} examples and {SMALL_TEST_PER_CLASS} per class on average), so its scores swing "
            f"with a few examples; {fix}")


class FinetuningProgram:
    """Fine-tuning as a program of the training loop (`pretrain.loop.Program`; see
    module docstring)."""

    frozen = None  # set by `build` to a teacher's parameters when distilling (`config.distill_from`)

    def resolve(self, config: Any) -> Any:
        """A fine-tuning config is used as given: what it derives (each body's shape) comes
        from the bodies' own runs."""
        return config

    def validate(self, config: Any) -> None:
        """Checks the config, then reads what is cheap to read: each body's config.json and
        tokenizer, and the task (`self.task`). A misspelt run directory, a missing task
        file or a bad row is so reported before the workdir is made or any body restored
        (a restore can take a minute)."""
        problems = finetune_problems(config, jax.device_count())
        if problems:
            raise ValueError("invalid fine-tuning config:\n  " + "\n  ".join(problems))
        runs, flag = body_runs(config)
        sources = [body_source(run, flag) for run in runs]
        self.task = tasks.load_task(config, sources[0][0].data)

    def build(self, config: Any, workdir: str, primary: bool, strategy: Any) -> nnx.State:
        """The bodies (restored), the task model, the method's optimizer and the task's
        batches; returns the task model's parameters."""
        self.config = config
        self.bodies, self.tokenizer = load_bodies(config)  # the task was read by _validate
        warning = small_test_warning(self.task, config, self.bodies[0].run_config.data)
        if warning and primary:
            log.warning(warning)
        model = task_model(config, self.bodies, self.task, config.seed)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.teacher = None
        if config.distill_from:
            self.teacher, self.frozen = self._teacher(config)
        params = jax.device_get(params)  # restored bodies sit on one device; the state is placed by the mesh
        depths = heads.parameter_depths(params, [b.model.config.num_layers for b in self.bodies])
        self.plan = methods.plan(config.method, config.methods, depths, config.total_steps)
        self.aux = None
        if self.plan.aux is not None:
            body = self.bodies[0].run_config
            self.aux = objectives.build_mixture(self.plan.aux["objective"] or body.objective,
                                                self.tokenizer.vocabulary(), body.objectives)
        self.names = ("task", *(self.aux.names if self.aux is not None else ()))
        self.optimizer = methods.make_optimizer(self.plan, params, config.optimizer, config.methods, config.total_steps)
        self.parameters = sum(x.size for x in jax.tree.leaves(params))
        self.flops_per_token = sum(self._body_flops(b) for b in self.bodies)
        common = dict(seq_len=config.seq_len, process_index=jax.process_index(), process_count=jax.process_count())
        self.train_data = encoding.training_stream(self.task, self.tokenizer, batch_size=config.batch_size,
                                                   seed=config.seed, packed=config.packed, aux=self.aux, **common)
        self.eval_data = {split: encoding.evaluation_batches(self.task, split, self.tokenizer, batch_size=config.batch_size,
                                                             packed=config.packed, **common)
                          for split in self.task.evaluation_splits}
        if primary:
            state = jax.eval_shape(lambda p: initial_state(self.optimizer, p), params)
            check_free_space(workdir, strategy.state_copies * checkpoint_bytes(state))
        return params

    def _teacher(self, config: Any) -> tuple[Teacher, nnx.State]:
        """The fine-tuned teacher of `config.distill_from` (its final parameters, as its run
        scored them) and its parameters; it must be of this task and read this tokenizer."""
        teacher = load_finetuned(teacher_directory(config.distill_from))
        with open(teacher.tokenizer.path, "rb") as a, open(self.tokenizer.path, "rb") as b:
            same_tokenizer = a.read() == b.read()
        if teacher.config.task != config.task or teacher.config.task_path != config.task_path or \
                teacher.task.num_outputs != self.task.num_outputs or not same_tokenizer:
            raise ValueError(f"config.distill_from={config.distill_from!r} was fine-tuned on task "
                             f"{teacher.config.task!r} ({teacher.config.task_path or 'built in'})"
                             + ("" if same_tokenizer else " with another tokenizer")
                             + f"; a teacher's soft targets need this run's task ({config.task!r}) and tokenizer")
        graphdef, params, rest = nnx.split(teacher.model, nnx.Param, ...)
        if teacher.config.get("quantize", "none") != "none":  # the teacher as its own run scored it
            params = jax.jit(fake_quantized)(params)
        weights = {name: float(config.distill[name]) for name in ("temperature", "soft_weight", "hard_weight")}
        return Teacher(graphdef, rest, **weights), jax.device_get(params)

    def _body_flops(self, body: Body) -> float:
        """Training FLOPs per token of a body: 6N + 12 L d T when it trains, a third of
        that (the forward pass) when it is frozen."""
        c = body.model.config
        embedding = sum(getattr(body.model, name).size for name in EMBEDDING_PARAMETERS)
        non_embedding = sum(x.size for x in jax.tree.leaves(nnx.state(body.model, nnx.Param))) - embedding
        full = flops_per_token(non_embedding, c.num_layers, c.model_dim, self.config.seq_len)
        return full / 3 if self.plan.frozen_bodies else full

    def run_info(self) -> dict[str, Any]:
        with open(self.tokenizer.path, "rb") as handle:
            tokenizer_sha256 = hashlib.sha256(handle.read()).hexdigest()
        config = self.config
        return {"task": self.task.name, "task_fingerprint": self.task.fingerprint, "method": config.method,
                "init": config.init, "bodies": [dataclasses.asdict(b.model.config) for b in self.bodies],
                "layouts": [b.layout for b in self.bodies], "poolings": [b.pooling for b in self.bodies],
                "tokenizer_sha256": tokenizer_sha256, "optimizer": config.optimizer.to_dict(),
                **{name: config[name] for name in ("seq_len", "batch_size", "total_steps", "seed", "parallelism")}}

    def learning_rate(self, step: int) -> float:
        schedule = methods.learning_rate(self.plan, self.config.optimizer, self.config.methods,
                                         self.config.total_steps)
        return float(schedule(step))

    # -- the compiled steps ----------------------------------------------------------

    def step_functions(self, axis_name: str | None) -> tuple[Callable, Callable]:
        """(train step, evaluation step); with a teacher, both take its parameters third."""
        def functions(teacher_params: Any = None) -> tuple[Callable, Callable, Callable]:
            return task_functions(self.graphdef, self.rest, self.task.kind, len(self.names), self.plan,
                                  self.config.total_steps, quantize=self.config.quantize, teacher=self.teacher,
                                  teacher_params=teacher_params)

        if self.teacher is None:
            loss_fn, totals_fn, eval_fn = functions()
            return make_step(loss_fn, totals_fn, self.optimizer, self.config.accumulation_steps, axis_name), eval_fn

        def step_fn(state, batch, teacher_params):
            loss_fn, totals_fn, _ = functions(teacher_params)
            return make_step(loss_fn, totals_fn, self.optimizer, self.config.accumulation_steps, axis_name)(state,
                                                                                                            batch)

        def eval_fn(params, batch, teacher_params):
            return functions(teacher_params)[2](params, batch)

        return step_fn, eval_fn

    # -- evaluation ------------------------------------------------------------------

    def evaluate(self, score: Callable) -> dict[str, float]:
        """The task's metrics on dev and each test set (`eval/dev/<metric>`,
        `eval/test/<metric>`, `eval/test_mismatched/<metric>`, ...) and the task loss on each."""
        out = {}
        for split in self.task.evaluation_splits:
            gold, predicted, loss, count = self.predict(score, split)
            for name, value in self.task.score(gold, predicted).items():
                out[f"eval/{split}/{name}"] = value
            out[f"eval/{split}/loss"] = loss / max(count, 1.0)
        return out

    def predict(self, score: Callable, split: str) -> tuple[list, list, float, float]:
        """(gold, predicted, loss sum, labelled count) over a split, in example order."""
        results = [score(batch) for batch in self.eval_data[split]]
        return collect_predictions(self.task, split, self.eval_data[split], results, self.tokenizer)

    def print_evaluation(self, step: int, values: dict[str, float]) -> None:
        def split_line(split: str) -> str:
            metrics = self.task.metrics
            main = f"{split} {self.task.metric} {values[f'eval/{split}/{self.task.metric}']:.4f}"
            rest = ", ".join(f"{m} {values[f'eval/{split}/{m}']:.4f}" for m in metrics if m != self.task.metric)
            return f"{main} ({rest}; loss {values[f'eval/{split}/loss']:.4f})"

        print(f"eval at step {step}: {'; '.join(split_line(s) for s in self.task.evaluation_splits)}", flush=True)

    def traced_attention_kernel(self) -> str:
        """The bodies' kernel(s): they run the dense path (`pretrain.inference.model_config`)."""
        return "+".join(dict.fromkeys(attention_kernel(body.model.config) for body in self.bodies))

    def describe(self, start: int, workdir: str) -> list[tuple[str, str]]:
        """The run's effective settings, printed once at start."""
        config = self.config
        bodies = "; ".join(f"{b.run} ({'step ' + str(b.step) if b.pretrained else 'random initialisation'}, "
                           f"{b.run_config.objective}, {b.layout} layout, {b.pooling} pooling)" for b in self.bodies)
        lines = [
            ("run", f"{workdir} ({f'resuming from step {start}' if start else 'new run'}), seed {config.seed}"),
            ("task", self.task.describe()),
            ("bodies", bodies + (f"; fused by {config.fusion}" if len(self.bodies) > 1 else "")),
            ("method", f"{config.method}" + (" (bodies frozen)" if self.plan.frozen_bodies else "")
             + f"; {self.parameters:,} parameters; batch {config.batch_size} x seq_len {config.seq_len}"
             + (" packed" if config.packed else " one example per row")),
            ("steps", f"{config.total_steps:,}; peak lr {config.optimizer.learning_rate:g}, {self.plan.schedule} "
                      f"schedule; eval every {config.eval_every or config.total_steps}"),
        ]
        return lines

    def finish(self, step: int, params: Any, workdir: str, primary: bool) -> None:
        """Writes result.json: the dev-selected step and its dev and test scores."""
        if primary:
            write_result(workdir, self.task)


class FinetuneTrainer(Loop):
    """The fine-tuning command's loop: `Loop(config, workdir, FinetuningProgram())`."""

    def __init__(self, config: Any, workdir: str | os.PathLike):
        super().__init__(config, workdir, FinetuningProgram())


def read_records(workdir: str | os.PathLike) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_result(workdir: str | os.PathLike, task: tasks.Task) -> dict[str, Any]:
    """result.json of a finished run: the evaluation with the best dev metric (the
    earliest on a tie), and its dev scores and those of each test set (`test_splits`
    names them: `test`, then any further one such as `test_mismatched`)."""
    records = [r for r in read_records(workdir) if f"eval/dev/{task.metric}" in r]
    if not records:
        raise ValueError(f"{workdir}/metrics.jsonl holds no evaluation; the run must evaluate at least once")
    best = max(records, key=lambda r: (r[f"eval/dev/{task.metric}"], -r["step"]))
    pick = lambda split: {k.split("/")[2]: v for k, v in best.items() if k.startswith(f"eval/{split}/")}  # noqa: E731
    result = {"task": task.name, "task_fingerprint": task.fingerprint, "metric": task.metric,
              "selected_step": best["step"], "last_step": records[-1]["step"], "dev": pick("dev"),
              **{split: pick(split) for split in task.test_splits}, "test_splits": list(task.test_splits),
              "evaluated_steps": [r["step"] for r in records],
              "baselines": tasks.baseline_scores(task)}
    path = os.path.join(workdir, RESULT_FILENAME)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    os.replace(path + ".tmp", path)
    return result


def summarize_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation over seeds of every metric of every test set
    (`test_splits`; results that name none have only `test`), and each seed's."""
    test_splits = list(results[0].get("test_splits", ["test"]))
    summary = {"task": results[0]["task"], "metric": results[0]["metric"], "seeds": len(results),
               "test_splits": test_splits}
    for split in test_splits:
        summary[split] = {}
        for name in sorted(results[0][split]):
            values = np.asarray([r[split][name] for r in results], np.float64)
            summary[split][name] = {"mean": float(values.mean()),
                                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                    "per_seed": [float(v) for v in values]}
    summary["selected_steps"] = [r["selected_step"] for r in results]
    if results[0].get("baselines"):
        summary["baselines"] = results[0]["baselines"]
    return summary


def seed_config(config: Any, seed: int) -> Any:
    """The config of one seed's run."""
    one = config.copy_and_resolve_references()
    with one.unlocked():
        one.seed = int(seed)
    return one


def run_seeds(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Fine-tunes once per seed of `config.seeds` in `workdir/seed_<s>` (a finished
    seed, whose result.json covers its last checkpoint, is not trained again), then
    writes `workdir/summary.json`: test mean ± std over seeds and each seed's scores."""
    config = resolved_config(config)
    results = []
    for seed in config.seeds:
        directory = os.path.join(os.fspath(workdir), f"seed_{seed}")
        result_path = os.path.join(directory, RESULT_FILENAME)
        done = False
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as handle:
                result = json.load(handle)
            try:
                done = checkpoint_steps(directory)[-1] == result["last_step"] == config.total_steps
            except FileNotFoundError:
                done = False
        if not done:
            FinetuneTrainer(seed_config(config, seed), directory).run()
            with open(result_path, encoding="utf-8") as handle:
                result = json.load(handle)
        results.append(result)
    summary = summarize_seeds(results)
    summary["workdir"] = os.path.abspath(workdir)
    path = os.path.join(os.fspath(workdir), "summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    os.replace(path + ".tmp", path)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as lines: each test metric's mean ± std and per-seed values, then
    those of each further test set under its name."""
    lines = [f"{summary['task']}: test scores at the dev-selected step ({summary['metric']}), "
             f"{summary['seeds']} seed(s), steps {summary['selected_steps']}"]
    for split in summary["test_splits"]:
        indent = "  " if split == "test" else "    "
        if split != "test":
            lines.append(f"  {split}:")
        for name, value in summary[split].items():
            seeds = ", ".join(f"{v:.4f}" for v in value["per_seed"])
            std = f"{value['std']:.4f}" if summary["seeds"] > 1 else "n/a"
            lines.append(f"{indent}{name:<15} {value['mean']:.4f} ± {std}   ({seeds})")
    if summary.get("baselines"):
        lines.append(f"  beside: {', '.join(f'{k} {v:.4f}' for k, v in summary['baselines'].items())} "
                     f"({summary['metric']} of always predicting the training majority, and of uniform guessing)")
    return "\n".join(lines)
