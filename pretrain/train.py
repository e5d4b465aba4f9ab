"""Pretraining entry point: one command trains, and the same command resumes.

Pretraining is a program (`PretrainingProgram`) of the training loop (`pretrain.loop`),
which owns everything below that is not about objectives.

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

import dataclasses
import hashlib
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx

from pretrain import cli, distributed
from pretrain.attention import choose_attention
from pretrain.baseline import unigram_baseline
from pretrain.config_checks import validate_config
from pretrain.generate import demonstrate
from pretrain.host_memory import keep_freed_memory
from pretrain.input_pipeline import build_input_pipeline
from pretrain.loop import Loop, summarize
from pretrain.metrics import flops_per_token
from pretrain.model import TransformerConfig, attention_kernel, create_model, preset_name
from pretrain.optimizer import learning_rate_schedule, make_optimizer
from pretrain.peers import PeerWatch
from pretrain.resolve import resolve_config
from pretrain.train_step import initial_state, make_eval_step, make_train_step
from pretrain.workdir import check_free_space, checkpoint_bytes

log = logging.getLogger("pretrain.train")


class PretrainingProgram:
    """Pretraining as a program of the loop (`pretrain.loop.Program`): the objectives'
    input pipeline, the Transformer with the heads its loss terms train, AdamW, and
    the held-out loss per objective next to the unigram baseline."""

    frozen = None  # nothing the step reads is held fixed (`pretrain.loop.Program.frozen`)
    reported_terms: tuple[str, ...] = ()  # statistics groups an evaluation shows besides the loss terms'

    def resolve(self, config: Any) -> Any:
        """The config this run trains with (`pretrain.resolve.resolve_config`): a new
        one, the given one untouched."""
        return resolve_config(config)

    def validate(self, config: Any) -> None:
        """Raises ValueError naming every problem of the resolved config; it changes nothing."""
        if config.get("distill"):
            raise ValueError("invalid config:\n  config.distill is set, which is a distilled run's record of its "
                             "teacher; pretrain.train trains without one: distil with pretrain.distill "
                             "(configs/distill.py), or leave config.distill empty")
        validate_config(config, jax.device_count())

    def build(self, config: Any, workdir: str, primary: bool, strategy: Any) -> nnx.State:
        """The input pipeline, the model (fresh, or from `config.init.hf`) and the
        optimizer; returns the model's parameters."""
        self.config = config
        self.pipeline = build_input_pipeline(config, workdir, process_index=jax.process_index(),
                                             process_count=jax.process_count())
        self.train_data = self.pipeline.train
        self.names = self.pipeline.mixture.names
        attention, fallback = choose_attention(config.model.attention, self.pipeline.mixture.attention_kinds)
        if fallback and primary:
            log.warning(fallback)
        self.model_config = TransformerConfig(**{**config.model, "attention": attention},
                                              vocab_size=self.pipeline.tokenizer.vocab_size)
        self.optimizer = make_optimizer(total_steps=config.total_steps, **config.optimizer)
        if primary:  # before the model exists: shapes only
            abstract = nnx.state(nnx.eval_shape(lambda: create_model(self.model_config, seed=config.seed)),
                                 nnx.Param)
            state = jax.eval_shape(lambda p: initial_state(self.optimizer, p), abstract)
            check_free_space(workdir, strategy.state_copies * checkpoint_bytes(state))
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
        self._baseline: dict[str, float] | None = None  # the unigram baseline, computed at the first evaluation
        return params

    def run_info(self) -> dict[str, Any]:
        """What each checkpoint records about the run that wrote it; on resume, a
        different array layout or tokenizer is an error, other changes a warning."""
        with open(self.pipeline.tokenizer.path, "rb") as handle:
            tokenizer_sha256 = hashlib.sha256(handle.read()).hexdigest()
        fields = ("objective", "seq_len", "batch_size", "total_steps", "seed", "parallelism")
        return {"model": dataclasses.asdict(self.model_config), "optimizer": self.config.optimizer.to_dict(),
                "tokenizer_sha256": tokenizer_sha256, **{name: self.config[name] for name in fields}}

    def learning_rate(self, step: int) -> float:
        o = self.config.optimizer
        return float(learning_rate_schedule(o.learning_rate, o.warmup_steps, self.config.total_steps,
                                            o.schedule, o.end_factor)(step))

    def step_functions(self, axis_name: str | None) -> tuple[Callable, Callable]:
        """(train step, evaluation step) before compilation: the pretraining loss's."""
        terms = self.pipeline.mixture.loss_terms
        step_fn = make_train_step(self.graphdef, self.rest, self.optimizer, len(self.names),
                                  self.config.accumulation_steps, axis_name=axis_name, terms=terms)
        return step_fn, make_eval_step(self.graphdef, self.rest, len(self.names), terms)

    def traced_attention_kernel(self) -> str:
        return attention_kernel(self.model_config)

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self, score: Callable) -> dict[str, float]:
        """Held-out loss and accuracy per trained objective (and per loss term), with the
        unigram baseline of each (`pretrain.baseline`; computed once, from the start of
        the training stream)."""
        batches = self.pipeline.eval_batches()
        totals = None
        for batch in batches:
            stats = score(batch)
            totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
        out = summarize(totals, self.names, prefix="eval/")
        if totals["weight_sum"].sum() > 0:  # objectives that predict tokens through the body (ELECTRA's does not)
            out["eval/loss"] = float(totals["loss_sum"].sum() / totals["weight_sum"].sum())
            out["eval/accuracy"] = float(totals["correct_sum"].sum() / totals["weight_sum"].sum())
        if self._baseline is None:
            self._baseline = unigram_baseline(itertools.islice(iter(self.pipeline.train), 256), batches,
                                              self.names, self.pipeline.tokenizer.vocab_size)
        return {**out, **self._baseline}

    def print_evaluation(self, step: int, values: dict[str, float]) -> None:
        line = f"eval at step {step}:"
        if "eval/loss" in values:
            line += f" held-out loss {values['eval/loss']:.4f}"
            if "eval/baseline" in values:
                line += f" (unigram baseline {values['eval/baseline']:.4f})"
            line += f", accuracy {values['eval/accuracy']:.2%}"
        terms = [term.name for term in self.pipeline.mixture.loss_terms] + list(self.reported_terms)
        shown = (list(self.names) if len(self.names) > 1 or "eval/loss" not in values else []) + terms
        line += "".join(
            f"\n  {name}: loss {values[f'eval/loss/{name}']:.4f}"
            + (f" (baseline {values[f'eval/baseline/{name}']:.4f})" if f"eval/baseline/{name}" in values else "")
            + (f", accuracy {values[f'eval/accuracy/{name}']:.2%}" if f"eval/accuracy/{name}" in values else "")
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

    def finish(self, step: int, params: Any, workdir: str, primary: bool) -> None:
        """After the last step: one line of what the model now does on a held-out
        sentence (`config.sample_at_end`; single-process runs)."""
        if not (self.config.sample_at_end and primary and jax.process_count() == 1):
            return
        sentence = self._sample_sentence()
        if sentence is None:
            return
        model = nnx.merge(self.graphdef, jax.device_get(params), self.rest)
        leaves = self.pipeline.mixture.objectives
        print(f"the model now {demonstrate(model, self.pipeline.tokenizer, leaves, sentence)}", flush=True)

    # -- the console ------------------------------------------------------------------

    def describe(self, start: int, workdir: str) -> list[tuple[str, str]]:
        """The run's effective settings, printed once at start."""
        config, model = self.config, self.model_config
        o = config.optimizer
        lines = [
            ("run", f"{workdir} ({f'resuming from step {start}' if start else 'new run'})"),
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
        ]
        return lines


class Trainer(Loop):
    """The pretraining command's loop: `Loop(config, workdir, PretrainingProgram())`."""

    def __init__(self, config: Any, workdir: str | os.PathLike):
        super().__init__(config, workdir, PretrainingProgram())


def training_command(argv: Sequence[str] | None, doc: str, config_file: str, make_loop: Callable[[Any, str], Loop]
                     ) -> None:
    """A training command's `main` (pretraining, distillation): its flags (the workdir, the
    config file and overrides, multi-host), then `make_loop(config, workdir).run()` with
    bad input reported as one message and Ctrl-C as one line."""
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
    config = cli.define_config(flag_values, argv, config_file, "training config file")
    cli.parse(flag_values, argv, doc)

    def command() -> int:
        if not workdir.value:
            raise ValueError("--workdir is required: the run's directory, e.g. --workdir=runs/mlm (rerun the same "
                             "command to resume)")
        run_config = cli.config_value(config, argv)
        distributed.initialize(coordinator.value, num_processes.value, process_id.value,
                               peer_timeout=run_config.peer_timeout_seconds)
        with PeerWatch(run_config.peer_timeout_seconds):  # multi-process only; still watching if the run fails
            return make_loop(run_config, workdir.value).run()

    try:
        step = cli.run_reporting_bad_input(command)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: aborted without saving (the newest checkpoint in the workdir is intact; "
                         "rerun the command to resume from it)") from None
    print(f"stopped at step {step}; workdir {os.path.abspath(workdir.value)}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.train`: flags are defined here, not at import."""
    training_command(argv, __doc__, "configs/pretrain.py", Trainer)


if __name__ == "__main__":
    main()
