"""The training loop: one `Loop` trains any `Program`, and the same command resumes it.

The loop owns what every run shares: the workdir (checked, locked, `config.json`,
`metrics.jsonl`, TensorBoard), checkpoints and exact resumption (the newest good one,
skipping damaged ones; either layer layout), SIGTERM and Ctrl-C (save at the next step
boundary), the NaN policy (`config.nonfinite`: stop, or skip the step), the console
(settings once, a progress line every `log_every` steps, evaluations) and the devices,
through the strategy `config.parallelism` names (`pretrain.parallel`: pjit or pmap). A
`Program` says what is trained: its config checks, its parameters, data and optimizer,
the step's loss and the evaluation step, what an evaluation reports, how the run
describes itself and what follows the last step. Pretraining (`pretrain.train`) and
fine-tuning (`pretrain.transfer.trainer`) are the two programs; ELECTRA's two models
are one program's, the generator a head of the body (`pretrain.heads.generator`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pretrain import distributed
from pretrain.checkpoint import Checkpointer
from pretrain.errors import UserError
from pretrain.layers import layout_alternatives
from pretrain.metrics import MetricsWriter, peak_flops_per_device
from pretrain.parallel import PARALLELISMS, make_strategy
from pretrain.peers import any_process
from pretrain.stopping import StopRequest
from pretrain.workdir import WorkdirLock, prepare_workdir

log = logging.getLogger("pretrain.train")

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
    """Loss and accuracy of each metrics group (`names`: a program's objective leaves,
    or its task), and of each loss term, from summed statistics."""
    out = {}
    weights = stats["weight_sum"]
    for index, name in enumerate(names):
        if weights[index] > 0:
            out[f"{prefix}loss/{name}"] = float(stats["loss_sum"][index] / weights[index])
            out[f"{prefix}accuracy/{name}"] = float(stats["correct_sum"][index] / weights[index])
    for term, sums in stats.get("terms", {}).items():
        if sums["weight_sum"] > 0:
            out[f"{prefix}loss/{term}"] = float(sums["loss_sum"] / sums["weight_sum"])
            if "correct_sum" in sums:  # a term without an accuracy (a squared error) has none
                out[f"{prefix}accuracy/{term}"] = float(sums["correct_sum"] / sums["weight_sum"])
    return out


Score = Callable[[Mapping[str, np.ndarray]], dict]  # a host batch -> the evaluation step's results, on the host


class Program(Protocol):
    """What a `Loop` trains. `resolve` and `validate` run first (before the workdir is
    touched); `build` then sets the attributes below and returns the initial
    parameters, which the loop places on the devices with the optimizer's state."""

    names: tuple[str, ...]  # the groups metrics are summed in (objective leaves; 'task' and its auxiliary ones)
    optimizer: optax.GradientTransformation
    parameters: int  # trainable parameters, for the console
    flops_per_token: float  # training FLOPs per token, MFU's numerator
    train_data: Any  # an iterable of host batches with get_state/set_state (the data state checkpoints keep)
    # parameters the steps read but never train (an `nnx.State`; a distillation teacher), or None: the
    # strategy places them once and the step functions take them as a third argument; no checkpoint holds them
    frozen: Any

    def resolve(self, config: Any) -> Any:
        """The config the run trains with (a new one; the given one untouched)."""

    def validate(self, config: Any) -> None:
        """Raises ValueError naming every problem of the resolved config; changes nothing."""

    def build(self, config: Any, workdir: str, primary: bool, strategy: Any) -> Any:
        """Data, model, optimizer; returns the initial parameters (an `nnx.State`)."""

    def run_info(self) -> dict[str, Any]:
        """What each checkpoint records about the run (a resume compares it)."""

    def learning_rate(self, step: int) -> float:
        """The learning rate of `step`, for the metrics."""

    def step_functions(self, axis_name: str | None) -> tuple[Callable, Callable]:
        """(train step, evaluation step) before compilation (`pretrain.train_step.make_step`)."""

    def evaluate(self, score: Score) -> dict[str, float]:
        """The evaluation metrics (`eval/...`), scoring batches with `score`."""

    def print_evaluation(self, step: int, values: dict[str, float]) -> None:
        """Prints an evaluation's metrics."""

    def describe(self, start: int, workdir: str) -> list[tuple[str, str]]:
        """(name, text) lines of the run's effective settings; the loop adds the devices'."""

    def finish(self, step: int, params: Any, workdir: str, primary: bool) -> None:
        """What follows the last step (not a stop), given the final parameters."""

    def traced_attention_kernel(self) -> str:
        """The attention kernel the traced train step runs (`pretrain.model.attention_kernel`)."""


class Loop:
    """Trains `program` in `workdir` (see module docstring)."""

    def __init__(self, config: Any, workdir: str | os.PathLike, program: Program):
        """Resolves and checks the config, checks and locks the workdir (process 0), then
        builds the program, places its state on the devices and compiles nothing yet
        (that happens at the first step of `run`). Use as a context manager, or call
        `close`, when not calling `run` (which closes)."""
        self.program = program
        self.config = config = program.resolve(config)
        program.validate(config)
        self.primary = jax.process_index() == 0
        self.strategy = make_strategy(config.parallelism, config.mesh)  # how the step runs: pjit or pmap
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
        config, program = self.config, self.program
        params = program.build(config, self.workdir, self.primary, self.strategy)
        step_fn, eval_fn = program.step_functions(self.strategy.axis_name)
        if config.nonfinite == "skip":
            step_fn = skip_nonfinite_updates(step_fn)
        self.state, self.abstract_state = self.strategy.place(params, program.optimizer)
        self.train_step, self.eval_step = self.strategy.compile(step_fn, eval_fn, program.frozen)
        self.checkpointer = Checkpointer(self.workdir, keep=config.keep_checkpoints, run_info=program.run_info())
        self._closing.callback(self.checkpointer.close)

    def close(self) -> None:
        """Waits for pending checkpoint saves, closes the metrics and releases the
        workdir lock and the signal handlers. Idempotent; `run` calls it when it ends."""
        self._closing.close()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def evaluate(self) -> dict[str, float]:
        """The program's evaluation of the current parameters."""
        params = self.strategy.unreplicate(self.state["params"])
        return self.program.evaluate(
            lambda batch: jax.device_get(self.eval_step(params, self.strategy.put_eval_batch(batch))))

    # -- the console ------------------------------------------------------------------

    def _describe(self, start: int) -> str:
        """The run's effective settings, printed once at start."""
        lines = [
            *self.program.describe(start, self.workdir),
            ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} "
                        f"process(es); {self.strategy.describe()}"),
            ("MFU peak", f"{self.peak:.3g} FLOP/s per device ({self.peak_source})"),
        ]
        width = max(len(name) for name, _ in lines)
        return "\n".join(f"{name + ':':<{width + 1}} {text}" for name, text in lines)

    def _check_finite(self, step: int, metrics: dict) -> None:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if np.isfinite(loss) and np.isfinite(grad_norm):
            return
        per_group = summarize(jax.device_get(metrics), self.program.names)
        bad = [k.split("/", 1)[1] for k, v in per_group.items() if k.startswith("loss/") and not np.isfinite(v)]
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
            **summarize(metrics, self.program.names),
            "learning_rate": self.program.learning_rate(step - 1),
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * self.program.flops_per_token / (jax.device_count() * self.peak),
            "attention_kernel": self.attention_kernel,
            **({"skipped_steps": skipped} if skipping else {}),
            **(extra or {}),
        }
        self.metrics.write(step, values)
        if self.primary:
            eta = (self.config.total_steps - step) * (now - started) / max(steps, 1)
            groups = " ".join(f"{k[5:]}={v:.3f}" for k, v in values.items() if k.startswith("loss/"))
            print(f"step {step}/{self.config.total_steps} loss {values['loss']:.4f} [{groups}] "
                  f"{tokens_per_sec:,.0f} tok/s mfu {values['mfu']:.2%} eta {eta / 60:.1f} min"
                  + (f" skipped {skipped}" if skipped else ""), flush=True)
            if extra:
                self.program.print_evaluation(step, values)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Trains to `config.total_steps`, or until SIGTERM or Ctrl-C (which save the
        step that is running); returns the final step. Closes the trainer when it
        ends, however it ends."""
        stop = StopRequest()
        self._closing.callback(stop.close)
        iterator = iter(self.program.train_data)
        try:
            return self._run(iterator, stop)
        finally:
            self.close()

    def _restore(self, iterator: Any) -> int:
        """Restores the newest good checkpoint, if any (written in either layer layout,
        `config.model.scan_layers`); returns its step (0: none)."""
        restored = self.checkpointer.restore(self.abstract_state, alternatives=layout_alternatives(
            self.abstract_state, self.strategy.layer_axis))
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
        """What follows the last step (not a stop): the program's ending."""
        self.program.finish(step, self.strategy.unreplicate(self.state["params"]), self.workdir, self.primary)

    def _record_attention_kernel(self) -> None:
        """Keeps the kernel the train step runs for every metrics row (`attention_kernel`)
        and says it once: a flash run that fell back to the chunked XLA path says so."""
        kernel = self.attention_kernel = self.program.traced_attention_kernel()
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
            return self.strategy.put_batch(host_batch), int((host_batch["segment_ids"] > 0).sum()) * jax.process_count()

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
            metrics = self.strategy.unreplicate(metrics)
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
