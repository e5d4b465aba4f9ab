"""Which pooling should a fine-tuned body use? Every pooling, measured by the comparison's protocol.

    python benchmarks/pooling.py --runs=runs/compare/runs/mlm,runs/compare/runs/clm
        [--tasks=pydocs_topic,pydocs_code_spans] [--methods=full,probe] [--fraction=0.05]

For every body (a bidirectional and a causal one, say), every pooling of
`pretrain.transfer.heads.POOLINGS` and every method, one cell of the comparison's
protocol (`configs/compare.py`'s fine-tuning budget and learning-rate grids, seed 0
at every rate, the dev-best rate for the other seeds; `pretrain.transfer.comparison.tune_cell`)
on a label fraction of each classification task; prints the test mean ± std per cell.
The default pooling (`pretrain.transfer.trainer.AUTO_POOLING`) is chosen from this table.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from configs.compare import get_config
from pretrain.host_memory import keep_freed_memory
from pretrain.transfer import comparison, heads, sweep, tasks
from pretrain.transfer.trainer import load_bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated pretraining run directories")
    parser.add_argument("--tasks", default="pydocs_topic")
    parser.add_argument("--methods", default="full,probe")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--poolings", default=",".join(p for p in heads.POOLINGS))
    args = parser.parse_args()
    downstream = get_config().downstream
    cache = sweep.ProgramCache()
    print(f"| body | task | method | {' | '.join(args.poolings.split(','))} |")
    print("|---|---|---|" + "---:|" * len(args.poolings.split(",")))
    data = {}
    for run in args.runs.split(","):
        for task_name in args.tasks.split(","):
            for method in args.methods.split(","):
                cells = []
                for pooling in args.poolings.split(","):
                    config = comparison.finetune_config(downstream, comparison.Row(run, run), task_name, method)
                    config.pooling = pooling
                    bodies, tokenizer = load_bodies(config)
                    if task_name not in data:
                        task = tasks.label_subset(tasks.load_task(config, bodies[0].run_config.data), args.fraction)
                        data[task_name] = sweep.TaskData(task, tokenizer, seq_len=config.seq_len,
                                                         batch_size=config.batch_size, packed=config.packed)
                    steps = comparison.training_steps(config, data[task_name])

                    def train(members, total_steps, every, config=config, bodies=bodies):
                        return sweep.train_members(copy.deepcopy(config), data[task_name], lambda seed: bodies,
                                                   members, total_steps=total_steps, eval_every=every, cache=cache)

                    cell = comparison.tune_cell(train, seeds=tuple(downstream.seeds),
                                                learning_rates=comparison.learning_rates(downstream, method),
                                                total_steps=steps,
                                                eval_every=sweep.evaluation_interval(steps, config.evaluations))
                    values = [r["test"][r["metric"]] for r in cell["results"]]
                    cells.append(f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (lr {cell['learning_rate']:g})")
                layout = bodies[0].layout
                print(f"| {run} ({layout}) | {task_name}@{args.fraction:g} | {method} | {' | '.join(cells)} |",
                      flush=True)


if __name__ == "__main__":
    keep_freed_memory()
    main()
