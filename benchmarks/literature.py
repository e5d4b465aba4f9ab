"""Does this run reproduce what the literature agrees on? The comparison protocol, then three checks.

    python benchmarks/literature.py --workdir=runs/literature [--config.<field>=...]

Runs `pretrain.compare` with `configs/compare.py:preset=literature` (mlm, span corruption,
prefix LM and causal LM under one budget, the random-init control, the built-in tasks,
the default protocol: dev-selected learning rates, label fractions, 3 seeds), then
prints, for each direction the literature agrees on, whether this run reproduces it:

  (a) every pretrained body beats training from scratch (T5, Raffel et al. 2020,
      table 1: GLUE 83.3 pretrained against 66.2 from scratch); per column: each
      pretrained row's mean above the control's with paired-bootstrap p < 0.05;
  (b) bidirectional denoising (mlm, span corruption) is at least as good as causal LM
      on classification fine-tuning (T5 table 2; BERT, Devlin et al. 2019, table 5:
      the gap is small on single-sentence tasks); per classification column: neither
      denoiser is below clm with paired-bootstrap p < 0.05;
  (c) the denoising variants are within a few points of each other (T5 table 5); per
      column: |mlm - span_corruption| <= 0.03 in the column's metric.

Nothing is tuned to make a check come out; the output is written to
`workdir/literature.md` whatever it shows. The workdir can be a default comparison's:
runs and fine-tuning cells with the same config are reused, not trained again.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from pretrain import cli, compare
from pretrain.host_memory import keep_freed_memory
from pretrain.transfer import comparison, significance, tasks
from pretrain.transfer.comparison import CONTROL

DENOISERS = ("mlm", "span_corruption")
CAUSAL = "clm"
FEW_POINTS = 0.03


def _p(summary_a: Mapping[str, Any], summary_b: Mapping[str, Any], task: tasks.Task) -> float:
    return significance.paired_bootstrap(task.metric, task.labels, task.gold("test"), summary_a["test_predictions"],
                                         summary_b["test_predictions"])["p"]


def _mean(summary: Mapping[str, Any]) -> float:
    return summary["test"][summary["metric"]]["mean"]


def checks(results: Mapping[str, Mapping[str, Any]], tasks_by_name: Mapping[str, tasks.Task]) -> list[str]:
    """One line per (check, column): 'reproduced' or 'not reproduced', with the numbers."""
    lines = []
    columns = list(dict.fromkeys(c for row in results.values() for c in row))
    for column in columns:
        present = {name: row[column] for name, row in results.items() if column in row}
        task = tasks_by_name[column.split("/")[0]]
        if CONTROL in present:
            rows = [(n, _mean(s) - _mean(present[CONTROL]), s["vs_control"]["bootstrap"]["p"])
                    for n, s in present.items() if n != CONTROL]
            ok = all(d > 0 and p < 0.05 for _, d, p in rows)
            detail = ", ".join(f"{n} {d:+.3f} (p {p:.3f})" for n, d, p in rows)
            lines.append(f"(a) {'reproduced' if ok else 'NOT reproduced'} on {column}: against {CONTROL} {detail}")
        if task.kind_spec.classes(task.labels) and CAUSAL in present and all(d in present for d in DENOISERS):
            rows = [(n, _mean(present[n]) - _mean(present[CAUSAL]), _p(present[n], present[CAUSAL], task))
                    for n in DENOISERS]
            ok = all(d >= 0 or p >= 0.05 for _, d, p in rows)
            detail = ", ".join(f"{n} {d:+.3f} (p {p:.3f})" for n, d, p in rows)
            lines.append(f"(b) {'reproduced' if ok else 'NOT reproduced'} on {column}: against {CAUSAL} {detail}")
        if all(d in present for d in DENOISERS):
            gap = _mean(present[DENOISERS[0]]) - _mean(present[DENOISERS[1]])
            ok = abs(gap) <= FEW_POINTS
            lines.append(f"(c) {'reproduced' if ok else 'NOT reproduced'} on {column}: {DENOISERS[0]} - "
                         f"{DENOISERS[1]} = {gap:+.3f} (a few points: |gap| <= {FEW_POINTS})")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if not any(arg.startswith("--config=") for arg in argv[1:]):
        argv.insert(1, "--config=configs/compare.py:preset=literature")
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", "runs/literature", "the comparison's directory", flag_values=flag_values)
    config = cli.define_config(flag_values, argv, "configs/compare.py", "comparison config file")
    cli.parse(flag_values, argv, __doc__)

    def command() -> str:
        settings = cli.config_value(config, argv)
        runs, results = compare.compare_with_downstream(settings, workdir.value, compare.command_line(argv))
        if not results:
            return "no downstream results: the literature checks need config.downstream.tasks"
        first = next(run for run in runs if run.config.seed == settings.pretrain_seeds[0])
        by_name = {}
        for task_name, _ in comparison.cells(settings.downstream):
            row = comparison.Row("check", first.directory)
            by_name[task_name] = tasks.load_task(comparison.finetune_config(settings.downstream, row, task_name, "full"),
                                                 first.config.data)
        lines = checks(results, by_name)
        text = "\n".join(lines)
        invocation = " ".join(["python benchmarks/literature.py", *(shlex.quote(arg) for arg in argv[1:])])
        with open(os.path.join(workdir.value, "literature.md"), "w", encoding="utf-8") as handle:
            handle.write(f"```\n{invocation}\n```\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
        return text

    print(cli.run_reporting_bad_input(command), flush=True)


if __name__ == "__main__":
    keep_freed_memory()
    main()
