"""Where the training step's time goes: forward vs backward, and an op profile.

    python benchmarks/profile_step.py [--objective=mlm] [--size=small] [--rounds=7]
        [--chunk_tokens=N] [--host_memory=kept|default]

Part 1 times, alternately in rounds: the stack's forward pass, its forward and
backward pass (also with two baselines swapped in while it compiles: attention
through `jax.nn.dot_product_attention`, and `layers.dense` with plain autodiff),
the whole training step, the same step with the loss taken from full [B, L, V]
logits (`pretrain.loss.full_logits_statistics`, the loss without the chunked
head), and the float32 matmul peak; then the step's page faults and the share
of its CPU time spent in the kernel (what --host_memory=kept removes).

Part 2 traces a few steps with `jax.profiler` and sums the time of every XLA
operation by kind (matmuls, transposes and copies, other element-wise and
reduction work) and by phase (forward, backward, the loss head's chunk loop,
the optimizer update), read from the compiled HLO's op names.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import re
import resource
import statistics
import tempfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

import harness
from pretrain import layers
from pretrain.loss import full_logits_statistics, weighted_token_statistics
from pretrain.model import PRESETS, TransformerConfig, preset


def _library_attend(self: layers.Attention, q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array) -> jax.Array:
    """`Attention.attend` through `jax.nn.dot_product_attention` (the baseline)."""
    dtype = self.config.compute_dtype
    context = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return jnp.einsum("blhk,hkd->bld", context, self.out_kernel[...].astype(dtype)) + self.out_bias[...].astype(dtype)


def _autodiff_dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`layers.dense` without its custom backward pass (the baseline)."""
    return jnp.tensordot(x, kernel, axes=1)


@contextlib.contextmanager
def _swapped(owner: object, name: str, value: object) -> Iterator[None]:
    """Temporarily replaces owner.name (while a baseline is traced and compiled)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def timed_parts(ours: harness.OurStep, config: TransformerConfig, num_objectives: int,
                args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds of each part (see module docstring), measured alternately."""
    params = jax.tree.map(jnp.copy, ours.state["params"])  # the step donates its own
    batch = ours.batches[0]
    stack = lambda p: nnx.merge(ours.graphdef, p, ours.rest)(batch).sum()
    forward = jax.jit(stack).lower(params).compile()
    backward = jax.jit(jax.grad(stack)).lower(params).compile()
    with _swapped(layers.Attention, "attend", _library_attend):
        library_attention = jax.jit(jax.grad(stack)).lower(params).compile()
    with _swapped(layers, "dense", _autodiff_dense):
        autodiff_dense = jax.jit(jax.grad(stack)).lower(params).compile()
    full = harness.OurStep(config, num_objectives, jax.device_get(ours.batches), statistics=full_logits_statistics)
    peak = harness.MatmulPeak()

    def repeat(function):
        def run(steps: int) -> int:
            for _ in range(steps):
                jax.block_until_ready(function(params))
            return 0
        return run

    rounds = harness.alternate({"stack forward": repeat(forward), "stack forward+backward": repeat(backward),
                                "  with dot_product_attention": repeat(library_attention),
                                "  with autodiff dense": repeat(autodiff_dense),
                                "training step": ours.run, "step, full-logits loss": full.run,
                                "matmul peak": peak.run}, args.rounds, args.steps)
    parts = {name: 1e3 * harness.step_seconds(r, args.steps) for name, r in rounds.items() if name != "matmul peak"}
    parts["matmul peak GFLOP/s"] = statistics.median(peak.flops_per_sec) / 1e9
    return parts


def kernel_share(ours: harness.OurStep, steps: int = 5) -> tuple[float, float, float]:
    """(minor page faults, kernel CPU seconds, all CPU seconds) per training step:
    what glibc's default allocator costs (compare --host_memory=kept and default)."""
    ours.run(1)
    before = resource.getrusage(resource.RUSAGE_SELF)
    ours.run(steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    kernel = (after.ru_stime - before.ru_stime) / steps
    return (after.ru_minflt - before.ru_minflt) / steps, kernel, kernel + (after.ru_utime - before.ru_utime) / steps


def _instructions(hlo: str) -> dict[str, tuple[bool, str]]:
    """Top-level instruction name -> (contains a dot, op_name metadata)."""
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    has_dot = {name: any(" dot(" in line for line in lines) for name, lines in computations.items()}
    result = {}
    for lines in computations.values():
        for line in lines:
            match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
            if not match:
                continue
            called = re.search(r"calls=%([\w.\-]+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            result[match.group(1)] = (" dot(" in line or bool(called and has_dot.get(called.group(1))),
                                      op_name.group(1) if op_name else "")
    return result


def op_profile(ours: harness.OurStep, steps: int = 3) -> dict[tuple[str, str], float]:
    """Milliseconds per step by (phase, kind), from a profiler trace."""
    from jax.profiler import ProfileData

    instructions = _instructions(ours.step.lower(ours.state, ours.batches[0]).compile().as_text())
    ours.run(1)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            ours.run(steps)
        profile = ProfileData.from_file(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0])
    totals: dict[tuple[str, str], float] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                name = event.name
                if name not in instructions and not name.startswith("while"):
                    continue
                has_dot, op_name = instructions.get(name, (False, "/while/"))
                if "/while/" in op_name or name.startswith("while"):
                    phase = "loss head (chunk loop)"
                elif "transpose(jvp" in op_name:
                    phase = "backward"
                elif "jvp(" in op_name:
                    phase = "forward"
                else:
                    phase = "optimizer update"
                kind = ("matmul" if has_dot else "transpose/copy" if re.match(r"(copy|transpose)", name)
                        else "element-wise/reduction")
                totals[(phase, kind)] += event.duration_ns / 1e6 / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="mlm")
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batches", type=int, default=2, help="distinct batches cycled through")
    parser.add_argument("--chunk_tokens", type=int, default=0,
                        help="the loss head's chunk (weighted_token_statistics); 0: its default")
    harness.add_shape_flags(parser)
    args = parser.parse_args()
    args.host_memory_kept = harness.apply_host_memory(args)
    with tempfile.TemporaryDirectory() as temporary:
        batches, names, vocab_size = harness.pipeline_batches(args.objective, args, args.workdir or temporary,
                                                              args.batches)
    config = preset(args.size, vocab_size=vocab_size)
    statistics_fn = weighted_token_statistics
    if args.chunk_tokens:
        statistics_fn = functools.partial(weighted_token_statistics, chunk_tokens=args.chunk_tokens)
    ours = harness.OurStep(config, len(names), batches, statistics=statistics_fn)
    load_before = harness.load_average()
    parts = timed_parts(ours, config, len(names), args)
    faults, kernel_seconds, cpu_seconds = kernel_share(ours)
    profile = op_profile(ours)
    print(f"{harness.machine(args.host_memory_kept)}; {args.objective}, {args.size}, "
          f"batch {args.batch_size} x seq {args.seq_len}; "
          f"1-min load average {load_before:.1f} -> {harness.load_average():.1f}")
    print(f"\n{'part':<28} {'ms':>8}")
    for name, value in parts.items():
        print(f"{name:<28} {value:>8.1f}")
    forward = parts["stack forward"]
    print(f"stack backward / forward: {(parts['stack forward+backward'] - forward) / forward:.2f}")
    print(f"training step: {faults:,.0f} page faults, {kernel_seconds / cpu_seconds:.0%} of its CPU time "
          f"in the kernel")
    total = sum(profile.values())
    print(f"\nop time per step (summed over threads): {total:.0f} ms")
    print(f"{'phase':<24} {'kind':<24} {'ms':>8} {'share':>7}")
    for (phase, kind), value in sorted(profile.items(), key=lambda item: -item[1]):
        print(f"{phase:<24} {kind:<24} {value:>8.1f} {value / total:>7.1%}")


if __name__ == "__main__":
    main()
