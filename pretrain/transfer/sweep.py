"""Many small fine-tuning runs as one compiled program: seeds and learning rates of one cell.

A comparison fine-tunes every row on every task with every method, at several
learning rates and seeds and label fractions: hundreds of runs of a small model,
each of which would otherwise compile its own step. Here the runs of one cell
(one body, task, method and training split) that differ only in their seed and
peak learning rate are *members* of one sweep:

    parameters, optimizer state   stacked over members on a leading axis
    the step                      `jax.vmap` of the fine-tuning trainer's step
                                  (`trainer.task_functions` + `train_step.make_step`)
    the learning rate             a per-member hyperparameter in the optimizer state
                                  (`optax.inject_hyperparams` around `methods.make_optimizer`)
    the run's length              the schedule's breakpoints (`methods.schedule_points`),
                                  hyperparameters too: one program trains any number
                                  of steps (a 5% split and the whole one alike)
    the batches                   each member reads its own seed's stream; members of
                                  one seed read the same batches, packed once for
                                  every row
    evaluation                    one vmapped forward pass over the dev and test batches

so a cell costs its FLOPs plus one compilation, and the compiled programs are
reused by every cell of the same shape (`ProgramCache`, keyed by everything that
changes the program; parameters, learning rates and each member's non-parameter
state are its arguments). A member is exactly the run `pretrain.finetune` would make
with that seed and learning rate (same head initialisation, batches, optimizer and
schedule), without checkpoints: the comparison saves each finished cell instead.

The tokenized task is prepared once (`TaskData`) and shared by every row, method,
seed and learning rate that trains on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pretrain.tokenizer import Tokenizer
from pretrain.train_step import make_step
from pretrain.transfer import encoding, heads, methods, tasks
from pretrain.transfer.trainer import EVAL_SPLITS, Body, collect_predictions, task_functions, task_model


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a sweep: its seed (head initialisation, data order, and a random
    body's initialisation) and its peak learning rate."""

    seed: int
    learning_rate: float


class TaskData:
    """A task tokenized once for every run that trains on it: the training split's
    segments (both layouts' views), the fixed dev and test batches, and how many
    packed batches one pass over the training split takes (an epoch)."""

    def __init__(self, task: tasks.Task, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, packed: bool):
        self.task, self.tokenizer = task, tokenizer
        self.seq_len, self.batch_size, self.packed = seq_len, batch_size, packed
        self.segments = encoding.CachedSegments(task, tokenizer, seq_len)
        self.eval_batches = {split: encoding.evaluation_batches(task, split, tokenizer, seq_len=seq_len,
                                                                batch_size=batch_size, packed=packed)
                             for split in EVAL_SPLITS}
        self.steps_per_epoch = encoding.batches_per_epoch(task, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                                          packed=packed, segments=self.segments)

        self._replays: dict[int, _Replay] = {}

    def stream(self, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """The endless training batches of `seed` (the order `pretrain.finetune` reads),
        packed once: every row of the comparison reads the same batches again."""
        if seed not in self._replays:
            self._replays[seed] = _Replay(iter(encoding.training_stream(
                self.task, self.tokenizer, seq_len=self.seq_len, batch_size=self.batch_size, seed=seed,
                packed=self.packed, segments=self.segments)))
        return self._replays[seed].read()


class _Replay:
    """One seed's training batches, kept as they are first packed; each reader starts at
    the first batch (readers copy what they take: `np.stack` in `train_members`)."""

    def __init__(self, source: Iterator[dict[str, np.ndarray]]):
        self.source, self.batches = source, []

    def read(self) -> Iterator[dict[str, np.ndarray]]:
        index = 0
        while True:
            if index == len(self.batches):
                self.batches.append(next(self.source))
            yield self.batches[index]
            index += 1


@dataclasses.dataclass
class Compiled:
    """The compiled step and evaluation of one program shape, and what compiling cost."""

    step: Any
    evaluate: Any
    compile_seconds: float


class ProgramCache:
    """Compiled sweep programs by everything that changes them, so cells of one shape
    (rows with the same body shape and layout, the same task and method, any label
    fraction and length) compile once."""

    def __init__(self) -> None:
        self.programs: dict[str, Compiled] = {}
        self.initializers: dict[str, Callable] = {}  # the jitted state initialisers, by the same kind of key
        self.compile_seconds = 0.0
        self.compilations = 0

    def initializer(self, key: str, build: Callable[[], Callable]) -> Callable:
        """The jitted function that builds a sweep's stacked state, reused (with its
        compilation) by every later sweep of the same key."""
        if key not in self.initializers:
            self.initializers[key] = build()
        return self.initializers[key]

    def extra(self, key: str, build: Callable[[], Any]) -> Any:
        """Functions of another kind kept by `key` (the compression's, compiled on first call)."""
        if key not in self.programs:
            self.programs[key] = build()
        return self.programs[key]

    def get(self, key: str, build: Callable[[], Compiled]) -> Compiled:
        if key not in self.programs:
            self.programs[key] = build()
            self.compile_seconds += self.programs[key].compile_seconds
            self.compilations += 1
        return self.programs[key]


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _member_optimizer(plan: methods.Plan, params: nnx.State, config: Any, total_steps: int
                      ) -> tuple[optax.GradientTransformation, dict[str, int]]:
    """The method's optimizer with the peak learning rate and the schedule's breakpoints
    held in its state, so members of one sweep can differ in rate and one compiled
    program serves runs of any length (every other setting is the config's); and this
    run's breakpoints."""
    settings = config.optimizer.to_dict()
    points = methods.schedule_points(plan, settings, config.methods, total_steps)

    def build(learning_rate, total, warmup=0, cut=0):  # (named: inject_hyperparams binds the signature)
        breakpoints = {"total": total, **({"cut": cut} if "cut" in points else {"warmup": warmup})}
        return methods.make_optimizer(plan, params, {**settings, "learning_rate": learning_rate}, config.methods,
                                      total_steps, breakpoints)

    return optax.inject_hyperparams(build)(learning_rate=settings["learning_rate"], **points), points


@jax.jit
def keep(better: jax.Array, new: Any, old: Any) -> Any:
    """Per member (the leading axis), `new` where `better` else `old`."""
    return jax.tree.map(lambda n, o: jnp.where(better.reshape(-1, *[1] * (n.ndim - 1)), n, o), new, old)


def _program_key(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def train_members(config: Any, task_data: TaskData, bodies_of: Callable[[int], Sequence[Body]],
                  members: Sequence[Member], *, total_steps: int, eval_every: int,
                  cache: ProgramCache | None = None, compression: Mapping[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """Fine-tunes every member in one vmapped program and returns, per member, its
    evaluations (dev scores every `eval_every` steps and at the end), the dev-selected
    one (the best dev metric, the earliest on a tie, as `pretrain.finetune` selects),
    and the test scores and predictions of the parameters of that step (kept on the
    device when dev improves; the test split is scored once, at the end).

    `bodies_of(seed)` gives the bodies of a member's seed (restored once for a
    pretrained row; initialised with the seed for the random-init control). With
    `compression` (`pretrain.transfer.comparison.post_training_settings`), each member's
    selected parameters are also scored on test compressed by each technique
    (`compressed`), and the sizes and speed of member 0's variants are measured
    (`measurements`)."""
    if not members:
        return []
    cache = cache or ProgramCache()
    task = task_data.task
    models, rests, graphdef = [], [], None
    for member in members:
        bodies = bodies_of(member.seed)
        model = task_model(config, bodies, task, member.seed)
        this_graphdef, params, this_rest = nnx.split(model, nnx.Param, ...)
        if graphdef is not None and this_graphdef != graphdef:
            raise ValueError("the members of one sweep must share their model's structure")
        graphdef = this_graphdef
        models.append(jax.device_get(params))
        rests.append(this_rest)  # each member's own non-parameter state (its bodies' dropout keys)
    num_layers = [b.model.config.num_layers for b in bodies_of(members[0].seed)]
    depths = heads.parameter_depths(models[0], num_layers)
    plan = methods.plan(config.method, config.methods, depths, total_steps)
    if plan.aux is not None:
        raise ValueError(f"config.method={config.method!r}: aux_lm is not swept (it mixes language-model rows into "
                         "the task's batches); fine-tune it with pretrain.finetune")
    optimizer, points = _member_optimizer(plan, models[0], config, total_steps)
    # the run's length is in the optimizer state, except where gradual unfreezing's
    # default pace (a share of the steps) is built into the update
    length_key = total_steps if plan.unfreeze_steps is not None else "any"

    def step(state, batch, rest):  # the rest is an argument, so a compiled program serves any row of its shape
        loss_fn, totals_fn, _ = task_functions(graphdef, rest, task.kind, 1, plan, total_steps)
        return make_step(loss_fn, totals_fn, optimizer, config.accumulation_steps)(state, batch)

    def evaluate(params, batch, rest):
        return task_functions(graphdef, rest, task.kind, 1, plan, total_steps)[2](params, batch)

    rest = _stack(rests)

    def initial(params, learning_rate, breakpoints):  # (cached: everything that varies is an argument)
        opt_state = optimizer.init(params)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
        for name, value in breakpoints.items():
            opt_state.hyperparams[name] = jnp.asarray(value, jnp.int32)
        return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}

    settings = {k: v for k, v in config.optimizer.to_dict().items() if k != "learning_rate"}
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), models[0])
    init_key = _program_key(graphdef, shapes, len(members), config.method, json.dumps(config.methods.to_dict(),
                            sort_keys=True), settings, length_key)
    state = cache.initializer(init_key, lambda: jax.jit(jax.vmap(initial, in_axes=(0, 0, None))))(
        _stack(models), jnp.asarray([m.learning_rate for m in members], jnp.float32),
        {name: jnp.asarray(value, jnp.int32) for name, value in points.items()})
    streams = {seed: task_data.stream(seed) for seed in dict.fromkeys(m.seed for m in members)}

    def next_batch() -> dict[str, np.ndarray]:
        by_seed = {seed: next(stream) for seed, stream in streams.items()}
        return {name: np.stack([by_seed[m.seed][name] for m in members]) for name in by_seed[members[0].seed]}

    first = next_batch()
    eval_shapes = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), b)
                   for b in task_data.eval_batches["dev"][:1]]

    def build() -> Compiled:
        started = time.perf_counter()
        abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
        compiled_step = jax.jit(jax.vmap(step), donate_argnums=0).lower(abstract(state), abstract(first),
                                                                         abstract(rest)).compile()
        compiled_eval = jax.jit(jax.vmap(evaluate, in_axes=(0, None, 0))).lower(
            abstract(state["params"]), eval_shapes[0], abstract(rest)).compile()
        return Compiled(compiled_step, compiled_eval, time.perf_counter() - started)

    key = _program_key(graphdef, jax.tree.map(lambda x: (x.shape, str(x.dtype)), (state, first)), task.kind,
                       config.method, json.dumps(config.methods.to_dict(), sort_keys=True), settings, length_key,
                       config.accumulation_steps, jax.tree.map(lambda x: (x.shape, str(x.dtype)), rest))
    program = cache.get(key, build)

    records: list[list[dict[str, Any]]] = [[] for _ in members]
    nonfinite: list[int | None] = [None] * len(members)
    best_params = jax.tree.map(jnp.copy, state["params"])  # each member's at its best dev score so far
    best_dev = np.full(len(members), -np.inf)
    batch, running = first, []
    started = time.perf_counter()
    for number in range(1, total_steps + 1):
        state, metrics = program.step(state, batch, rest)
        running.append(metrics["loss"])
        if number < total_steps:
            batch = next_batch()
        if number % eval_every and number != total_steps:
            continue
        mean_loss = np.mean(np.stack(jax.device_get(running)), axis=0)
        running = []
        dev = _evaluate(program, state["params"], rest, task_data, "dev")
        for index, (scored, _) in enumerate(dev):
            if nonfinite[index] is None and not np.isfinite(mean_loss[index]):
                nonfinite[index] = number
            records[index].append({"step": number, "train_loss": float(mean_loss[index]), "dev": scored})
        better = np.asarray([scored[task.metric] > best for (scored, _), best in zip(dev, best_dev)])
        if better.any():  # the earliest step of the best dev score, as pretrain.finetune selects
            best_params = keep(jnp.asarray(better), state["params"], best_params)
            best_dev = np.where(better, [scored[task.metric] for scored, _ in dev], best_dev)
    test = _evaluate(program, best_params, rest, task_data, "test")  # once, at each member's selected step
    train_seconds = time.perf_counter() - started
    compressed, measurements = [{} for _ in members], {}
    if compression:
        compressed, measurements = _compressed(task_data, graphdef, rest, best_params, program, cache, key,
                                               compression, next_batch, plan, total_steps)
    out = []
    for index, member in enumerate(members):
        best = max(records[index], key=lambda r: (r["dev"][task.metric], -r["step"]))
        out.append({"task": task.name, "seed": member.seed, "learning_rate": member.learning_rate,
                    "metric": task.metric, "selected_step": best["step"], "last_step": total_steps,
                    "dev": best["dev"], "test": test[index][0], "evaluations": records[index],
                    "test_predictions": test[index][1], "nonfinite_step": nonfinite[index], "members": len(members),
                    "train_seconds": train_seconds, "compile_seconds": program.compile_seconds,
                    **({"compressed": compressed[index], "measurements": measurements} if compression else {})})
    return out


def _compressed(task_data: TaskData, graphdef: nnx.GraphDef, rest: Any, best_params: Any, program: Compiled,
                cache: ProgramCache, key: str, settings: Mapping[str, Any],
                next_batch: Callable[[], dict[str, np.ndarray]], plan: methods.Plan, total_steps: int
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per member: {technique: test scores of its selected parameters compressed}, the
    parameters, bytes and inference tokens/s of member 0's model and of each variant)."""
    from pretrain.quantization import fake_quantized
    from pretrain.transfer import compression

    task = task_data.task
    member_0 = jax.device_get(jax.tree.map(lambda x: x[0], best_params))
    example = nnx.merge(graphdef, member_0, jax.tree.map(lambda x: x[0], rest))
    functions = cache.extra(key + "/compression", lambda: compression.post_training(
        graphdef, example, lambda g, r, quantize="none": task_functions(g, r, task.kind, 1, plan, total_steps,
                                                                        quantize=quantize)))
    speed_batch = task_data.eval_batches["test"][0]
    measurements = {"none": compression.measure(example, "none", None, speed_batch, settings["speed_repeats"])}
    scored: dict[str, list] = {}
    for technique in settings["techniques"]:
        masks = None
        if technique == "int8_weights":
            scored[technique] = _evaluate(program, jax.jit(jax.vmap(fake_quantized))(best_params), rest, task_data,
                                          "test")
        elif technique == "int8":
            scored[technique] = _evaluate(Compiled(None, functions.int8_evaluate, 0.0), best_params, rest, task_data,
                                          "test")
        else:  # prune
            batches = [next_batch() for _ in range(settings["importance_batches"])]
            masks = compression.pruned_masks(functions, best_params, rest, batches,
                                             fraction=settings["prune_fraction"],
                                             step_fraction=settings["prune_step_fraction"])
            masked = compression.with_mask(best_params, {k: jnp.asarray(v) for k, v in masks.items()})
            scored[technique] = _evaluate(program, masked, rest, task_data, "test")
        measurements[technique] = compression.measure(example, technique, masks, speed_batch,
                                                      settings["speed_repeats"])
    per_member = [{technique: results[index][0] for technique, results in scored.items()}
                  for index in range(len(scored[settings["techniques"][0]]))]
    return per_member, measurements


def _evaluate(program: Compiled, params: Any, rest: Any, task_data: TaskData, split: str
              ) -> list[tuple[dict[str, Any], Any]]:
    """Per member: (the split's scores and loss, its predictions in example order)."""
    task, batches = task_data.task, task_data.eval_batches[split]
    results = jax.device_get([program.evaluate(params, batch, rest) for batch in batches])
    out = []
    for index in range(jax.tree.leaves(params)[0].shape[0]):
        mine = [jax.tree.map(lambda x: x[index], result) for result in results]
        gold, predicted, loss, count = collect_predictions(task, split, batches, mine, task_data.tokenizer)
        out.append(({**task.score(gold, predicted), "loss": loss / max(count, 1.0)},
                    predicted))
    return out


def epoch_steps(task_data: TaskData, epochs: float) -> int:
    """Optimizer steps of `epochs` passes over the training split."""
    return max(1, math.ceil(epochs * task_data.steps_per_epoch))


def evaluation_interval(total_steps: int, evaluations: int) -> int:
    """Steps between evaluations so a run is scored `evaluations` times, the last at its end."""
    return max(1, math.ceil(total_steps / max(1, evaluations)))
