"""Compile time and memory of the training step: the loop of blocks against the scan over
stacked layers (`config.model.scan_layers`), under each rematerialisation policy
(`config.model.remat`).

    python benchmarks/scan_memory.py [--sizes=base,large] [--seq_lens=512,2048] \
        [--layouts=loop,scan] [--remats=none,full,dots] [--batch_size=8] [--devices=8] [--mesh=-1,1,1]

    python benchmarks/scan_memory.py --sizes=tiny --seq_lens=128   # a smoke run: seconds

On `--devices` simulated CPU devices (set before JAX starts its backend), for every size,
sequence length, layout and policy, it builds the pjit training step as
`pretrain.train.Trainer` does (the resolved config of `configs/pretrain.py` for
`--objective`: its loss terms and their heads, AdamW; `pretrain.train_step.make_train_step`, the state's shardings from
`pretrain.sharding.train_state_shardings` on the `--mesh` (data, fsdp, tensor), the
batch split over data and fsdp, the state donated), lowers it with abstract inputs
(`jax.ShapeDtypeStruct`s carrying their shardings, so no parameter or batch is ever
allocated) and compiles it. It prints one markdown row per step: seconds to trace and
lower, seconds to compile, and `compiled.memory_analysis()` of the partitioned program,
which is per device: temporaries (activations kept for the backward pass and the
step's other buffers), arguments (the state and the batch) and outputs.

A sequence longer than a preset's position table (512 for base and large) grows the
table to the sequence length; nothing else about the shape changes. The vocabulary is
`--vocab_size` (the default tokenizer's 8,000). Compiling base and large on the CPU takes
minutes and several GB of host memory per row: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import objectives
from configs.pretrain import get_config
from pretrain import sharding
from pretrain.attention import choose_attention
from pretrain.model import TransformerConfig, create_model
from pretrain.optimizer import make_optimizer
from pretrain.packing import pack_row
from pretrain.resolve import resolve_config
from pretrain.train_step import make_train_step

LAYOUTS = {"loop": False, "scan": True}


@dataclasses.dataclass(frozen=True)
class Row:
    """One compiled step: what it is and what it cost (bytes per device)."""

    size: str
    seq_len: int
    layout: str
    remat: str
    parameters: int
    lower_seconds: float
    compile_seconds: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="base,large", help="model presets (pretrain.model.PRESETS)")
    parser.add_argument("--seq_lens", default="512,2048", help="tokens per packed row")
    parser.add_argument("--layouts", default="loop,scan", help="loop (a list of blocks), scan (stacked, one scan)")
    parser.add_argument("--remats", default="none,full,dots", help="config.model.remat policies")
    parser.add_argument("--objective", default="mlm", help="the objective whose loss the step takes")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch in packed rows")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (data=-1: the rest)")
    return parser.parse_args(argv)


def compile_step(size: str, seq_len: int, scan: bool, remat: str, args: argparse.Namespace,
                 mesh: jax.sharding.Mesh) -> Row:
    """Lowers and compiles the pjit training step of one configuration from abstract inputs."""
    config = resolve_config(get_config(f"objective={args.objective},size={size}"))  # with the terms' heads
    mixture = objectives.build_mixture(config.objective, objectives.Vocabulary(args.vocab_size),
                                       config.objectives.to_dict())
    attention, _ = choose_attention(config.model.attention, mixture.attention_kinds)
    model_config = TransformerConfig(**{**config.model, "attention": attention, "scan_layers": scan, "remat": remat,
                                        "max_positions": max(config.model.max_positions, seq_len)},
                                     vocab_size=args.vocab_size)
    optimizer = make_optimizer(total_steps=config.total_steps, **config.optimizer)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: create_model(model_config, seed=config.seed)),
                                       nnx.Param, ...)
    rest = jax.tree.map(_concrete, rest)  # the dropout streams' keys and counts: the step closes over them
    step = make_train_step(graphdef, rest, optimizer, len(mixture.names), config.accumulation_steps,
                           terms=mixture.loss_terms)
    shardings = sharding.train_state_shardings(params, optimizer, mesh)
    initial = lambda p: {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32)}  # noqa: E731
    state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                         jax.eval_shape(initial, params), shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((args.batch_size, seq_len), row.dtype, sharding=batch_sharding)
             for name, row in pack_row([], seq_len, mixture.term_fields).items()}
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    started = time.perf_counter()
    lowered = jitted.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    return Row(size, seq_len, "scan" if scan else "loop", remat, parameter_count_of(params),
               lowered_at - started, compiled_at - lowered_at, memory.temp_size_in_bytes,
               memory.argument_size_in_bytes, memory.output_size_in_bytes)


def parameter_count_of(params: nnx.State) -> int:
    """Parameters of an abstract state (`pretrain.model.parameter_count` counts a model's)."""
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def _concrete(leaf: jax.ShapeDtypeStruct) -> jax.Array:
    """A small array of this shape: zero counts, or keys of seed 0."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
    return jnp.zeros(leaf.shape, leaf.dtype)


def mib(count: int) -> str:
    return f"{count / 2**20:,.1f}"


def table(rows: Sequence[Row], devices: int, mesh: jax.sharding.Mesh) -> str:
    """The rows as a markdown table (memory in MiB per device)."""
    shape = dict(mesh.shape)
    lines = [f"Training step, {devices} simulated CPU devices, mesh data={shape['data']} fsdp={shape['fsdp']} "
             f"tensor={shape['tensor']}; memory per device (MiB, `compiled.memory_analysis()`)", "",
             "| size | seq_len | layers | remat | parameters | lower s | compile s | temp | arguments | outputs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.size} | {row.seq_len} | {row.layout} | {row.remat} | {row.parameters:,} | "
                     f"{row.lower_seconds:.1f} | {row.compile_seconds:.1f} | {mib(row.temp_bytes)} | "
                     f"{mib(row.argument_bytes)} | {mib(row.output_bytes)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
    jax.config.update("jax_platforms", "cpu")
    data, fsdp, tensor = (int(size) for size in args.mesh.split(","))
    mesh = sharding.make_mesh(data, fsdp, tensor)
    rows = []
    for size in args.sizes.split(","):
        for seq_len in (int(n) for n in args.seq_lens.split(",")):
            for layout in args.layouts.split(","):
                for remat in args.remats.split(","):
                    row = compile_step(size, seq_len, LAYOUTS[layout], remat, args, mesh)
                    print(f"{size} {seq_len} {layout} {remat}: lower {row.lower_seconds:.1f} s, compile "
                          f"{row.compile_seconds:.1f} s, temp {mib(row.temp_bytes)} MiB", flush=True)
                    rows.append(row)
    print()
    print(table(rows, args.devices, mesh))


if __name__ == "__main__":
    main()
