"""Look at what a config feeds the model, before training on it.

    python -m pretrain.inspect_data --config=configs/pretrain.py:objective=mlm,size=small \
        --workdir=runs/mlm [--batches=4] [--config.data.kind=files --config.data.path='corpus/*.txt']

Builds the input pipeline exactly as training will (training the tokenizer into
the workdir when it has none), prints the corpus statistics, the mixture, the
packing efficiency of the first batches, and one decoded example per objective.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from pretrain import cli, input_pipeline


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.inspect_data`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "run directory (the tokenizer is kept here)",
                                  flag_values=flag_values)
    batches = flags.DEFINE_integer("batches", 4, "batches to draw", flag_values=flag_values)
    config = cli.define_config(flag_values, argv, "configs/pretrain.py", "pretraining config file")
    cli.parse(flag_values, argv, __doc__)

    def command() -> None:
        if not workdir.value:
            raise ValueError("--workdir is required: where the tokenizer is kept, e.g. --workdir=runs/mlm")
        show(cli.config_value(config, argv), workdir.value, batches.value)

    cli.run_reporting_bad_input(command)


def show(config: Any, workdir: str, count: int) -> None:
    """Prints the corpus, the mixture, packing and one decoded example per objective."""
    pipeline = input_pipeline.build_input_pipeline(config, workdir)
    print(f"source: {pipeline.source.describe()}")
    print(f"tokenizer: {pipeline.tokenizer.path} ({pipeline.tokenizer.vocab_size} pieces)")
    print(f"objectives: {pipeline.mixture}")
    iterator = iter(pipeline.train)
    batches = [next(iterator) for _ in range(count)]
    stats = iterator.get_state()["stats"]
    print(f"first {len(batches)} batches: {stats['rows']} rows, {stats['examples']} examples, "
          f"packing {stats['real_tokens'] / (stats['rows'] * config.seq_len):.2%} real tokens, "
          f"{stats['dropped_tokens']} tokens dropped (document tails too short for an objective)")
    shown = set()
    for batch in batches:
        for row in range(len(batch["inputs"])):
            for segment in set(batch["segment_ids"][row].tolist()) - {0}:
                where = batch["segment_ids"][row] == segment
                objective = int(batch["objective_id"][row][where][0])
                if objective in shown:
                    continue
                shown.add(objective)
                pieces = lambda ids: " ".join(pipeline.tokenizer.piece(int(i)) for i in ids)  # noqa: E731
                weighted = batch["weights"][row][where] > 0
                print(f"\n[{pipeline.mixture.names[objective]}] {int(where.sum())} tokens, "
                      f"{int(weighted.sum())} predicted")
                print(f"  inputs : {pieces(batch['inputs'][row][where])[:400]}")
                print(f"  targets: {pieces(batch['targets'][row][where][weighted])[:400]}")
                print(f"  kinds  : {''.join('PLRE'[k] for k in batch['attention_kind'][row][where])[:200]}")
    print(f"\nheld-out batches: {len(pipeline.eval_batches())}; "
          f"mean non-pad tokens per train row {np.mean([(b['segment_ids'] > 0).sum(1).mean() for b in batches]):.1f}")


if __name__ == "__main__":
    main()
