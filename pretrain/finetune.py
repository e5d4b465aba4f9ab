"""Fine-tune, probe or fuse pretrained bodies on a downstream task; the same command resumes.

    python -m pretrain.finetune --config=configs/finetune.py:task=pydocs_topic,method=full \
        --config.init=runs/mlm --workdir=runs/mlm-topic [--config.seeds='(0,1,2)']

One full fine-tuning run per seed of `config.seeds`, each in `workdir/seed_<s>/`, a
run directory like a pretraining one (checkpoints, metrics.jsonl, TensorBoard,
exact resume, SIGTERM and Ctrl-C). The body comes from the newest good checkpoint
of `config.init` (parameters only: the head is new), its tokenizer from the same
run; `--config.init=''` with `--config.shape_from=<run>` is the random-init control,
and several runs (`--config.init=runs/mlm,runs/clm`) are fused. The dev metric picks
each run's step; `workdir/summary.json` and the printed table give the test scores
at those steps as mean ± std over seeds. See pretrain/transfer/ for tasks, heads
and methods.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

from pretrain import cli, distributed
from pretrain.host_memory import keep_freed_memory
from pretrain.peers import PeerWatch
from pretrain.transfer.trainer import format_summary, run_seeds


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.finetune`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "the fine-tuning directory (one seed_<s>/ run per seed); rerun "
                                  "the command to resume", flag_values=flag_values)
    config = cli.define_config(flag_values, argv, "configs/finetune.py", "fine-tuning config file")
    cli.parse(flag_values, argv, __doc__)

    def command() -> str:
        if not workdir.value:
            raise ValueError("--workdir is required: where the fine-tuning runs go, e.g. --workdir=runs/mlm-topic")
        run_config = cli.config_value(config, argv)
        distributed.initialize(peer_timeout=run_config.peer_timeout_seconds)
        with PeerWatch(run_config.peer_timeout_seconds):  # multi-process only; still watching if the run fails
            summary = run_seeds(run_config, workdir.value)
        return f"{format_summary(summary)}\nsummary: {os.path.join(os.path.abspath(workdir.value), 'summary.json')}"

    try:
        print(cli.run_reporting_bad_input(command), flush=True)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: aborted without saving (the newest checkpoint in the workdir is intact; "
                         "rerun the command to resume from it)") from None


if __name__ == "__main__":
    keep_freed_memory()  # before JAX starts its threads (pretrain/host_memory.py)
    main()
