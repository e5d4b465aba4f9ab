"""A tiny trained run made once per test session and shared by the evaluation,
generation and comparison tests (training it is the slow part)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain.train import Trainer
from train_helpers import shared_tokenizer, tiny_config

ALL_OBJECTIVES = "mlm:1,clm:1,mass:1,unilm:1"
_MADE: dict[str, Path] = {}


def shared_run(factory: pytest.TempPathFactory) -> Path:
    """A run directory: a tiny model trained 10 steps on every objective, one checkpoint,
    with the session's shared tokenizer (`train_helpers.shared_tokenizer`)."""
    if "run" not in _MADE:
        workdir = factory.mktemp("shared_run")
        shutil.copy(shared_tokenizer(factory), workdir / "tokenizer.model")
        config = tiny_config(ALL_OBJECTIVES, total_steps=10, checkpoint_every=10, peak_flops_per_device=1e12,
                             **{"tokenizer.sample_documents": 100})  # given MFU peak; bounded start-up statistics
        Trainer(config, str(workdir)).run()
        _MADE["run"] = workdir
    return _MADE["run"]
