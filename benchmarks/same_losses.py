"""Shows that a refactor leaves training unchanged: the same short runs trained at two
commits must log bit-identical losses, accuracies, gradient norms and held-out scores.

    python benchmarks/same_losses.py --before=b7ae1d2 [--after=WORKTREE] [--steps=12]

`--before` is checked out into a temporary git worktree; `--after` is a source tree
(default: this checkout, uncommitted changes included). Each run trains the tiny model
from scratch with one objective (its own tokenizer, trained the same way in both trees)
and the comparison prints, per run, whether every logged value is bit-identical. A run
may pass flags to one tree only (a renamed option, an option that did not exist); a
flag for the --before tree only is passed where that tree has the option.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (objective, flags for both trees, flags only the --before tree takes, flags only --after takes)
RUNS = {
    "mlm": ("mlm", [], [], []),
    "clm": ("clm", [], [], []),
    "unilm": ("unilm", [], [], []),
    "mass": ("mass", [], [], []),
    "mlm_nsp": ("mlm", ["--config.objectives.mlm.nsp=True"], ["--config.model.nsp_head=True"], []),
    # SpanBERT's span masking alone: before the span boundary objective existed, and with it off after
    "spanbert_no_sbo": ("spanbert", [], ["--config.objectives.spanbert.sbo=False"],
                        ["--config.objectives.spanbert.sbo=False"]),
    "spanbert": ("spanbert", [], [], []),  # with its span boundary objective: a --before that has it (f27ab69 on)
    "mlm_pmap": ("mlm", ["--config.parallelism=pmap"], [], []),  # the other device strategy
    "electra": ("electra", [], [], []),  # a --before that has it (1a58948 on)
}
COMPARED = ("loss", "accuracy", "grad_norm", "eval/loss", "eval/accuracy", "learning_rate")


def train(tree: str, workdir: str, objective: str, flags: list[str], steps: int) -> list[dict]:
    command = [sys.executable, "-m", "pretrain.train", f"--config=configs/pretrain.py:objective={objective},size=tiny",
               f"--workdir={workdir}", f"--config.total_steps={steps}", "--config.optimizer.warmup_steps=3",
               "--config.log_every=1", f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}", *flags]
    subprocess.run(command, cwd=tree, check=True, capture_output=True, text=True)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def takes(tree: str, flag: str) -> bool:
    """Whether the source `tree` knows the config field a `--config.<...>.<field>=value`
    flag sets (a before-only flag names an option later commits removed)."""
    field = flag.split("=", 1)[0].rsplit(".", 1)[-1]
    for directory in ("pretrain", "objectives"):
        for root, _, files in os.walk(os.path.join(tree, directory)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name), encoding="utf-8") as handle:
                        if f"{field}:" in handle.read():
                            return True
    return False


def compared(row: dict) -> dict:
    return {key: value for key, value in row.items() if key == "step" or key.startswith(COMPARED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit before the refactor")
    parser.add_argument("--after", default=ROOT, help="the source tree after it (default: this checkout)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, among {', '.join(RUNS)}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        before = os.path.join(scratch, "before")
        subprocess.run(["git", "worktree", "add", "--detach", before, args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            same = True
            for name in args.runs.split(","):
                objective, flags, before_flags, after_flags = RUNS[name]
                before_flags = [flag for flag in before_flags if takes(before, flag)]
                old = train(before, os.path.join(scratch, f"{name}-before"), objective, flags + before_flags,
                            args.steps)
                new = train(args.after, os.path.join(scratch, f"{name}-after"), objective, flags + after_flags,
                            args.steps)
                identical = len(old) == len(new) and all(compared(a) == compared(b) for a, b in zip(old, new))
                same &= identical
                keys = sorted({key for row in old for key in compared(row)} - {"step"})
                print(f"{name}: {len(old)} logged steps, {'bit-identical' if identical else 'DIFFERENT'} in "
                      f"{len(keys)} values ({', '.join(keys)}); last loss {old[-1]['loss']!r} -> {new[-1]['loss']!r}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", before], cwd=ROOT, check=False)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
