"""Pretraining entry point: one command trains, and the same command resumes.

    python -m pretrain.train --config=configs/pretrain.py:objective=mlm,size=small --workdir=runs/mlm \
        [--config.total_steps=2000] [--config.mesh.fsdp=4] [--config.parallelism=pmap]

The workdir is the run: `tokenizer.model`, `checkpoints/`, `metrics.jsonl`,
`tensorboard/`, `config.json` and `train.lock`. Rerunning the command restores the
newest good checkpoint (parameters, optimizer, step and the data iterator) and
continues exactly; a damaged newest checkpoint is skipped with a warning and moved
to `damaged_checkpoints/`. Before anything is compiled the workdir is checked
(writable, room for a checkpoint) and locked, so a second process on it refuses
to start. SIGTERM saves a checkpoint and exits 0. A non-finite loss stops the run
with the step, the objective and the gradient norm, keeping the last checkpoint;
with `config.nonfinite='skip'` such a step is skipped instead (counted in
`skipped_steps`) until `config.max_consecutive_skips` come in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from pretrain import distributed, sharding
from pretrain.checkpoint import Checkpointer, NoGoodCheckpoint
from pretrain.config_checks import validate_config
from pretrain.host_memory import keep_freed_memory
from pretrain.input_pipeline import build_input_pipeline
from pretrain.loss import nsp_statistics, token_statistics
from pretrain.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from pretrain.model import TransformerConfig, create_model
from pretrain.optimizer import learning_rate_schedule, make_optimizer
from pretrain.train_step import make_train_step
from pretrain.workdir import WorkdirError, WorkdirLock, check_free_space, checkpoint_bytes, prepare_workdir

log = logging.getLogger("pretrain.train")


class NonFiniteLoss(RuntimeError):
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


class Preemption:
    """Remembers a SIGTERM so the loop can save and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True


def summarize(stats: dict[str, np.ndarray], names: tuple[str, ...], prefix: str = "") -> dict[str, float]:
    """Per-objective loss and accuracy (and NSP) from summed statistics."""
    out = {}
    weights = stats["weight_sum"]
    for index, name in enumerate(names):
        if weights[index] > 0:
            out[f"{prefix}loss/{name}"] = float(stats["loss_sum"][index] / weights[index])
            out[f"{prefix}accuracy/{name}"] = float(stats["correct_sum"][index] / weights[index])
    if "nsp_weight_sum" in stats and stats["nsp_weight_sum"] > 0:
        out[f"{prefix}loss/nsp"] = float(stats["nsp_loss_sum"] / stats["nsp_weight_sum"])
        out[f"{prefix}accuracy/nsp"] = float(stats["nsp_correct_sum"] / stats["nsp_weight_sum"])
    return out


class Trainer:
    """Builds everything from a config and runs the loop (see module docstring)."""

    def __init__(self, config: Any, workdir: str | os.PathLike):
        """Checks the config and the workdir, locks the workdir (process 0), then
        builds data, model, optimizer and sharded state; nothing is compiled for
        training until `run`. Use as a context manager, or call `close`, when not
        calling `run` (which closes)."""
        self.config = config
        validate_config(config, jax.device_count())
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

    def _build(self) -> None:
        config, workdir = self.config, self.workdir
        self.pipeline = build_input_pipeline(config, workdir, process_index=jax.process_index(),
                                             process_count=jax.process_count())
        self.names = self.pipeline.mixture.names
        self.model_config = TransformerConfig(**config.model, vocab_size=self.pipeline.tokenizer.vocab_size)
        self.optimizer = make_optimizer(total_steps=config.total_steps, **config.optimizer)
        if self.primary:  # before the model exists: shapes only
            abstract = nnx.state(nnx.eval_shape(lambda: create_model(self.model_config, seed=config.seed)),
                                 nnx.Param)
            copies = jax.local_device_count() if config.parallelism == "pmap" else 1  # pmap saves every replica
            check_free_space(workdir, copies * checkpoint_bytes(jax.eval_shape(self._initial_state, abstract)))
        model = create_model(self.model_config, seed=config.seed)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        embedding = sum(int(np.prod(params[name].shape)) for name in ("token_embedding", "position_embedding",
                                                                      "type_embedding"))
        self.parameters = sum(x.size for x in jax.tree.leaves(params))
        self.flops_per_token = flops_per_token(self.parameters - embedding, self.model_config.num_layers,
                                               self.model_config.model_dim, config.seq_len)
        self._setup_parallelism(params)
        self.checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, run_info=self._run_info())
        self._closing.callback(self.checkpointer.close)
        self.metrics = MetricsWriter(workdir, self.primary)
        self._closing.callback(self.metrics.close)

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
        workdir lock. Idempotent; `run` calls it when it ends."""
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

    def _setup_parallelism(self, params) -> None:
        config = self.config
        step_fn = make_train_step(self.graphdef, self.rest, self.optimizer, len(self.names),
                                  config.accumulation_steps,
                                  axis_name="devices" if config.parallelism == "pmap" else None)
        if config.nonfinite == "skip":
            step_fn = skip_nonfinite_updates(step_fn)
        if config.parallelism == "pmap":
            devices = jax.local_device_count()
            self.state = jax.tree.map(lambda x: jnp.broadcast_to(x, (devices, *x.shape)),
                                      self._initial_state(params))
            self.abstract_state = jax.eval_shape(lambda: self.state)
            self.train_step = jax.pmap(step_fn, axis_name="devices", donate_argnums=0)
            self.put_batch = lambda batch: {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batch.items()}
            self.unreplicate = lambda tree: jax.tree.map(lambda x: x[0], tree)
            return
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self.mesh = mesh
        param_shardings = sharding.tree_shardings(nnx.get_partition_spec(params), params, mesh)
        abstract_opt = jax.eval_shape(self.optimizer.init, params)
        shardings = {
            "params": param_shardings,
            "opt_state": optax.tree_map_params(self.optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                               transform_non_params=lambda _: sharding.replicated(mesh)),
            "step": sharding.replicated(mesh),
        }
        self.state = jax.jit(self._initial_state, out_shardings=shardings)(params)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        self.train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                                  out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        self.put_batch = lambda batch: {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
        self.unreplicate = lambda tree: tree

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and accuracy per trained objective."""
        params = self.unreplicate(self.state["params"])
        graphdef, rest, num = self.graphdef, self.rest, len(self.names)

        @jax.jit
        def eval_step(params, batch):
            model = nnx.merge(graphdef, params, rest)
            hidden = model(batch)
            stats = token_statistics(model.logits(hidden), batch["targets"], batch["weights"],
                                     batch["objective_id"], num)
            if model.config.nsp_head:
                stats.update(nsp_statistics(model.nsp_logits(hidden), batch["nsp_labels"]))
            return stats

        totals = None
        for batch in self.pipeline.eval_batches():
            if self.config.parallelism == "pjit":
                batch = self.put_batch(batch)
            stats = jax.device_get(eval_step(params, batch))
            totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
        out = summarize(totals, self.names, prefix="eval/")
        out["eval/loss"] = float(totals["loss_sum"].sum() / max(totals["weight_sum"].sum(), 1))
        return out

    # -- the loop ---------------------------------------------------------------------

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

    def run(self) -> int:
        """Trains to `config.total_steps` (or a SIGTERM); returns the final step. Closes
        the trainer when it ends, however it ends."""
        iterator = iter(self.pipeline.train)
        try:
            return self._run(iterator)
        finally:
            self.close()

    def _run(self, iterator: Any) -> int:
        config = self.config
        restored = self.checkpointer.restore(self.abstract_state)
        start = 0
        if restored is not None:
            start, self.state, data_state = restored
            iterator.set_state(data_state)
            if self.checkpointer.steps()[-1] > start:  # damaged newer steps: out of the way of the saves to come
                self.checkpointer.set_aside_newer_than(start, self.primary)
            log.info("resumed from step %d", start)
        self.metrics.truncate_after(start)
        if self.primary:  # atomically: evaluation reads it while the run goes on
            path = os.path.join(self.workdir, "config.json")
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                handle.write(config.to_json_best_effort(indent=2))
            os.replace(path + ".tmp", path)
        self.peak, peak_source = peak_flops_per_device(config.peak_flops_per_device)
        log.info("model: %d parameters; MFU peak %.3g FLOP/s per device (%s)", self.parameters, self.peak,
                 peak_source)
        preemption = Preemption()
        self.skips = SkipCounter()
        self._window = (time.perf_counter(), 0, 0)  # start time, real tokens, steps
        pending = None  # (step, metrics) logged one step late: no host sync on every step
        step = start
        while step < config.total_steps:
            batch = next(iterator)
            tokens = int((batch["segment_ids"] > 0).sum()) * jax.process_count()
            self.state, metrics = self.train_step(self.state, self.put_batch(batch))
            step += 1
            metrics = self.unreplicate(metrics)
            if pending is not None:
                self._log(*pending)
                pending = None
            if config.nonfinite == "skip":
                self.skips.add(metrics["skipped"])
            self._window = (self._window[0], self._window[1] + tokens, self._window[2] + 1)
            last = step == config.total_steps
            save = last or preemption.requested or step % config.checkpoint_every == 0
            evaluate = last or (config.eval_every and step % config.eval_every == 0)
            if save or evaluate:
                # Logged before the save, so a resume from here finds every step <= it logged.
                self._log(step, metrics, self.evaluate() if evaluate else {})
                if save:
                    self._check_parameters_finite(step)
                    self.checkpointer.save(step, self.state, iterator.get_state())
            elif step % config.log_every == 0:
                pending = (step, metrics)
            if preemption.requested:
                break
        return step


# Problems with the user's config, data, workdir or run, each raised with a message that
# names it and the fix; main() prints that message alone.
USER_ERRORS = (ValueError, FileNotFoundError, WorkdirError, NonFiniteLoss, NoGoodCheckpoint)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "pretraining config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory; rerun the command to resume", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-host: host:port of process 0 (with --num_processes, --process_id)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: how many processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index, 0..num_processes-1")


def main(argv: list[str]) -> None:
    del argv
    keep_freed_memory()  # before JAX starts its threads: no page faults on every step (pretrain/host_memory.py)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain are chatty at INFO
    logging.getLogger("pretrain").setLevel(logging.INFO)
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        step = Trainer(_CONFIG.value, _WORKDIR.value).run()
    except USER_ERRORS as error:
        if os.environ.get("PRETRAIN_TRACEBACK"):
            raise
        # One message naming the problem and the fix, not a traceback (PRETRAIN_TRACEBACK=1 shows it).
        raise SystemExit(f"error: {error}") from None
    print(f"stopped at step {step}; workdir {os.path.abspath(_WORKDIR.value)}", flush=True)


if __name__ == "__main__":
    app.run(main)
