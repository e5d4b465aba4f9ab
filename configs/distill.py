"""Distillation config: `--config=configs/distill.py --config.teacher=runs/mlm`.

    python -m pretrain.distill --config=configs/distill.py --config.teacher=runs/mlm --workdir=runs/mlm-distilled

The student learns the teacher's objective on the teacher's data with the teacher's
tokenizer (all read from the teacher's config.json); what is set here is the student's
shape and start, the distillation loss (DistilBERT's code's defaults, TinyBERT's terms
off) and the training loop. The run's config.json records the resolved pretraining
config with the distillation under `config.distill`, so the student is an ordinary run
for fine-tuning, evaluation and export.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import pretrain as pretrain_config
from pretrain.distillation import DistillationWeights

# Fields of the training loop a distillation sets itself; everything else comes from the teacher's run.
LOOP_FIELDS = ("seed", "total_steps", "accumulation_steps", "parallelism", "mesh", "optimizer", "log_every",
               "eval_every", "checkpoint_every", "keep_checkpoints", "peak_flops_per_device", "nonfinite",
               "max_consecutive_skips", "peer_timeout_seconds", "sample_at_end", "batch_size", "seq_len")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/distill.py takes no variants (got {arg!r}); set fields with --config.<field>")
    loop = pretrain_config.get_config()
    config = ml_collections.ConfigDict()
    config.teacher = ""  # the pretraining run directory to distil (its newest checkpoint)
    for field in LOOP_FIELDS:
        config[field] = loop[field]
    config.batch_size = 0  # 0: the teacher's
    config.seq_len = 0  # 0: the teacher's
    config.student = ml_collections.ConfigDict(dict(
        size="",  # '' = the teacher's shape; or a preset (tiny, small, base, large) whose shape the student takes
        num_layers=0,  # 0: half the teacher's (at least 1)
        model_dim=0, num_heads=0, mlp_dim=0,  # 0: those of the teacher (or of `size`)
        init="auto",  # 'teacher' (its embeddings, heads and chosen layers), 'random', 'auto' (teacher if widths match)
        layers="distilbert",  # which teacher layers: 'distilbert' (evenly spaced, first and last), 'every_other'
    ))
    config.distill = ml_collections.ConfigDict(dataclasses.asdict(DistillationWeights()))
    return config
