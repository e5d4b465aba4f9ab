"""Many small fine-tuning runs: one by one (`pretrain.finetune`'s trainer) against one vmapped sweep.

    python benchmarks/finetune_sweep.py --init=runs/compare/runs/mlm [--task=pydocs_topic]
        [--seeds=0,1,2] [--rates=3e-4,1e-3,3e-3] [--steps=100]

The same runs (every seed at every rate, method `full`) are made both ways in one
process, one after the other: each through `pretrain.transfer.trainer.run_seeds` (a
run directory, checkpoints, its own compiled step and evaluation), then all as members
of one `pretrain.transfer.sweep.train_members` program. Prints, for each way, the wall
time, the seconds XLA spent compiling (JAX's own compile-duration events), the runs'
test accuracies (equal both ways up to float rounding), and the ratio of wall times.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax

from configs.finetune import get_config
from pretrain.host_memory import keep_freed_memory
from pretrain.transfer import sweep, tasks, trainer

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileClock:
    """Seconds XLA spends compiling, from JAX's monitoring events."""

    def __init__(self) -> None:
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_: object) -> None:
        if event == COMPILE_EVENT:
            self.seconds += duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", required=True, help="a pretraining run directory (its body is fine-tuned)")
    parser.add_argument("--task", default="pydocs_topic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rates", default="3e-4,1e-3,3e-3")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--evaluations", type=int, default=5)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    config = get_config(f"task={args.task},method=full")
    config.init, config.total_steps, config.batch_size = args.init, args.steps, args.batch_size
    config.eval_every = config.checkpoint_every = sweep.evaluation_interval(args.steps, args.evaluations)
    config.seeds, config.peak_flops_per_device = tuple(seeds), 1e12
    clock = CompileClock()

    started, compiled = time.perf_counter(), clock.seconds
    one_by_one = {}
    with tempfile.TemporaryDirectory() as workdir:
        for rate in rates:
            config.optimizer.learning_rate = rate
            summary = trainer.run_seeds(config, f"{workdir}/rate_{rate:g}")
            for seed, value in zip(seeds, summary["test"]["accuracy"]["per_seed"]):
                one_by_one[(seed, rate)] = value
    alone = (time.perf_counter() - started, clock.seconds - compiled)

    started, compiled = time.perf_counter(), clock.seconds
    bodies, tokenizer = trainer.load_bodies(config)
    task = tasks.load_task(config, bodies[0].run_config.data)
    data = sweep.TaskData(task, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size, packed=True)
    members = [sweep.Member(seed, rate) for rate in rates for seed in seeds]
    results = sweep.train_members(config, data, lambda seed: bodies, members, total_steps=args.steps,
                                  eval_every=config.eval_every)
    together = (time.perf_counter() - started, clock.seconds - compiled)
    swept = {(r["seed"], r["learning_rate"]): r["test"]["accuracy"] for r in results}

    print(f"{len(members)} fine-tuning runs of {args.steps} steps x {args.batch_size} rows on {args.task} "
          f"({jax.devices()[0].device_kind}):")
    for name, (wall, compile_seconds) in (("one by one (pretrain.finetune)", alone), ("one vmapped sweep", together)):
        print(f"  {name:<32} wall {wall:7.1f} s, compiling {compile_seconds:6.1f} s ({compile_seconds / wall:.0%})")
    print(f"  wall-time ratio (one by one / sweep): {alone[0] / together[0]:.2f}x")
    worst = max(abs(one_by_one[key] - swept[key]) for key in swept)
    print(f"  test accuracy, largest difference between the two ways over the {len(swept)} runs: {worst:.4f}")


if __name__ == "__main__":
    keep_freed_memory()
    main()
