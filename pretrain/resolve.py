"""Resolving a pretraining config: what a run derives from what it was given, once.

A config as given leaves some fields to the run: a Hugging Face model to start from
fixes the model's shape; the objectives fix how many token types the embedding table
needs and which auxiliary heads their loss terms train. `resolve_config` returns a new
config with those fields filled in; the config checks then validate that new config,
and never edit what they check. The given config is left as it was (a comparison
records what it asked for; the run records, in `config.json`, what it resolved to).
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from pretrain.config_checks import declared_heads, needed_token_types

log = logging.getLogger("pretrain.train")


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the derived fields set: an imported model's shape (and its
    token-type table grown to what the objectives use, as UniLM's code grows BERT's),
    and the heads the objectives' loss terms train added to `config.model.heads`.
    A config the checks will refuse is resolved as far as it can be, so that they can
    name its problems."""
    resolved = config.copy_and_resolve_references()
    if "init" in resolved and resolved.init.hf:
        from pretrain.hf.models import adopt_shape, hf_directory_problems  # interop loads only when asked for

        if not hf_directory_problems(resolved.init.hf):
            adopt_shape(resolved.model, resolved.init.hf)
            try:
                needed = needed_token_types(resolved)
            except ValueError:
                needed = 0
            if needed > resolved.model.num_token_types:
                log.warning("config.init.hf: the objectives use %d token types and %s embeds %d; the table is "
                            "grown (pretrain.hf.models.grow_token_types)", needed, resolved.init.hf,
                            resolved.model.num_token_types)
                resolved.model.num_token_types = needed
    try:
        resolved.model.heads = declared_heads(resolved)
    except (ValueError, TypeError, AttributeError):
        pass
    return resolved
