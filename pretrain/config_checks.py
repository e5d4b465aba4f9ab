"""Config validation before anything is built or compiled.

Every problem names its field, the value found and what to do; all of them are
reported together, so one round of edits fixes a config. The fields themselves
are those of `configs/pretrain.py`: a config file that misses one, or adds one
the trainer never reads (a typo), is reported too.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

import objectives
from objectives.vocab import NUM_SPECIAL_TOKENS
from pretrain.model import TransformerConfig
from pretrain.optimizer import SCHEDULES
from pretrain.packing import STRATEGIES
from pretrain.sources import SOURCE_KINDS
from pretrain.tokenizer import MODEL_TYPES, NUM_BYTE_PIECES

PARALLELISMS = ("pjit", "pmap")
NONFINITE_POLICIES = ("stop", "skip")
POSITIVE_INTEGERS = ("total_steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "accumulation_steps",
                     "keep_checkpoints", "max_consecutive_skips")
FREE_FORM = ("objectives",)  # checked by objectives.build_mixture, which knows each objective's settings


def validate_config(config: Any, device_count: int) -> None:
    """Raises ValueError listing every missing, unknown or inconsistent field of a
    pretraining config (for a job with `device_count` devices in all)."""
    problems = _schema_problems(config)
    if not problems:
        problems = [*_loop_problems(config), *_model_problems(config), *_parallel_problems(config, device_count),
                    *_optimizer_problems(config), *_data_problems(config)]
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _schema_problems(config: Any) -> list[str]:
    """Fields missing from `config`, or present but unknown, against configs/pretrain.py."""
    from configs.pretrain import get_config  # the schema; imported late, as configs import pretrain

    problems: list[str] = []

    def walk(reference: Mapping, given: Mapping, prefix: str) -> None:
        for key in reference:
            if key not in given:
                problems.append(f"config.{prefix}{key} is missing; add it (the default is {reference[key]!r})")
            elif isinstance(reference[key], Mapping) and key not in FREE_FORM:
                if isinstance(given[key], Mapping):
                    walk(reference[key], given[key], f"{prefix}{key}.")
                else:
                    problems.append(f"config.{prefix}{key} must be a group of fields, not {given[key]!r}")
        for key in given:
            if key not in reference:
                close = difflib.get_close_matches(key, list(reference), n=1)
                hint = f"did you mean config.{prefix}{close[0]}?" if close else "remove it"
                problems.append(f"config.{prefix}{key} is not a field the trainer knows; {hint}")

    walk(get_config().to_dict(), config.to_dict() if hasattr(config, "to_dict") else config, "")
    return problems


def _loop_problems(config: Any) -> list[str]:
    problems = []
    for field in POSITIVE_INTEGERS:
        if not isinstance(config[field], int) or config[field] < 1:
            problems.append(f"config.{field}={config[field]!r} must be a positive integer")
    if not isinstance(config.eval_every, int) or config.eval_every < 0:
        problems.append(f"config.eval_every={config.eval_every!r} must be an integer >= 0 (0: evaluate at the end)")
    if config.parallelism not in PARALLELISMS:
        problems.append(f"config.parallelism={config.parallelism!r} must be one of {PARALLELISMS}")
    if config.nonfinite not in NONFINITE_POLICIES:
        problems.append(f"config.nonfinite={config.nonfinite!r} must be one of {NONFINITE_POLICIES} ('stop' ends "
                        "the run at a NaN/inf loss, 'skip' drops that step's update)")
    if not config.peak_flops_per_device >= 0:
        problems.append(f"config.peak_flops_per_device={config.peak_flops_per_device!r} must be >= 0 (0: detect)")
    return problems


def _model_problems(config: Any) -> list[str]:
    problems = []
    if isinstance(config.seq_len, int) and config.seq_len >= 1:
        try:  # objectives: names, settings, and whether seq_len leaves them room
            mixture = objectives.build_mixture(config.objective, objectives.Vocabulary(64), config.objectives)
            for leaf in mixture.objectives:
                if leaf.text_budget(config.seq_len) < max(leaf.min_text_tokens, 2):
                    problems.append(f"config.seq_len={config.seq_len} leaves objective {leaf.name!r} no room for "
                                    f"text (budget {leaf.text_budget(config.seq_len)} tokens); use seq_len >= 16")
        except ValueError as error:
            problems.append(f"config.objective / config.objectives: {error}")
    dim, heads = config.model.model_dim, config.model.num_heads
    if isinstance(dim, int) and isinstance(heads, int) and heads >= 1 and dim % heads:
        divisors = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
        return problems + [f"config.model.model_dim={dim} is not divisible by config.model.num_heads={heads}; "
                           f"choose num_heads among {divisors} (or change model_dim)"]
    try:
        model = TransformerConfig(**config.model, vocab_size=config.tokenizer.vocab_size)
        if isinstance(config.seq_len, int) and config.seq_len > model.max_positions:
            problems.append(f"config.seq_len={config.seq_len} exceeds config.model.max_positions="
                            f"{model.max_positions}; raise max_positions or shorten seq_len")
        if not 0 <= model.dropout_rate < 1:
            problems.append(f"config.model.dropout_rate={model.dropout_rate!r} must lie in [0, 1)")
    except (TypeError, ValueError) as error:
        problems.append(f"config.model: {error}")
    return problems


def _parallel_problems(config: Any, device_count: int) -> list[str]:
    problems = []
    if config.parallelism == "pjit":
        mesh = config.mesh
        fixed = mesh.fsdp * mesh.tensor
        data = device_count // fixed if mesh.data == -1 and fixed and device_count % fixed == 0 else mesh.data
        if min(mesh.fsdp, mesh.tensor) < 1 or data < 1 or data * fixed != device_count:
            problems.append(f"config.mesh data={mesh.data} x fsdp={mesh.fsdp} x tensor={mesh.tensor} does not "
                            f"match the {device_count} devices; make the product {device_count} (data=-1 fills in)")
        replicas = max(data, 1) * max(mesh.fsdp, 1)
    else:
        replicas = device_count
    steps = config.accumulation_steps
    if isinstance(config.batch_size, int) and isinstance(steps, int) and steps >= 1 and \
            config.batch_size % (replicas * steps):
        problems.append(f"config.batch_size={config.batch_size} must be divisible by data-parallel size {replicas} "
                        f"x config.accumulation_steps={steps}")
    return problems


def _optimizer_problems(config: Any) -> list[str]:
    problems, optimizer = [], config.optimizer
    if isinstance(config.total_steps, int) and not 0 <= optimizer.warmup_steps <= config.total_steps:
        problems.append(f"config.optimizer.warmup_steps={optimizer.warmup_steps} must lie in "
                        f"0..config.total_steps={config.total_steps}")
    if optimizer.schedule not in SCHEDULES:
        problems.append(f"config.optimizer.schedule={optimizer.schedule!r} must be one of {SCHEDULES}")
    if not (math.isfinite(optimizer.learning_rate) and optimizer.learning_rate > 0):
        problems.append(f"config.optimizer.learning_rate={optimizer.learning_rate!r} must be a finite number > 0 "
                        "(1e-4 .. 1e-3 is usual)")
    return problems + [
        f"config.optimizer.{name}={optimizer[name]!r} must lie in {interval}" for name, ok, interval in (
            ("end_factor", 0 <= optimizer.end_factor <= 1, "[0, 1]"),
            ("b1", 0 <= optimizer.b1 < 1, "[0, 1)"), ("b2", 0 <= optimizer.b2 < 1, "[0, 1)"),
            ("eps", optimizer.eps > 0, "(0, inf)"), ("weight_decay", optimizer.weight_decay >= 0, "[0, inf)"),
            ("clip_norm", optimizer.clip_norm >= 0, "[0, inf) (0 turns clipping off)"),
        ) if not ok]


def _data_problems(config: Any) -> list[str]:
    problems = []
    data, tokenizer = config.data, config.tokenizer
    if data.kind not in SOURCE_KINDS:
        problems.append(f"config.data.kind={data.kind!r} must be one of {tuple(SOURCE_KINDS)}")
    elif data.kind == "files" and not data.path:
        problems.append("config.data.path is empty but config.data.kind='files'; set it to a .txt/.jsonl file, "
                        "directory or glob")
    elif data.kind == "tfds" and not data.tfds_name:
        problems.append("config.data.tfds_name is empty but config.data.kind='tfds'; set it (e.g. 'c4/en')")
    if not 0 < data.heldout_fraction < 1:
        problems.append(f"config.data.heldout_fraction={data.heldout_fraction!r} must lie in (0, 1) (e.g. 0.02)")
    if data.packing not in STRATEGIES:
        problems.append(f"config.data.packing={data.packing!r} must be one of {STRATEGIES}")
    for field in ("open_rows", "num_threads"):
        if not isinstance(data[field], int) or data[field] < 1:
            problems.append(f"config.data.{field}={data[field]!r} must be a positive integer")
    if tokenizer.model_type not in MODEL_TYPES:
        problems.append(f"config.tokenizer.model_type={tokenizer.model_type!r} must be one of {MODEL_TYPES}")
    if tokenizer.model_path:
        if not os.path.isfile(tokenizer.model_path):
            problems.append(f"config.tokenizer.model_path={tokenizer.model_path!r} is not a file; give the path of "
                            "a SentencePiece .model file, or leave it empty to train one")
    elif tokenizer.vocab_size <= NUM_SPECIAL_TOKENS + NUM_BYTE_PIECES:
        problems.append(f"config.tokenizer.vocab_size={tokenizer.vocab_size} is too small: it must exceed "
                        f"{NUM_SPECIAL_TOKENS + NUM_BYTE_PIECES} ({NUM_SPECIAL_TOKENS} special tokens and "
                        f"{NUM_BYTE_PIECES} byte pieces); raise it (8000 is the default)")
    return problems
