"""Training-step throughput and MFU per objective, the attention mask's overhead,
and the input pipeline against what the step consumes.

    python benchmarks/throughput.py [--sizes=small,base] [--rounds=7] [--steps=4]

For every size and objective (mlm, clm, mass, unilm and the four-way mixture) it
trains on real packed batches of the default pipeline and reports real (non-pad)
tokens/s, the step time and MFU: model FLOPs per token (6 x non-embedding
parameters + 12 x layers x model_dim x seq_len, `pretrain.metrics`) times
tokens/s over the float32 matmul peak, which this script measures itself in
every round, alternating with the steps, so both see the same machine load.

Mask overhead: the step time of a mixed batch (MLM, MASS and all four UniLM modes
packed together) over that of the same batch made plain causal (every token L2R:
same tokens, segments and loss weights, so only the mask differs).

Input pipeline: packing efficiency per objective and pipeline tokens/s
(`benchmarks/data_throughput.py`) over the `small` step's tokens/s.

Attention paths and long sequences (issue 16), instead of the tables above:

    python benchmarks/throughput.py --attention=dense,flash --dtype=float32 \
        --sizes=small --seq_lens=128,512,2048,8192 [--objectives=mlm,clm] [--loss_head=auto]

For every size, objective, sequence length and attention path: step time, tokens/s,
MFU and the step's peak device memory, with `--tokens_per_batch` tokens per batch
(rows = tokens / seq_len). Peak memory is the device's own peak where it reports one
(GPU, TPU), else XLA's buffer assignment for the compiled step (arguments, outputs and
temporaries). MFU divides by the device's bfloat16 dense peak where
`pretrain.metrics.KNOWN_PEAKS` knows it (e.g. H200), else by the float32 matmul peak
measured here. On CPU 'flash' runs tokamax's chunked XLA path: a correctness
reference, not a kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile

import jax

import numpy as np

import data_throughput
import harness
from objectives.example import L2R
from pretrain.attention import choose_attention
from pretrain.loss import full_logits_statistics, step_token_statistics, weighted_token_statistics
from pretrain.metrics import KNOWN_PEAKS
from pretrain.model import preset

OBJECTIVES = ("mlm", "clm", "mass", "unilm", harness.MIXTURE)
MASKED_MIXTURE = "mlm:1,mass:1,unilm:1"  # UniLM brings its four modes


def step_throughput(size: str, objective: str, args: argparse.Namespace, workdir: str) -> dict:
    """tokens/s, step time and MFU of one size and objective."""
    batches, names, vocab_size = harness.pipeline_batches(objective, args, workdir, args.batches)
    ours = harness.OurStep(preset(size, vocab_size=vocab_size), len(names), batches)
    peak = harness.MatmulPeak()
    rounds = harness.alternate({"step": ours.run, "peak": peak.run}, args.rounds, args.steps)
    tokens_per_sec = harness.throughput(rounds["step"])
    mfu = [tps * ours.flops_per_token / flops for tps, flops in zip(tokens_per_sec, peak.flops_per_sec)]
    return {
        "size": size, "objective": objective,
        "tokens_per_sec": statistics.median(tokens_per_sec),
        "step_ms": 1e3 * harness.step_seconds(rounds["step"], args.steps),
        "real_tokens_per_step": statistics.mean(ours.tokens),
        "model_flops_per_token": ours.flops_per_token,
        "matmul_peak_flops": statistics.median(peak.flops_per_sec),
        "mfu": statistics.median(mfu),
    }


def causal_copy(batch: harness.Batch) -> harness.Batch:
    """The batch with every token left-to-right (a plain causal mask)."""
    return {**batch, "attention_kind": np.full_like(batch["attention_kind"], int(L2R))}


def mask_overhead(args: argparse.Namespace, workdir: str) -> dict:
    """Step time of mixed-objective batches over the same batches made causal."""
    batches, names, vocab_size = harness.pipeline_batches(MASKED_MIXTURE, args, workdir, args.batches)
    config = preset("small", vocab_size=vocab_size)
    mixed = harness.OurStep(config, len(names), batches)
    causal = harness.OurStep(config, len(names), [causal_copy(batch) for batch in batches])
    rounds = harness.alternate({"mixed": mixed.run, "causal": causal.run}, args.rounds, args.steps)
    kinds = np.concatenate([batch["attention_kind"][batch["segment_ids"] > 0] for batch in batches])
    return {
        "objective": MASKED_MIXTURE,
        "mixed_step_ms": 1e3 * harness.step_seconds(rounds["mixed"], args.steps),
        "causal_step_ms": 1e3 * harness.step_seconds(rounds["causal"], args.steps),
        "overhead": harness.median_ratio([s for s, _ in rounds["mixed"]], [s for s, _ in rounds["causal"]]) - 1,
        "kind_fractions": {name: float(np.mean(kinds == value)) for value, name in enumerate(("PREFIX", "L2R", "R2L", "ENCODER_ONLY"))},
    }


def pipeline_ratios(step_results: list[dict], args: argparse.Namespace, workdir: str) -> list[dict]:
    """Packing and pipeline tokens/s per objective over the small step's tokens/s."""
    step_tps = {r["objective"]: r["tokens_per_sec"] for r in step_results if r["size"] == "small"}
    pipeline_args = argparse.Namespace(**{**vars(args), "batches": args.pipeline_batches, "warmup": 5})
    rows = []
    for objective in OBJECTIVES:
        measured = data_throughput.measure(objective, workdir, pipeline_args)
        rows.append({**measured, "step_tokens_per_sec": step_tps.get(objective, float("nan")),
                     "pipeline_over_step": measured["tokens_per_sec"] / step_tps.get(objective, float("nan"))})
    return rows


LOSS_HEADS = {"auto": step_token_statistics, "weighted": weighted_token_statistics, "full": full_logits_statistics}


def peak_memory_bytes(step: harness.OurStep) -> tuple[int, str]:
    """(bytes, how measured) of one training step's peak device memory."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    analysis = step.step.lower(step.state, step.batches[0]).compile().memory_analysis()
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
             - analysis.alias_size_in_bytes)
    return int(total), "XLA buffer assignment"


def attention_comparison(args: argparse.Namespace, workdir: str) -> list[dict]:
    """Step time, tokens/s, MFU and peak memory for every size x objective x
    sequence length x attention path (one process: the device peak of a GPU grows
    monotonically, so each path's memory is read right after its own runs, dense
    first at each length)."""
    kind = jax.devices()[0].device_kind
    known_peak = KNOWN_PEAKS.get(kind)
    rows = []
    for size in args.sizes.split(","):
        for objective in args.objectives.split(","):
            for seq_len in (int(n) for n in args.seq_lens.split(",")):
                shape = argparse.Namespace(**{**vars(args), "seq_len": seq_len,
                                              "batch_size": max(1, args.tokens_per_batch // seq_len)})
                batches, names, vocab_size = harness.pipeline_batches(objective, shape, workdir, args.batches)
                kinds = frozenset(int(k) for batch in batches
                                  for k in np.unique(batch["attention_kind"][batch["segment_ids"] > 0]))
                for requested in args.attention.split(","):
                    attention, fallback = choose_attention(requested, kinds)  # as the trainer decides
                    config = dataclasses.replace(preset(size, vocab_size=vocab_size), max_positions=max(512, seq_len),
                                                 attention=attention, dtype=args.dtype)
                    step = harness.OurStep(config, len(names), batches, statistics=LOSS_HEADS[args.loss_head])
                    peak = harness.MatmulPeak()
                    contenders = {"step": step.run} if known_peak else {"step": step.run, "peak": peak.run}
                    rounds = harness.alternate(contenders, args.rounds, args.steps)
                    tokens_per_sec = statistics.median(harness.throughput(rounds["step"]))
                    device_peak = known_peak or statistics.median(peak.flops_per_sec)
                    memory, measured = peak_memory_bytes(step)
                    rows.append({"size": size, "objective": objective, "seq_len": seq_len,
                                 "attention": attention + ("*" if fallback else ""),
                                 "dtype": args.dtype, "rows": shape.batch_size,
                                 "step_ms": 1e3 * harness.step_seconds(rounds["step"], args.steps),
                                 "tokens_per_sec": tokens_per_sec, "mfu": tokens_per_sec * step.flops_per_token
                                 / device_peak, "peak_flops": device_peak,
                                 "peak_source": f"{kind} bfloat16 dense peak" if known_peak else "measured matmul peak",
                                 "memory_bytes": memory, "memory_source": measured, "loss": step.last_loss})
                    print(format_attention_row(rows[-1]), flush=True)
    return rows


ATTENTION_HEADER = (f"{'size':<6} {'objective':<28} {'seq':>5} {'rows':>4} {'attention':<9} {'dtype':<8} "
                    f"{'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'memory MiB':>10}")


def format_attention_row(r: dict) -> str:
    return (f"{r['size']:<6} {r['objective']:<28} {r['seq_len']:>5} {r['rows']:>4} {r['attention']:<9} "
            f"{r['dtype']:<8} {r['step_ms']:>9.1f} {r['tokens_per_sec']:>10,.0f} {r['mfu']:>6.1%} "
            f"{r['memory_bytes'] / 2**20:>10,.0f}")


def print_tables(steps: list[dict], mask: dict, pipeline: list[dict], args: argparse.Namespace,
                 load: tuple[float, float]) -> None:
    print(f"{harness.machine(args.host_memory_kept)}; batch {args.batch_size} x seq {args.seq_len}, "
          f"vocab {args.vocab_size}, float32, "
          f"{args.rounds} rounds x {args.steps} steps (medians); 1-min load average {load[0]:.1f} -> {load[1]:.1f}")
    print(f"\n{'size':<6} {'objective':<28} {'tokens/s':>9} {'step ms':>8} {'real tok':>8} "
          f"{'GFLOP/tok':>9} {'peak GFLOP/s':>12} {'MFU':>6}")
    for r in steps:
        print(f"{r['size']:<6} {r['objective']:<28} {r['tokens_per_sec']:>9,.0f} {r['step_ms']:>8.0f} "
              f"{r['real_tokens_per_step']:>8.0f} {r['model_flops_per_token'] / 1e9:>9.4f} "
              f"{r['matmul_peak_flops'] / 1e9:>12.1f} {r['mfu']:>6.1%}")
    fractions = ", ".join(f"{k} {v:.0%}" for k, v in mask["kind_fractions"].items())
    print(f"\nmask overhead (small, {mask['objective']}; tokens {fractions}): mixed {mask['mixed_step_ms']:.0f} ms "
          f"vs causal {mask['causal_step_ms']:.0f} ms per step: {mask['overhead']:+.1%}")
    print(f"\n{'objective':<28} {'packing':>8} {'pipeline tok/s':>14} {'step tok/s':>10} {'pipeline/step':>13}")
    for r in pipeline:
        print(f"{r['objective']:<28} {r['packing_efficiency']:>8.2%} {r['tokens_per_sec']:>14,.0f} "
              f"{r['step_tokens_per_sec']:>10,.0f} {r['pipeline_over_step']:>12.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,base", help="comma-separated model presets")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--pipeline_batches", type=int, default=50, help="batches timed per pipeline")
    parser.add_argument("--json", action="store_true", help="also print all results as one JSON line")
    parser.add_argument("--attention", default="",
                        help="comma-separated attention paths (dense, flash, auto): the long-sequence table instead")
    parser.add_argument("--dtype", default="float32", help="compute dtype of the attention table (bfloat16 on "
                                                           "accelerators)")
    parser.add_argument("--seq_lens", default="128,512,2048,8192", help="sequence lengths of the attention table")
    parser.add_argument("--tokens_per_batch", type=int, default=8192, help="attention table: rows = this / seq_len")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="objectives of the attention table")
    parser.add_argument("--loss_head", choices=tuple(LOSS_HEADS), default="auto",
                        help="attention table: the token loss; auto = the training default of this backend "
                             "(weighted on CPU, full logits elsewhere)")
    harness.add_shape_flags(parser)
    args = parser.parse_args()
    args.host_memory_kept = harness.apply_host_memory(args)
    load_before = harness.load_average()
    if args.attention:
        print(f"{harness.machine(args.host_memory_kept)}; {args.tokens_per_batch} tokens per batch, "
              f"{args.rounds} rounds x {args.steps} steps (medians), loss head {args.loss_head}")
        print(ATTENTION_HEADER, flush=True)
        with tempfile.TemporaryDirectory() as temporary:
            rows = attention_comparison(args, args.workdir or temporary)
        if any(row["attention"].endswith("*") for row in rows):
            print("*: the layout has no key ranges (ENCODER_ONLY), so 'flash' fell back to 'dense' as training does")
        print(f"MFU over {rows[0]['peak_source']} ({rows[0]['peak_flops'] / 1e12:.1f} TFLOP/s); memory: "
              f"{rows[0]['memory_source']}; 1-min load average {load_before:.1f} -> {harness.load_average():.1f}")
        if args.json:
            print(json.dumps({"attention": rows, "machine": harness.machine(args.host_memory_kept)}))
        return
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or temporary
        steps = [step_throughput(size, objective, args, workdir)
                 for size in args.sizes.split(",") for objective in OBJECTIVES]
        mask = mask_overhead(args, workdir)
        pipeline = pipeline_ratios(steps, args, workdir)
    load = (load_before, harness.load_average())
    print_tables(steps, mask, pipeline, args, load)
    if args.json:
        print(json.dumps({"steps": steps, "mask_overhead": mask, "pipeline": pipeline, "load_average_1min": load,
                          "machine": harness.machine(args.host_memory_kept), "batch_size": args.batch_size,
                          "seq_len": args.seq_len}))


if __name__ == "__main__":
    main()
