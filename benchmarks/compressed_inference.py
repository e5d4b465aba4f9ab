"""Inference speed and size of a body compressed each way, side by side in one run.

    python benchmarks/compressed_inference.py [--size=small] [--batch_size=16] [--seq_len=128] [--rounds=7] [--steps=4]

One body of `--size` (random weights: speed and size do not depend on the values) on real
packed MLM batches of the default pipeline, and its variants:

  float32       the body as trained;
  int8_weights  its weights int8 with a scale per output channel, dequantized once at load
                (`pretrain.quantization.quantized_model`): the float matmuls of weight-only
                inference on a backend without int8 kernels;
  int8          also the blocks' matmul inputs quantized per token at run time;
  pruned        half the attention heads of every layer removed from the parameters
                (`model.heads_per_layer`; which heads does not change the speed);
  distilled     half the layers (`pretrain.distill`'s default student).

Each is timed in alternating rounds (`harness.alternate`); the table gives parameters,
bytes on disk (safetensors: int8 values and float32 scales, or float32), the median
forward-pass tokens/s and the median per-round ratio to float32. Run it on a quiet
machine: no tests or helpers at the same time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import jax
from flax import nnx

import harness
from pretrain.hf.models import flat_params
from pretrain.model import create_model, preset
from pretrain.quantization import quantized_model, save_quantized


def variants(size: str, vocab_size: int) -> dict[str, tuple[nnx.Module, str | None]]:
    """name -> (model, how its parameters are stored: None float32, else the int8 scheme)."""
    base = create_model(preset(size, vocab_size=vocab_size), seed=0)
    config = base.config
    half_heads = tuple(max(1, config.num_heads // 2) for _ in range(config.num_layers))
    return {
        "float32": (base, None),
        "int8_weights": (quantized_model(base, "int8_weights"), "int8_weights"),
        "int8": (quantized_model(base, "int8"), "int8"),
        "pruned": (create_model(dataclasses.replace(config, heads_per_layer=half_heads), seed=0), None),
        "distilled": (create_model(dataclasses.replace(config, num_layers=max(1, config.num_layers // 2)), seed=0),
                      None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="model preset: tiny, small, base, large")
    harness.add_shape_flags(parser)
    args = parser.parse_args()
    kept = harness.apply_host_memory(args)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        batches, _, vocab_size = harness.pipeline_batches("mlm", args, workdir, args.steps)
        models = variants(args.size, vocab_size)
        forwards, sizes = {}, {}
        for name, (model, stored) in models.items():
            flat = flat_params(model)
            sizes[name] = (sum(v.size for v in flat.values()),
                           save_quantized(flat, os.path.join(scratch, f"{name}.safetensors"), stored))
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            forward = jax.jit(lambda p, b, g=graphdef, r=rest: nnx.merge(g, p, r)(b))
            placed = [{k: jax.numpy.asarray(v) for k, v in b.items()} for b in batches]
            jax.block_until_ready(forward(params, placed[0]))  # compiled before timing

            def run(steps: int, forward=forward, params=params, placed=placed) -> int:
                for index in range(steps):
                    jax.block_until_ready(forward(params, placed[index % len(placed)]))
                return sum(harness.real_tokens(b) for b in batches[:steps])

            forwards[name] = run
        rounds = harness.alternate(forwards, args.rounds, args.steps)
    rates = {name: harness.throughput(result) for name, result in rounds.items()}
    print(f"# compression: {args.size}, batch {args.batch_size} x {args.seq_len}, {args.rounds} rounds of "
          f"{args.steps} forward passes; {harness.machine(kept)}")
    print("| variant | parameters | bytes on disk | bytes vs float32 | tokens/s (median) | speed vs float32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        parameters, stored = sizes[name]
        median = sorted(rates[name])[len(rates[name]) // 2]
        print(f"| {name} | {parameters:,} | {stored:,} | {sizes['float32'][1] / stored:.2f}x smaller | "
              f"{median:,.0f} | {harness.median_ratio(rates[name], rates['float32']):.2f}x |")


if __name__ == "__main__":
    main()
