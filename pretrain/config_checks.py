"""Config validation before anything is built or compiled: one entry, every message.

Every problem names its field, the value found and what to do; all of them are
reported together, so one round of edits fixes a config. Each rule has one home,
in the module that uses the fields: the model's shape in `pretrain.model`, the
optimizer in `pretrain.optimizer`, the mesh in `pretrain.sharding`, data and
tokenizer in `pretrain.input_pipeline` (with packing and tokenizer rules from
their modules), the training loop's own fields in `pretrain.train`, objective
settings in `objectives`. Those modules enforce the same rules where they are
used. This module holds only the schema (a field missing, or one the trainer
never reads: a typo) and the rules that tie fields of different owners together.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import objectives
from pretrain import model, optimizer, sharding
from pretrain.input_pipeline import data_problems, tokenizer_problems

# objectives: checked by objectives.build_mixture, which knows each objective's settings; distill: written and
# checked by pretrain.distill (what a student learned from), refused by pretrain.train
FREE_FORM = ("objectives", "distill")


def validate_config(config: Any, device_count: int) -> None:
    """Raises ValueError listing every missing, unknown or inconsistent field of a
    pretraining config (for a job with `device_count` devices in all)."""
    from pretrain.loop import loop_problems  # the loop's own fields

    problems = _schema_problems(config)
    if not problems:
        problems = [*_init_problems(config), *loop_problems(config), *_objective_problems(config),
                    *model.config_problems(config.model),
                    *_position_problems(config), *parallel_problems(config, device_count),
                    *optimizer.settings_problems(config.optimizer, config.total_steps),
                    *data_problems(config.data, config.batch_size), *tokenizer_problems(config.tokenizer)]
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _schema_problems(config: Any) -> list[str]:
    """Fields missing from `config`, or present but unknown, against configs/pretrain.py."""
    from configs.pretrain import get_config  # the schema; imported late, as configs import pretrain

    return schema_problems(config, get_config().to_dict(), FREE_FORM)


def schema_problems(config: Any, reference: Mapping, free_form: tuple[str, ...] = ()) -> list[str]:
    """Fields of `reference` (a config file's defaults, as a dict) missing from
    `config`, and fields of `config` that `reference` lacks (typos), with the closest
    field; groups named in `free_form` are not descended into."""
    problems: list[str] = []

    def walk(reference: Mapping, given: Mapping, prefix: str) -> None:
        for key in reference:
            if key not in given:
                problems.append(f"config.{prefix}{key} is missing; add it (the default is {reference[key]!r})")
            elif isinstance(reference[key], Mapping) and key not in free_form:
                if isinstance(given[key], Mapping):
                    walk(reference[key], given[key], f"{prefix}{key}.")
                else:
                    problems.append(f"config.{prefix}{key} must be a group of fields, not {given[key]!r}")
        for key in given:
            if key not in reference:
                close = difflib.get_close_matches(key, list(reference), n=1)
                hint = f"did you mean config.{prefix}{close[0]}?" if close else "remove it"
                problems.append(f"config.{prefix}{key} is not a field the trainer knows; {hint}")

    walk(reference, config.to_dict() if hasattr(config, "to_dict") else config, "")
    return problems


def planned_mixture(config: Any) -> objectives.Mixture:
    """The run's mixture built against a vocabulary laid out as its tokenizer will be
    (the reserved tokens, then ordinary ones), before any tokenizer exists."""
    sentinels = config.tokenizer.sentinels if isinstance(config.tokenizer.sentinels, int) else 0
    vocab = objectives.Vocabulary.reserved(len(objectives.vocab.reserved_tokens(max(sentinels, 0))) + 64,
                                           sentinels=max(sentinels, 0))
    return objectives.build_mixture(config.objective, vocab, config.objectives)


def declared_heads(config: Any) -> tuple[str, ...]:
    """`config.model.heads` with every head the objectives' loss terms train added, in
    order: the heads a run's model is built with."""
    heads = list(config.model.heads)
    for term in planned_mixture(config).loss_terms:
        if term.head not in heads:
            heads.append(term.head)
    return tuple(heads)


def needed_token_types(config: Any) -> int:
    """How many token types the run's objectives use (the highest type + 1)."""
    return 1 + max(t for leaf in planned_mixture(config).objectives for t in leaf.token_types)


def _objective_problems(config: Any) -> list[str]:
    """The objectives and their settings, and whether seq_len leaves each room for text."""
    problems = []
    try:
        mixture = planned_mixture(config)
    except ValueError as error:
        return [f"config.objective / config.objectives: {error}"]
    problems += _coupling_problems(mixture, config.model)
    if isinstance(config.seq_len, int) and config.seq_len >= 1:
        for leaf in mixture.objectives:
            if leaf.text_budget(config.seq_len) < max(leaf.min_text_tokens, 2):
                problems.append(f"config.seq_len={config.seq_len} leaves objective {leaf.name!r} no room for "
                                f"text (budget {leaf.text_budget(config.seq_len)} tokens); use seq_len >= 16")
    return problems


def _coupling_problems(mixture: objectives.Mixture, model_config: Any) -> list[str]:
    """What the objectives declare they need from the model: the head of each loss term
    they train, and a token-type table that holds every type they use."""
    problems = []
    heads = tuple(model_config.heads) if isinstance(model_config.heads, (list, tuple)) else ()
    for leaf in mixture.objectives:
        for term in leaf.loss_terms:
            if term.head not in heads:
                problems.append(f"objective {leaf.name!r} trains loss term {term.name!r} with head {term.head!r}, "
                                f"which config.model.heads={heads} lacks; add it (the trainer adds the heads "
                                "the objectives declare itself: `declared_heads`)")
    types = sorted({t for leaf in mixture.objectives for t in leaf.token_types})
    table = model_config.num_token_types
    if types and isinstance(table, int) and types[-1] >= table:
        users = [leaf.name for leaf in mixture.objectives if max(leaf.token_types, default=0) >= table]
        problems.append(f"config.model.num_token_types={table} is too small: objectives {users} use token types up "
                        f"to {types[-1]}; set config.model.num_token_types={types[-1] + 1} or more")
    return problems


def _init_problems(config: Any) -> list[str]:
    """A Hugging Face model to start from: readable, and the only source of the tokenizer."""
    if not config.init.hf:
        return []
    from pretrain.hf.models import hf_directory_problems  # the interop modules load only when asked for

    problems = hf_directory_problems(config.init.hf)
    if config.tokenizer.model_path:
        problems.append(f"config.tokenizer.model_path={config.tokenizer.model_path!r} and config.init.hf="
                        f"{config.init.hf!r} both give a tokenizer; an imported model keeps its own, so leave "
                        "config.tokenizer.model_path empty")
    return problems


def _position_problems(config: Any) -> list[str]:
    """seq_len against the model's position table."""
    limit = config.model.max_positions
    if isinstance(config.seq_len, int) and isinstance(limit, int) and config.seq_len > limit:
        return [f"config.seq_len={config.seq_len} exceeds config.model.max_positions={limit}; raise "
                "max_positions or shorten seq_len"]
    return []


def parallel_problems(config: Any, device_count: int) -> list[str]:
    """The mesh against the devices, and the global batch against the data-parallel
    size and the accumulation steps (pretraining and fine-tuning configs alike)."""
    return [*sharding.mesh_problems(**_mesh(config, device_count)), *_batch_problems(config, device_count)]


def _mesh(config: Any, device_count: int) -> dict[str, int]:
    """The mesh the config asks for (pjit), or all devices on the data axis (pmap)."""
    if config.parallelism == "pjit":
        return dict(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor,
                    device_count=device_count)
    return dict(data=device_count, fsdp=1, tensor=1, device_count=device_count)


def _batch_problems(config: Any, device_count: int) -> list[str]:
    """The global batch against the data-parallel size and the accumulation steps."""
    data, fsdp, _ = sharding.mesh_shape(**_mesh(config, device_count))
    replicas = max(data, 1) * max(fsdp, 1)
    steps = config.accumulation_steps
    if isinstance(config.batch_size, int) and isinstance(steps, int) and steps >= 1 and \
            config.batch_size % (replicas * steps):
        return [f"config.batch_size={config.batch_size} must be divisible by data-parallel size {replicas} "
                f"x config.accumulation_steps={steps}"]
    return []
