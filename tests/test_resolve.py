"""Resolving a config returns a new one; checking it changes nothing (pretrain.resolve)."""

import jax

from pretrain.config_checks import validate_config
from pretrain.resolve import resolve_config
from train_helpers import tiny_config


def test_resolving_adds_the_heads_of_the_objectives_loss_terms_and_leaves_the_given_config_alone():
    given = tiny_config("mlm:1,spanbert:1", **{"objectives.mlm.nsp": True, "model.num_token_types": 2})
    before = given.to_dict()
    resolved = resolve_config(given)
    assert resolved.model.heads == ("pair_classifier", "span_boundary")
    assert given.to_dict() == before and given.model.heads == ()
    assert resolve_config(tiny_config("clm")).model.heads == ()
    assert resolve_config(resolved).model.heads == resolved.model.heads  # resolving is idempotent


def test_validation_never_edits_what_it_checks():
    resolved = resolve_config(tiny_config("mlm", **{"objectives.mlm.nsp": True}))
    before = resolved.to_dict()
    validate_config(resolved, jax.device_count())
    assert resolved.to_dict() == before
