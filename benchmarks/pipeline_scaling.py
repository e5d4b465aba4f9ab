"""How far the sharded input pipeline scales: one host's throughput against the host count.

    python benchmarks/pipeline_scaling.py [--objective=mlm] [--shards=256] [--rows_per_shard=1]
        [--seq_len=512] [--batches=100] [--num_threads=0]      # about a minute on 2 cores

The default pipeline (pydocs, its SentencePiece tokenizer trained once into a
temporary workdir; `benchmarks/data_throughput.py` builds both) with
`config.data.shards` virtual shards and a global batch of shards x rows_per_shard
rows, built as host 0 of H simulated hosts for H = 1, 2, 4, ... up to the shard
count. Host 0 reads, tokenizes and packs only its shards/H shards, so its work per
global batch falls as 1/H. For each H it reads one untimed batch (the packers fill
their open rows), then times `--batches` batches: real (non-pad) tokens/s of this
host, and the global rate that H such hosts sustain (x H). Examples are made in the
calling thread by default (`--num_threads=0`), so a timing window holds exactly the
work of its batches; with threads, up to 64 documents made ahead blur short windows.
Prints a table, the largest sustained global rate, and one JSON line. (More hosts
than shards would not help: each host would still run a whole shard.)

Pod arithmetic (`--accelerator`, `--chips_per_host`, `--sizes`, `--mfu`): what one host
must feed, chips_per_host x the model's tokens/s per chip, against what one pipeline
thread of this host gives. A chip's tokens/s is MFU x the accelerator's bfloat16 dense
peak (`pretrain.metrics.KNOWN_PEAKS`) / the model's training FLOPs per token
(`pretrain.metrics.flops_per_token` at --seq_len); the MFU is an input (measure it
with benchmarks/accelerator.sh), not a measurement of this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

import jax

import data_throughput
from pretrain.metrics import KNOWN_PEAKS, flops_per_token
from pretrain.model import create_model, non_embedding_parameter_count, preset


def host_counts(shards: int) -> list[int]:
    """1, 2, 4, ... up to `shards` (and `shards` itself when it is no power of two)."""
    counts = [1]
    while counts[-1] * 2 <= shards:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == shards else [*counts, shards]


def measure_host(hosts: int, workdir: str, args: argparse.Namespace) -> dict:
    """Host 0's real tokens/s among `hosts` hosts, and what all of them sustain."""
    pipeline = data_throughput.build_pipeline(args.objective, workdir, args, process_count=hosts,
                                              shards=args.shards, num_threads=args.num_threads)
    iterator = iter(pipeline.train)
    next(iterator)  # warm-up: every shard's packer fills its open rows
    real, seconds = data_throughput.timed_batches(iterator, args.batches)
    host = real / seconds
    return {"hosts": hosts, "shards_per_host": max(1, args.shards // hosts), "host_rows": args.batch_size // hosts,
            "host_tokens_per_sec": host, "global_tokens_per_sec": host * hosts, "seconds": seconds}


def chip_tokens_per_sec(size: str, seq_len: int, vocab_size: int, mfu: float, accelerator: str) -> float:
    """tokens/s of one chip training preset `size` at `mfu` of `accelerator`'s peak."""
    config = preset(size, vocab_size=vocab_size, max_positions=max(512, seq_len))
    model = jax.eval_shape(lambda: create_model(config))
    flops = flops_per_token(non_embedding_parameter_count(model), config.num_layers, config.model_dim, seq_len)
    return mfu * KNOWN_PEAKS[accelerator] / flops


def pod_arithmetic(args: argparse.Namespace, host_tokens_per_sec: float) -> list[str]:
    """Per size: chip and host demand against this host's pipeline rate."""
    lines = [f"pod arithmetic: {args.chips_per_host} x {args.accelerator} per host at an assumed MFU of "
             f"{args.mfu:.0%}; one pipeline thread of this host: {host_tokens_per_sec:,.0f} tokens/s"]
    for size in args.sizes.split(","):
        chip = chip_tokens_per_sec(size, args.seq_len, args.vocab_size, args.mfu, args.accelerator)
        host = chip * args.chips_per_host
        lines.append(f"  {size:<6} {chip:>12,.0f} tokens/s per chip, {host:>13,.0f} per host: "
                     f"{host / host_tokens_per_sec:.1f} pipeline threads' worth, whatever the host count")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="mlm", help="objective spec, as config.objective")
    parser.add_argument("--shards", type=int, default=256, help="config.data.shards; hosts go up to it")
    parser.add_argument("--rows_per_shard", type=int, default=1, help="global batch = shards x rows_per_shard")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per host count")
    parser.add_argument("--num_threads", type=int, default=0, help="config.data.num_threads")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--accelerator", default="NVIDIA H200", choices=sorted(KNOWN_PEAKS),
                        help="pod arithmetic: the chip (its bfloat16 dense peak)")
    parser.add_argument("--chips_per_host", type=int, default=8, help="pod arithmetic: chips one host feeds")
    parser.add_argument("--sizes", default="base,large", help="pod arithmetic: model presets")
    parser.add_argument("--mfu", type=float, default=0.4, help="pod arithmetic: the assumed MFU of a chip")
    args = parser.parse_args()
    args.batch_size = args.shards * args.rows_per_shard
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as workdir:
        results = [measure_host(hosts, workdir, args) for hosts in host_counts(args.shards)]
    print(f"objective={args.objective} shards={args.shards} global batch={args.batch_size} x seq_len "
          f"{args.seq_len}, {args.batches} timed batches per host count, num_threads={args.num_threads}")
    print(f"{'hosts':>6} {'shards/host':>11} {'rows/host':>9} {'host tokens/s':>14} {'global tokens/s':>16}")
    for r in results:
        print(f"{r['hosts']:>6} {r['shards_per_host']:>11} {r['host_rows']:>9} {r['host_tokens_per_sec']:>14,.0f} "
              f"{r['global_tokens_per_sec']:>16,.0f}")
    best = max(results, key=lambda r: r["global_tokens_per_sec"])
    print(f"largest sustained global consumption: {best['global_tokens_per_sec']:,.0f} tokens/s "
          f"({best['hosts']} hosts x {best['host_tokens_per_sec']:,.0f})")
    slowest = min(r["host_tokens_per_sec"] for r in results)
    print("\n".join(pod_arithmetic(args, slowest)))
    print(json.dumps({"objective": args.objective, "shards": args.shards, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "results": results}))


if __name__ == "__main__":
    main()
