"""Config validation before anything is built or compiled: each problem names its field."""

from __future__ import annotations

from typing import Any

import objectives
from pretrain.model import TransformerConfig

PARALLELISMS = ("pjit", "pmap")


def validate_config(config: Any, device_count: int) -> None:
    """Raises ValueError listing every inconsistent field of a pretraining config."""
    problems: list[str] = []
    if config.parallelism not in PARALLELISMS:
        problems.append(f"config.parallelism={config.parallelism!r} must be one of {PARALLELISMS}")
    for field in ("total_steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                  "accumulation_steps", "keep_checkpoints"):
        if not isinstance(config[field], int) or config[field] < 1:
            problems.append(f"config.{field}={config[field]!r} must be a positive integer")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))

    try:  # objectives: names, settings, and whether seq_len leaves them room
        mixture = objectives.build_mixture(config.objective, objectives.Vocabulary(64), config.objectives)
        for leaf in mixture.objectives:
            if leaf.text_budget(config.seq_len) < max(leaf.min_text_tokens, 2):
                problems.append(f"config.seq_len={config.seq_len} leaves objective {leaf.name!r} no room for "
                                f"text (budget {leaf.text_budget(config.seq_len)} tokens); use seq_len >= 16")
    except ValueError as error:
        problems.append(f"config.objective / config.objectives: {error}")
    try:
        model = TransformerConfig(**config.model, vocab_size=config.tokenizer.vocab_size)
        if config.seq_len > model.max_positions:
            problems.append(f"config.seq_len={config.seq_len} exceeds config.model.max_positions="
                            f"{model.max_positions}; raise max_positions or shorten seq_len")
    except (TypeError, ValueError) as error:
        problems.append(f"config.model: {error}")

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
    if config.batch_size % (replicas * config.accumulation_steps):
        problems.append(f"config.batch_size={config.batch_size} must be divisible by data-parallel size {replicas} "
                        f"x config.accumulation_steps={config.accumulation_steps}")
    if not 0 <= config.optimizer.warmup_steps <= config.total_steps:
        problems.append(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} must lie in "
                        f"0..config.total_steps={config.total_steps}")
    if config.tokenizer.vocab_size < 8:
        problems.append(f"config.tokenizer.vocab_size={config.tokenizer.vocab_size} is too small")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
