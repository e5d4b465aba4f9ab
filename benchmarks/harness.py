"""What the step benchmarks share: real batches, our training step as the loop runs
it, and a timer that alternates contenders so that they see the same machine.

The machine these numbers come from is shared (two cores, other jobs come and go),
so no absolute time is trusted on its own: every comparison is measured in rounds,
each round runs every contender once (the order flips from round to round), and
the reports take medians of per-round numbers and of per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import data_throughput
from pretrain.host_memory import keep_freed_memory
from pretrain.input_pipeline import take
from pretrain.loss import step_token_statistics
from pretrain.metrics import cpu_model_name, flops_per_token, measure_matmul_peak
from pretrain.model import TransformerConfig, create_model, non_embedding_parameter_count
from pretrain.optimizer import make_optimizer
from pretrain.train_step import make_train_step

Batch = dict[str, np.ndarray]
MIXTURE = "mlm:1,clm:1,mass:1,unilm:1"


def add_shape_flags(parser: argparse.ArgumentParser, batch_size: int = 16) -> None:
    """--batch_size, --seq_len, --vocab_size, --rounds, --steps, --workdir."""
    parser.add_argument("--batch_size", type=int, default=batch_size, help="packed rows per step")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=8000, help="SentencePiece vocabulary")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=4, help="training steps per contender per round")
    parser.add_argument("--workdir", default="", help="keeps the trained tokenizer between runs (default: temporary)")
    parser.add_argument("--host_memory", choices=("kept", "default"), default="kept",
                        help="kept: pretrain.host_memory.keep_freed_memory(), as the pretrain commands do, for the "
                             "whole process (a peer in it gets it too); default: glibc's allocator settings")


def apply_host_memory(args: argparse.Namespace) -> bool:
    """Applies --host_memory before any computation starts JAX's threads;
    returns whether freed memory is kept."""
    return args.host_memory == "kept" and keep_freed_memory()


def pipeline_batches(objective: str, args: argparse.Namespace, workdir: str, count: int
                     ) -> tuple[list[Batch], tuple[str, ...], int]:
    """`count` packed batches of `objective` from the default pipeline (pydocs),
    the mixture's leaf names and the tokenizer's vocabulary size."""
    pipeline = data_throughput.build_pipeline(objective, workdir, args)
    return take(pipeline.train, count), pipeline.mixture.names, pipeline.tokenizer.vocab_size


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Non-pad tokens of a packed batch (what tokens/s counts)."""
    return int((np.asarray(batch["segment_ids"]) > 0).sum())


class OurStep:
    """Our training step (`pretrain.train_step`, AdamW with clipping, donated state)
    on batches already on the device, dispatched back to back as the training loop
    does, with one wait at the end of a run."""

    def __init__(self, config: TransformerConfig, num_objectives: int, batches: Sequence[Batch],
                 statistics: Callable = step_token_statistics, seed: int = 0):
        model = create_model(config, seed=seed)
        seq_len = batches[0]["inputs"].shape[1]
        self.flops_per_token = flops_per_token(non_embedding_parameter_count(model), config.num_layers,
                                               config.model_dim, seq_len)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        optimizer = make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=1_000_000)
        self.state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
        self.step = jax.jit(make_train_step(self.graphdef, self.rest, optimizer, num_objectives,
                                            statistics=statistics), donate_argnums=0)
        self.batches = [jax.device_put(batch) for batch in batches]
        self.tokens = [real_tokens(batch) for batch in batches]
        self.next = 0
        self.last_loss = float("nan")
        self.run(1)  # compiles

    def run(self, steps: int) -> int:
        """Runs `steps` training steps; returns the real tokens they consumed."""
        tokens, metrics = 0, None
        for _ in range(steps):
            index = self.next % len(self.batches)
            self.state, metrics = self.step(self.state, self.batches[index])
            tokens += self.tokens[index]
            self.next += 1
        self.last_loss = float(metrics["loss"])  # waits for the last step
        if not np.isfinite(self.last_loss):
            raise FloatingPointError(f"our step produced a non-finite loss {self.last_loss}")
        return tokens


class MatmulPeak:
    """The float32 matmul peak (`pretrain.metrics.measure_matmul_peak`) as a
    contender: measured in every round, so MFU divides by the peak of the same
    moment of a shared machine."""

    def __init__(self, seconds: float = 0.3):
        self.seconds = seconds
        self.flops_per_sec: list[float] = []

    def run(self, steps: int) -> int:
        del steps
        self.flops_per_sec.append(measure_matmul_peak(seconds=self.seconds))
        return 0


def alternate(contenders: Mapping[str, Callable[[int], int]], rounds: int, steps: int,
              pause: float = 0.2) -> dict[str, list[tuple[float, int]]]:
    """(seconds, tokens) per round for each contender, run in alternation; the
    order reverses every round, and a short pause between contenders lets the
    previous one's worker threads go idle."""
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            time.sleep(pause)
            start = time.perf_counter()
            tokens = contenders[name](steps)
            results[name].append((time.perf_counter() - start, tokens))
    return results


def throughput(rounds: list[tuple[float, int]]) -> list[float]:
    """Tokens per second of each round."""
    return [tokens / seconds for seconds, tokens in rounds]


def step_seconds(rounds: list[tuple[float, int]], steps: int) -> float:
    """Median seconds per step."""
    return statistics.median(seconds / steps for seconds, _ in rounds)


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios (adjacent measurements share the machine's load)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def load_average() -> float:
    """The machine's 1-minute load average (2.0 = both cores busy)."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), with its matrix extensions: a ratio
    against PyTorch depends on them (oneDNN uses AMX where XLA CPU may not)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    name = cpu_model_name() or "unknown CPU"
    extensions = [flag for flag in ("avx512f", "avx512_bf16", "amx_tile") if flag in flags]
    return f"{name} ({', '.join(extensions) or 'no AVX-512'})"


def machine(host_memory_kept: bool) -> str:
    """One line describing where the numbers come from."""
    kind = jax.devices()[0].device_kind
    memory = "freed host memory kept" if host_memory_kept else "glibc's default allocator"
    return (f"{jax.default_backend()} ({kind}; {cpu_model()}), {os.cpu_count()} cores, jax {jax.__version__}, "
            f"{memory}")
