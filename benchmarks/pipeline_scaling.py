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
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

import data_throughput


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="mlm", help="objective spec, as config.objective")
    parser.add_argument("--shards", type=int, default=256, help="config.data.shards; hosts go up to it")
    parser.add_argument("--rows_per_shard", type=int, default=1, help="global batch = shards x rows_per_shard")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per host count")
    parser.add_argument("--num_threads", type=int, default=0, help="config.data.num_threads")
    parser.add_argument("--vocab_size", type=int, default=8000)
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
    print(json.dumps({"objective": args.objective, "shards": args.shards, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "results": results}))


if __name__ == "__main__":
    main()
