"""A tokenizer and a tiny trained run made once per test session and shared by the
evaluation, generation and comparison tests (training them is the slow part)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain.input_pipeline import build_input_pipeline
from pretrain.train import Trainer
from test_train import tiny_config  # the tiny config (size=tiny, seq_len 64, vocab 400) of the training tests

ALL_OBJECTIVES = "mlm:1,clm:1,mass:1,unilm:1"
_MADE: dict[str, Path] = {}


def shared_tokenizer(factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece model trained on pydocs with the tiny config's vocabulary."""
    if "tokenizer" not in _MADE:
        workdir = factory.mktemp("shared_tokenizer")
        build_input_pipeline(tiny_config(), workdir)
        _MADE["tokenizer"] = workdir / "tokenizer.model"
    return _MADE["tokenizer"]


def shared_run(factory: pytest.TempPathFactory) -> Path:
    """A run directory: a tiny model trained 10 steps on every objective, one checkpoint."""
    if "run" not in _MADE:
        workdir = factory.mktemp("shared_run")
        shutil.copy(shared_tokenizer(factory), workdir / "tokenizer.model")
        config = tiny_config(ALL_OBJECTIVES, total_steps=10, checkpoint_every=10)
        config.tokenizer.sample_documents = 100  # the tokenizer is given; this only bounds start-up statistics
        config.peak_flops_per_device = 1e12  # MFU's denominator given, not measured
        Trainer(config, str(workdir)).run()
        _MADE["run"] = workdir
    return _MADE["run"]
