"""Look at what a config feeds the model, before training on it.

    python -m pretrain.inspect_data --config=configs/pretrain.py:objective=mlm,size=small \
        --workdir=runs/mlm [--batches=4] [--config.data.kind=files --config.data.path='corpus/*.txt']

Builds the input pipeline exactly as training will (training the tokenizer into
the workdir when it has none), prints the corpus statistics, the mixture, the
packing efficiency of the first batches, and one decoded example per objective.
"""

from __future__ import annotations

import logging

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pretrain import input_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "pretraining config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (the tokenizer is kept here)", required=True)
_BATCHES = flags.DEFINE_integer("batches", 4, "batches to draw")


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    config = _CONFIG.value
    pipeline = input_pipeline.build_input_pipeline(config, _WORKDIR.value)
    print(f"source: {pipeline.source.describe()}")
    print(f"tokenizer: {pipeline.tokenizer.path} ({pipeline.tokenizer.vocab_size} pieces)")
    print(f"objectives: {pipeline.mixture}")
    iterator = iter(pipeline.train)
    batches = [next(iterator) for _ in range(_BATCHES.value)]
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
                print(f"  kinds  : {''.join('PLR'[k] for k in batch['attention_kind'][row][where])[:200]}")
    print(f"\nheld-out batches: {len(pipeline.eval_batches())}; "
          f"mean non-pad tokens per train row {np.mean([(b['segment_ids'] > 0).sum(1).mean() for b in batches]):.1f}")


if __name__ == "__main__":
    app.run(main)
