"""Pretraining entry point: one command trains, and the same command resumes.

    python -m pretrain.train --config=configs/pretrain.py:objective=mlm,size=small --workdir=runs/mlm \
        [--config.total_steps=2000] [--config.mesh.fsdp=4] [--config.parallelism=pmap]

The workdir is the run: `tokenizer.model`, `checkpoints/`, `metrics.jsonl`,
`tensorboard/`, `config.json`, `mfu_peak.json` and `train.lock`. Rerunning the
command restores the newest good checkpoint (parameters, optimizer, step and the
data iterator) and continues exactly; a damaged newest checkpoint is skipped with
a warning and moved to `damaged_checkpoints/`; a run that already reached
`config.total_steps` says so and trains nothing. Before anything is compiled the
workdir is checked (writable, room for a checkpoint) and locked, so a second
process on it refuses to start. SIGTERM and the first Ctrl-C save a checkpoint of
the step that is running and exit 0 (`pretrain.stopping`). A non-finite loss stops
the run with the step, the objective and the gradient norm, keeping the last
checkpoint; with `config.nonfinite='skip'` such a step is skipped instead
(counted in `skipped_steps`) until `config.max_consecutive_skips` come in a row.

The console shows the run's effective settings once, a progress line every
`log_every` steps, the held-out loss next to the unigram baseline
(`pretrain.baseline`) at every evaluation, and at the end one line of what the
model now does (`config.sample_at_end`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from pretrain import cli, distributed, sharding
from pretrain.attention import choose_attention
from pretrain.baseline import unigram_baseline
from pretrain.checkpoint import Checkpointer
from pretrain.config_checks import validate_config
from pretrain.errors import UserError
from pretrain.generate import demonstrate
from pretrain.host_memory import keep_freed_memory
from pretrain.input_pipeline import build_input_pipeline
from pretrain.layers import layout_alternatives
from pretrain.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from pretrain.model import TransformerConfig, attention_kernel, create_model, preset_name
from pretrain.optimizer import learning_rate_schedule, make_optimizer
from pretrain.peers import PeerWatch, any_process
from pretrain.resolve import resolve_config
from pretrain.stopping import StopRequest
from pretrain.train_step import make_eval_step, make_train_step
from pretrain.workdir import (
    WorkdirLock,
    check_free_space,
    checkpoint_bytes,
    prepare_workdir,
)

log = logging.getLogger("pretrain.train")


PARALLELISMS = ("pjit", "pmap")
NONFINITE_POLICIES = ("stop", "skip")
POSITIVE_INTEGERS = ("total_steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "accumulation_steps",
                     "keep_checkpoints", "max_consecutive_skips")


def loop_problems(config: Any) -> list[str]:
    """Every problem of the training loop's own fields (the top-level ones), naming
    field and fix; `pretrain.config_checks.validate_config` reports them with the rest."""
    problems = []
    for field in POSITIVE_INTEGERS:
        if not isinstance(config[field], int) or config[field] < 1:
            problems.append(f"config.{field}={config[field]!r} must be a positive integer")
    if not isinstance(config.eval_every, int) or config.eval_every < 0:
        problems.append(f"config.eval_every={config.eval_every!r} must be an integer >= 0 (0: evaluate at the end)")
    if config.parallelism not in PARALLELISMS:
        problems.append(f"config.parallelism={config.parallelism!r} must be one of {PARALLELISMS}")
    if config.nonfinite not in NONFINITE_POLICIES:
        problems.append(f"config.nonfinite={config.nonfinite!r} must be one of {NONFINITE_POLICIES} ('stop' ends "
                        "the run at a NaN/inf loss, 'skip' drops that step's update)")
    if not config.peak_flops_per_device >= 0:
        problems.append(f"config.peak_flops_per_device={config.peak_flops_per_device!r} must be >= 0 (0: detect)")
    if not config.peer_timeout_seconds >= 0:
        problems.append(f"config.peer_timeout_seconds={config.peer_timeout_seconds!r} must be >= 0 (seconds without "
                        "a sign of life before a process counts as lost; 0: JAX's own heartbeat decides)")
    return problems


def _read_text(path: str) -> str | None:
    """The text of a file, or None when it is missing or not text."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


class NonFiniteLoss(UserError, RuntimeError):
    """The loss or gradients became NaN or inf."""


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array in `tree` is finite (a boolean scalar)."""
    return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree), jnp.bool_(True))


# One compiled program, not one eager reduction per array: many small eager programs
# over pmap-sharded arrays can deadlock XLA's CPU collectives (seen with a second
# pmap trainer in one process).
_all_finite = jax.jit(all_finite)


def skip_nonfinite_updates(step_fn: Callable) -> Callable:
    """Wraps a train step so that a step whose loss, gradient norm or updated
    parameters are not finite leaves the parameters and optimizer state as they
    were (so the learning-rate schedule does not advance either); the state's step
    counter still advances, as the batch was consumed. A select inside the
    compiled step decides, so no host sync is needed; `metrics['skipped']` is 1
    for a skipped step, else 0."""

    def step(state, batch):
        new_state, metrics = step_fn(state, batch)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & all_finite(new_state["params"])
        kept = {key: jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state[key], state[key])
                for key in ("params", "opt_state")}
        return {**new_state, **kept}, {**metrics, "skipped": (~finite).astype(jnp.int32)}

    return step


@jax.jit
def _count_skips(counts: tuple[jax.Array, jax.Array, jax.Array], skipped: jax.Array):
    window, run, longest = counts
    run = (run + skipped) * skipped
    return window + skipped, run, jnp.maximum(longest, run)


class SkipCounter:
    """Skipped steps counted on the device (the loop never waits on a step just to
    count it): how many since the last `read`, and the longest run in a row."""

    def __init__(self) -> None:
        zero = jnp.zeros((), jnp.int32)
        self._counts = (zero, zero, zero)  # since last read, current run, longest run since last read

    def add(self, skipped: jax.Array) -> None:
        self._counts = _count_skips(self._counts, skipped)

    def read(self) -> tuple[int, int]:
        """(skipped since the last read, longest run of consecutive skips in that time)."""
        window, run, longest = (int(x) for x in jax.device_get(self._counts))
        self._counts = (jnp.zeros((), jnp.int32), self._counts[1], self._counts[1])
        return window, longest


def summarize(stats: dict[str, np.ndarray], names: tuple[str, ...], prefix: str = "") -> dict[str, float]:
    """Per-objective loss and accuracy, and each loss term's, from summed statistics."""
    out = {}
    weights = stats["weight_sum"]
    for index, name in enumerate(names):
        if weights[index] > 0:
            out[f"{prefix}loss/{name}"] = float(stats["loss_sum"][index] / weights[index])
            out[f"{prefix}accuracy/{name}"] = float(stats["correct_sum"][index] / weights[index])
    for term, sums in stats.get("terms", {}).items():
        if sums["weight_sum"] > 0:
            out[f"{prefix}loss/{term}"] = float(sums["loss_sum"] / sums["weight_sum"])
            out[f"{prefix}accuracy/{term}"] = float(sums["correct_sum"] / sums["weight_sum"])
    return out


class Trainer:
    """Builds everything from a config and runs the loop (see module docstring)."""

    def __init__(self, config: Any, workdir: str | os.PathLike):
        """Checks the config and the workdir, locks the workdir (process 0), then
        builds data, model, optimizer and sharded state; nothing is compiled for
        training until `run`. Use as a context manager, or call `close`, when not
        calling `run` (which closes)."""
        self.config = config = self._resolve(config)
        self._validate(config)
        self.primary = jax.process_index() == 0
        self.workdir = prepare_workdir(workdir)
        self._closing = contextlib.ExitStack()  # run last-in first-out by close(), even if one raises
        if self.primary:
            self._closing.callback(WorkdirLock(self.workdir).release)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _resolve(self, config: Any) -> Any:
        """The config this run trains with (`pretrain.resolve.resolve_config`): a new
        one, the given one untouched. A subclass resolves its own."""
        return resolve_config(config)

    def _validate(self, config: Any) -> None:
        """Raises ValueError naming every problem of the resolved config (a subclass
        checks its own); it changes nothing."""
        validate_config(config, jax.device_count())

    def _build(self) -> None:
        """Data, model, optimizer, sharded state and checkpointer. A subclass that trains
        something else (fine-tuning) builds its own and sets the same attributes:
        names, graphdef/rest, optimizer, parameters, flops_per_token, train_data,
        checkpointer, and the compiled steps through `_setup_parallelism`."""
        config, workdir = self.config, self.workdir
        self.pipeline = build_input_pipeline(config, workdir, process_index=jax.process_index(),
                                             process_count=jax.process_count())
        self.train_data = self.pipeline.train
        self.names = self.pipeline.mixture.names
        attention, fallback = choose_attention(config.model.attention, self.pipeline.mixture.attention_kinds)
        if fallback and self.primary:
            log.warning(fallback)
        self.model_config = TransformerConfig(**{**config.model, "attention": attention},
                                              vocab_size=self.pipeline.tokenizer.vocab_size)
        self.optimizer = make_optimizer(total_steps=config.total_steps, **config.optimizer)
        if self.primary:  # before the model exists: shapes only
            abstract = nnx.state(nnx.eval_shape(lambda: create_model(self.model_config, seed=config.seed)),
                                 nnx.Param)
            copies = jax.local_device_count() if config.parallelism == "pmap" else 1  # pmap saves every replica
            check_free_space(workdir, copies * checkpoint_bytes(jax.eval_shape(self._initial_state, abstract)))
        model = create_model(self.model_config, seed=config.seed)
        if config.init.hf:  # a fresh start begins from the imported weights; a resume then restores its own
            from pretrain.hf.models import flat_params, grow_token_types, hf_params, set_flat_params

            imported = hf_params(config.init.hf, self.model_config.num_heads)[1]
            fresh = flat_params(model)  # heads the imported model lacks start from their initialisation
            imported.update({name: value for name, value in fresh.items()
                             if name.startswith("heads.") and name not in imported})
            imported["type_embedding"] = grow_token_types(imported["type_embedding"],
                                                          self.model_config.num_token_types)
            set_flat_params(model, imported)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        embedding = sum(int(np.prod(params[name].shape)) for name in ("token_embedding", "position_embedding",
                                                                      "type_embedding"))
        self.parameters = sum(x.size for x in jax.tree.leaves(params))
        self.flops_per_token = flops_per_token(self.parameters - embedding, self.model_config.num_layers,
                                               self.model_config.model_dim, config.seq_len)
        self._setup_parallelism(params)
        self.checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, run_info=self._run_info())
        self._closing.callback(self.checkpointer.close)
        self._baseline: dict[str, float] | None = None  # the unigram baseline, computed at the first evaluation

    def _run_info(self) -> dict[str, Any]:
        """What each checkpoint records about the run that wrote it; on resume, a
        different array layout or tokenizer is an error, other changes a warning."""
        with open(self.pipeline.tokenizer.path, "rb") as handle:
            tokenizer_sha256 = hashlib.sha256(handle.read()).hexdigest()
        fields = ("objective", "seq_len", "batch_size", "total_steps", "seed", "parallelism")
        return {"model": dataclasses.asdict(self.model_config), "optimizer": self.config.optimizer.to_dict(),
                "tokenizer_sha256": tokenizer_sha256, **{name: self.config[name] for name in fields}}

    def close(self) -> None:
        """Waits for pending checkpoint saves, closes the metrics and releases the
        workdir lock and the signal handlers. Idempotent; `run` calls it when it ends."""
        self._closing.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _learning_rate(self, step: int) -> float:
        o = self.config.optimizer
        return float(learning_rate_schedule(o.learning_rate, o.warmup_steps, self.config.total_steps,
                                            o.schedule, o.end_factor)(step))

    # -- parallelism ----------------------------------------------------------------

    def _initial_state(self, params):
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def _step_functions(self, axis_name: str | None) -> tuple[Callable, Callable]:
        """(train step, evaluation step) before compilation: the pretraining loss's."""
        terms = self.pipeline.mixture.loss_terms
        step_fn = make_train_step(self.graphdef, self.rest, self.optimizer, len(self.names),
                                  self.config.accumulation_steps, axis_name=axis_name, terms=terms)
        return step_fn, make_eval_step(self.graphdef, self.rest, len(self.names), terms)

    def _setup_parallelism(self, params) -> None:
        config = self.config
        step_fn, eval_fn = self._step_functions("devices" if config.parallelism == "pmap" else None)
        if config.nonfinite == "skip":
            step_fn = skip_nonfinite_updates(step_fn)
        if config.parallelism == "pmap":
            devices = jax.local_device_count()
            self.mesh = None
            self.state = jax.tree.map(lambda x: jnp.broadcast_to(x, (devices, *x.shape)),
                                      self._initial_state(params))
            self.abstract_state = jax.eval_shape(lambda: self.state)
            self.train_step = jax.pmap(step_fn, axis_name="devices", donate_argnums=0)
            self.eval_step = jax.jit(eval_fn)  # on one device, over the unreplicated parameters
            self.put_batch = lambda batch: {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batch.items()}
            self.put_eval_batch = lambda batch: batch
            self.unreplicate = lambda tree: jax.tree.map(lambda x: x[0], tree)
            return
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self.mesh = mesh
        shardings = sharding.train_state_shardings(params, self.optimizer, mesh)
        param_shardings = shardings["params"]
        self.state = jax.jit(self._initial_state, out_shardings=shardings)(params)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        self.train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                                  out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        self.eval_step = jax.jit(eval_fn, in_shardings=(param_shardings, batch_sharding),
                                 out_shardings=sharding.replicated(mesh))
        self.put_batch = lambda batch: {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
        self.put_eval_batch = self.put_batch
        self.unreplicate = lambda tree: tree

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and accuracy per trained objective, with the unigram baseline
        of each (`pretrain.baseline`; computed once, from the start of the training
        stream)."""
        params = self.unreplicate(self.state["params"])
        batches = self.pipeline.eval_batches()
        totals = None
        for batch in batches:
            stats = jax.device_get(self.eval_step(params, self.put_eval_batch(batch)))
            totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
        out = summarize(totals, self.names, prefix="eval/")
        if totals["weight_sum"].sum() > 0:  # objectives that predict tokens through the body (ELECTRA's does not)
            out["eval/loss"] = float(totals["loss_sum"].sum() / totals["weight_sum"].sum())
            out["eval/accuracy"] = float(totals["correct_sum"].sum() / totals["weight_sum"].sum())
        if self._baseline is None:
            self._baseline = unigram_baseline(itertools.islice(iter(self.pipeline.train), 256), batches,
                                              self.names, self.pipeline.tokenizer.vocab_size)
        return {**out, **self._baseline}

    def _print_evaluation(self, step: int, values: dict[str, float]) -> None:
        line = f"eval at step {step}:"
        if "eval/loss" in values:
            line += f" held-out loss {values['eval/loss']:.4f}"
            if "eval/baseline" in values:
                line += f" (unigram baseline {values['eval/baseline']:.4f})"
            line += f", accuracy {values['eval/accuracy']:.2%}"
        terms = [term.name for term in self.pipeline.mixture.loss_terms]
        shown = (list(self.names) if len(self.names) > 1 or "eval/loss" not in values else []) + terms
        line += "".join(
            f"\n  {name}: loss {values[f'eval/loss/{name}']:.4f}"
            + (f" (baseline {values[f'eval/baseline/{name}']:.4f})" if f"eval/baseline/{name}" in values else "")
            + f", accuracy {values[f'eval/accuracy/{name}']:.2%}"
            for name in shown if f"eval/loss/{name}" in values)
        print(line, flush=True)

    def _sample_sentence(self) -> str | None:
        """A held-out sentence of 8 to 30 words, the first in document order."""
        documents = self.pipeline.source.split("heldout")
        for index in range(min(len(documents), 200)):
            for sentence in documents[index].sentences:
                if 8 <= len(sentence.split()) <= 30:
                    return sentence
        return None

    def _show_sample(self) -> None:
        """Prints one line of what the trained model does on a held-out sentence."""
        sentence = self._sample_sentence()
        if sentence is None:
            return
        model = nnx.merge(self.graphdef, jax.device_get(self.unreplicate(self.state["params"])), self.rest)
        leaves = self.pipeline.mixture.objectives
        print(f"the model now {demonstrate(model, self.pipeline.tokenizer, leaves, sentence)}", flush=True)

    # -- the console ------------------------------------------------------------------

    def _describe(self, start: int) -> str:
        """The run's effective settings, printed once at start."""
        config, model = self.config, self.model_config
        if config.parallelism == "pjit":
            shape = dict(self.mesh.shape)
            layout = f"pjit over mesh data={shape['data']} fsdp={shape['fsdp']} tensor={shape['tensor']}"
        else:
            layout = f"pmap over {jax.local_device_count()} local devices"
        o = config.optimizer
        lines = [
            ("run", f"{self.workdir} ({f'resuming from step {start}' if start else 'new run'})"),
            ("objective", f"{config.objective}" + (f" (leaves: {', '.join(self.names)})"
                                                   if len(self.names) > 1 else "")),
            ("model", f"{preset_name(config.model)}: {model.num_layers} layers, width {model.model_dim}, "
                      f"{model.num_heads} heads, MLP {model.mlp_dim}, {'pre' if model.pre_layer_norm else 'post'}-LN, "
                      f"{model.dtype}, {model.attention} attention"
                      + (", scan over layers" if model.scan_layers else "")
                      + (f", remat {model.remat}" if model.remat != "none" else "")
                      + f"; {self.parameters:,} parameters"),
            ("data", f"{config.data.kind}; vocabulary {self.pipeline.tokenizer.vocab_size:,}; batch "
                     f"{config.batch_size} rows x seq_len {config.seq_len} = {config.batch_size * config.seq_len:,} "
                     "token slots per step"),
            ("steps", f"{config.total_steps:,}; AdamW peak lr {o.learning_rate:g}, {o.warmup_steps} warmup, "
                      f"{o.schedule} decay; eval every {config.eval_every or config.total_steps}, checkpoint every "
                      f"{config.checkpoint_every}"),
            ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} "
                        f"process(es); {layout}"),
            ("MFU peak", f"{self.peak:.3g} FLOP/s per device ({self.peak_source})"),
        ]
        width = max(len(name) for name, _ in lines)
        return "\n".join(f"{name + ':':<{width + 1}} {text}" for name, text in lines)

    def _check_finite(self, step: int, metrics: dict) -> None:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if np.isfinite(loss) and np.isfinite(grad_norm):
            return
        per_objective = summarize(jax.device_get(metrics), self.names)
        bad = [k.split("/", 1)[1] for k, v in per_objective.items() if k.startswith("loss/") and not np.isfinite(v)]
        raise NonFiniteLoss(
            f"non-finite loss {loss} at step {step} (objective(s): {', '.join(bad) or 'unknown'}; "
            f"gradient norm {grad_norm}); the last good checkpoint in {self.checkpointer.directory} "
            "is intact. Lower config.optimizer.learning_rate or raise warmup_steps, then rerun.")

    def _check_parameters_finite(self, step: int) -> None:
        """A checkpoint never holds NaN/inf parameters (the loss of step s was taken
        before its update, so it cannot vouch for the parameters saved after it)."""
        if not bool(_all_finite(self.state["params"])):
            raise NonFiniteLoss(
                f"parameters became non-finite in the update of step {step}; not saving them. The last good "
                f"checkpoint in {self.checkpointer.directory} is intact. Lower config.optimizer.learning_rate "
                "or enable config.optimizer.clip_norm, then rerun.")

    def _check_skips(self, step: int, metrics: dict) -> int:
        """Steps skipped since the last log (config.nonfinite='skip'); stops the run
        once config.max_consecutive_skips steps in a row were skipped."""
        skipped, longest = self.skips.read()
        limit = self.config.max_consecutive_skips
        if longest >= limit:
            raise NonFiniteLoss(
                f"by step {step}, {longest} steps in a row had a non-finite loss, gradient or update and were "
                f"skipped (config.nonfinite='skip', config.max_consecutive_skips={limit}; loss now "
                f"{float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}); the parameters are those "
                f"of the last good step and the last good checkpoint in {self.checkpointer.directory} is intact. "
                "Lower config.optimizer.learning_rate or raise warmup_steps, then rerun.")
        return skipped

    def _log(self, step: int, metrics: dict, extra: dict | None = None) -> None:
        """Writes the metrics of `step` (plus `extra`, e.g. eval); stops on a non-finite
        loss (config.nonfinite='stop') or too many skipped steps in a row ('skip')."""
        skipping = self.config.nonfinite == "skip"
        skipped = self._check_skips(step, metrics) if skipping else self._check_finite(step, metrics)
        metrics = jax.device_get(metrics)
        started, tokens, steps = self._window
        now = time.perf_counter()
        tokens_per_sec = tokens / max(now - started, 1e-9)
        self._window = (now, 0, 0)
        values = {
            "loss": float(metrics["loss"]),
            **summarize(metrics, self.names),
            "learning_rate": self._learning_rate(step - 1),
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * self.flops_per_token / (jax.device_count() * self.peak),
            "attention_kernel": self.attention_kernel,
            **({"skipped_steps": skipped} if skipping else {}),
            **(extra or {}),
        }
        self.metrics.write(step, values)
        if self.primary:
            eta = (self.config.total_steps - step) * (now - started) / max(steps, 1)
            objectives = " ".join(f"{k[5:]}={v:.3f}" for k, v in values.items() if k.startswith("loss/"))
            print(f"step {step}/{self.config.total_steps} loss {values['loss']:.4f} [{objectives}] "
                  f"{tokens_per_sec:,.0f} tok/s mfu {values['mfu']:.2%} eta {eta / 60:.1f} min"
                  + (f" skipped {skipped}" if skipped else ""), flush=True)
            if extra:
                self._print_evaluation(step, values)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Trains to `config.total_steps`, or until SIGTERM or Ctrl-C (which save the
        step that is running); returns the final step. Closes the trainer when it
        ends, however it ends."""
        stop = StopRequest()
        self._closing.callback(stop.close)
        iterator = iter(self.train_data)
        try:
            return self._run(iterator, stop)
        finally:
            self.close()

    def _restore(self, iterator: Any) -> int:
        """Restores the newest good checkpoint, if any (written in either layer layout,
        `config.model.scan_layers`); returns its step (0: none)."""
        layer_axis = 1 if self.config.parallelism == "pmap" else 0  # after pmap's device axis
        restored = self.checkpointer.restore(self.abstract_state, alternatives=layout_alternatives(
            self.abstract_state, layer_axis))
        if restored is None:
            return 0
        start, self.state, data_state = restored
        iterator.set_state(data_state)
        if self.checkpointer.steps()[-1] > start:  # damaged newer steps: out of the way of the saves to come
            self.checkpointer.set_aside_newer_than(start, self.primary)
        log.info("resumed from step %d", start)
        return start

    def _run(self, iterator: Any, stop: StopRequest) -> int:
        config = self.config
        start = self._restore(iterator)
        if self.primary:  # atomically: evaluation reads it while the run goes on; a damaged one is
            # rewritten by rerunning the command, even when the run is complete (an intact one is left as it is)
            path, text = os.path.join(self.workdir, "config.json"), config.to_json_best_effort(indent=2)
            if _read_text(path) != text:
                with open(path + ".tmp", "w", encoding="utf-8") as handle:
                    handle.write(text)
                os.replace(path + ".tmp", path)
        if start >= config.total_steps:
            if self.primary:
                print(f"the run in {self.workdir} is already complete: its checkpoint is at step {start} and "
                      f"config.total_steps={config.total_steps}; nothing to train. To train longer, raise "
                      "--config.total_steps (the schedule then stretches to the new end)", flush=True)
            return start
        self.metrics = MetricsWriter(self.workdir, self.primary, start_step=start)
        self._closing.callback(self.metrics.close)
        if self.metrics.set_aside:
            log.warning("%s holds metrics of an earlier run but no checkpoint, so this run starts from step 0; "
                        "the earlier metrics were kept as %s", self.workdir,
                        " and ".join(os.path.basename(path) for path in self.metrics.set_aside))
        self.peak, self.peak_source = peak_flops_per_device(config.peak_flops_per_device, self.workdir,
                                                            self.primary)
        if self.primary:
            print(self._describe(start), flush=True)
        self.skips = SkipCounter()
        self.attention_kernel: str | None = None  # known once the train step is traced (`_train`)
        self._window = (time.perf_counter(), 0, 0)  # start time, real tokens, steps
        step = self._train(iterator, stop, start)
        if step == config.total_steps:
            self._finish(step)
        return step

    def _finish(self, step: int) -> None:
        """What follows the last step (not a stop): one line of what the model does."""
        if self.config.sample_at_end and self.primary and jax.process_count() == 1:
            self._show_sample()

    def _traced_attention_kernel(self) -> str:
        """The attention kernel the traced train step runs (`pretrain.model.attention_kernel`);
        a subclass that trains other models names theirs."""
        return attention_kernel(self.model_config)

    def _record_attention_kernel(self) -> None:
        """Keeps the kernel the train step runs for every metrics row (`attention_kernel`)
        and says it once: a flash run that fell back to the chunked XLA path says so."""
        kernel = self.attention_kernel = self._traced_attention_kernel()
        if self.primary:
            log.info("attention: %s", kernel if kernel == "dense" else f"flash via {kernel} on {jax.default_backend()}")

    def _train(self, iterator: Any, stop: StopRequest, step: int) -> int:
        """The steps from `step` on. The next batch is read and placed on the devices
        while the device runs the current step; the host then waits for that step
        before it dispatches the next one, so a stop request is honoured at the next
        step boundary (the waiting costs one dispatch latency per step)."""
        config = self.config

        def read() -> tuple[dict, int]:
            host_batch = next(iterator)
            return self.put_batch(host_batch), int((host_batch["segment_ids"] > 0).sum()) * jax.process_count()

        data_state = iterator.get_state()  # the iterator's position after the last trained step
        ahead = read() if step < config.total_steps else None
        metrics, saved = None, None  # the newest step's metrics; the newest step saved in this call
        # A stop is acted on only once every process knows of it, at the same step (peers.any_process).
        stopping = any_process(stop.requested is not None)
        while step < config.total_steps and not stopping:
            batch, tokens = ahead
            self.state, metrics = self.train_step(self.state, batch)
            if self.attention_kernel is None:  # the call above traced the step
                self._record_attention_kernel()
            step += 1
            data_state = iterator.get_state()
            ahead = read() if step < config.total_steps else None  # while the device runs this step
            metrics = self.unreplicate(metrics)
            jax.block_until_ready(metrics)
            if config.nonfinite == "skip":
                self.skips.add(metrics["skipped"])
            self._window = (self._window[0], self._window[1] + tokens, self._window[2] + 1)
            stopping = any_process(stop.requested is not None)
            last = step == config.total_steps
            save = last or stopping or step % config.checkpoint_every == 0
            evaluate = last or (config.eval_every and step % config.eval_every == 0)
            if save or evaluate or step % config.log_every == 0:
                # Logged before the save, so a resume from here finds every step <= it logged.
                self._log(step, metrics, self.evaluate() if evaluate else {})
            if save:
                self._save(step, data_state)
                saved = step
        if any_process(stop.requested is not None) and metrics is not None and saved != step:
            self._log(step, metrics)  # the signal came after the last check
            self._save(step, data_state)
        return step

    def _save(self, step: int, data_state: dict) -> None:
        """Saves `step` with the data state of every host merged (each host's holds only
        the shards it reads; the checkpoint holds all, the same on every host)."""
        self._check_parameters_finite(step)
        self.checkpointer.save(step, self.state, distributed.merge_host_states(data_state))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.train`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    keep_freed_memory()  # before JAX starts its threads: no page faults on every step (pretrain/host_memory.py)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "run directory; rerun the command to resume",
                                  flag_values=flag_values)
    coordinator = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 (with "
                                      "--num_processes, --process_id)", flag_values=flag_values)
    num_processes = flags.DEFINE_integer("num_processes", None, "multi-host: how many processes in the job",
                                         flag_values=flag_values)
    process_id = flags.DEFINE_integer("process_id", None, "multi-host: this process's index, 0..num_processes-1",
                                      flag_values=flag_values)
    config = cli.define_config(flag_values, argv, "configs/pretrain.py", "pretraining config file")
    cli.parse(flag_values, argv, __doc__)

    def command() -> int:
        if not workdir.value:
            raise ValueError("--workdir is required: the run's directory, e.g. --workdir=runs/mlm (rerun the same "
                             "command to resume)")
        run_config = cli.config_value(config, argv)
        distributed.initialize(coordinator.value, num_processes.value, process_id.value,
                               peer_timeout=run_config.peer_timeout_seconds)
        with PeerWatch(run_config.peer_timeout_seconds):  # multi-process only; still watching if the run fails
            return Trainer(run_config, workdir.value).run()

    try:
        step = cli.run_reporting_bad_input(command)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: aborted without saving (the newest checkpoint in the workdir is intact; "
                         "rerun the command to resume from it)") from None
    print(f"stopped at step {step}; workdir {os.path.abspath(workdir.value)}", flush=True)


if __name__ == "__main__":
    main()
