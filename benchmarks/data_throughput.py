"""Input-pipeline throughput and packing efficiency per objective.

    python benchmarks/data_throughput.py [--batches=50] [--seq_len=128] [--batch_size=32]

Builds the default pipeline (pydocs source, SentencePiece tokenizer trained once
into a temporary workdir, `small` config) for each objective and times how fast
this host produces packed batches: real (non-pad) tokens per second, and the
fraction of row slots holding real tokens. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from configs.pretrain import get_config
from pretrain import input_pipeline

OBJECTIVES = ("mlm", "clm", "mass", "unilm", "mlm:1,clm:1,mass:1,unilm:1")


def build_pipeline(objective: str, workdir: str, args: argparse.Namespace, *, process_count: int = 1,
                   **data_fields: Any) -> input_pipeline.InputPipeline:
    """The default pipeline (pydocs, `small` config) for `objective` with the
    shape in `args` (`seq_len`, `batch_size`, `vocab_size`) and `config.data`
    fields changed by `data_fields`, as process 0 of `process_count` builds it;
    the tokenizer is trained into `workdir` on first use and reused after."""
    config = get_config(f"objective={objective},size=small")
    config.seq_len, config.batch_size = args.seq_len, args.batch_size
    config.tokenizer.vocab_size = args.vocab_size
    for field, value in data_fields.items():
        config.data[field] = value
    return input_pipeline.build_input_pipeline(config, workdir, process_count=process_count)


def timed_batches(iterator: Iterator[dict], batches: int) -> tuple[int, float]:
    """(real tokens, seconds) of the next `batches` batches of `iterator`."""
    start = time.perf_counter()
    real = 0
    for _ in range(batches):
        real += int((next(iterator)["segment_ids"] > 0).sum())
    return real, time.perf_counter() - start


def measure(objective: str, workdir: str, args: argparse.Namespace) -> dict:
    """Pipeline tokens/s and packing of `objective` over `args.batches` batches."""
    iterator = iter(build_pipeline(objective, workdir, args).train)
    for _ in range(args.warmup):
        next(iterator)
    start_stats = dict(iterator.get_state()["stats"])
    real, seconds = timed_batches(iterator, args.batches)
    stats = iterator.get_state()["stats"]
    rows = stats["rows"] - start_stats["rows"]
    return {
        "objective": objective,
        "tokens_per_sec": real / seconds,
        "batches_per_sec": args.batches / seconds,
        "packing_efficiency": (stats["real_tokens"] - start_stats["real_tokens"]) / (rows * args.seq_len),
        "dropped_tokens": stats["dropped_tokens"],
        "examples_per_row": (stats["examples"] - start_stats["examples"]) / rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as workdir:
        results = [measure(objective, workdir, args) for objective in OBJECTIVES]
    print(f"seq_len={args.seq_len} batch={args.batch_size} vocab={args.vocab_size}, {args.batches} batches each")
    print(f"{'objective':<28} {'tokens/s':>10} {'batches/s':>10} {'packing':>8} {'ex/row':>7} {'dropped':>8}")
    for r in results:
        print(f"{r['objective']:<28} {r['tokens_per_sec']:>10,.0f} {r['batches_per_sec']:>10.1f} "
              f"{r['packing_efficiency']:>8.2%} {r['examples_per_row']:>7.2f} {r['dropped_tokens']:>8}")
    print(json.dumps({"seq_len": args.seq_len, "batch_size": args.batch_size, "results": results}))


if __name__ == "__main__":
    main()
