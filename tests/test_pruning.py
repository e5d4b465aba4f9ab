"""Head pruning (`pretrain.pruning`, Michel et al. 2019): a pruned model keeping every head
is the unpruned one bit for bit; with heads removed it is the masked model (1e-6) in
smaller tensors; the importance is the gradient at a head gate; the ranking; and the
iterative procedure on a fine-tuned run, scored after each step."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from objectives.example import L2R, PREFIX
from pretrain.hf.models import flat_params, set_flat_params
from pretrain.model import create_model, parameter_count, preset
from pretrain.pruning import head_importance, least_important, masked, normalized, without_heads


def batch_of(kind: int) -> dict[str, jax.Array]:
    ids = np.random.default_rng(3).integers(5, 100, (2, 12))
    return {"inputs": jnp.asarray(ids), "positions": jnp.tile(jnp.arange(12), (2, 1)),
            "token_types": jnp.zeros((2, 12), jnp.int32), "segment_ids": jnp.ones((2, 12), jnp.int32),
            "attention_kind": jnp.full((2, 12), kind, jnp.int32)}


def test_a_model_keeping_every_head_is_the_unpruned_model_bit_for_bit():
    full = create_model(preset("tiny", vocab_size=100), seed=0)
    kept = create_model(preset("tiny", vocab_size=100, heads_per_layer=(4, 4)), seed=7)
    set_flat_params(kept, without_heads(flat_params(full), {}))
    for kind in (PREFIX, L2R):
        np.testing.assert_array_equal(np.asarray(kept(batch_of(kind))), np.asarray(full(batch_of(kind))))


@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_removed_heads_are_the_masked_model_in_smaller_tensors(pre_layer_norm):
    full = create_model(preset("tiny", vocab_size=100, pre_layer_norm=pre_layer_norm), seed=0)
    flat = flat_params(full)
    # non-zero biases, so a removed head's bias must go too
    flat = {k: v + 0.05 * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32) if "bias" in k else v
            for k, v in flat.items()}
    removed = {"blocks.0.attention": [1, 3], "blocks.1.attention": [0, 1, 2, 3]}
    pruned = create_model(preset("tiny", vocab_size=100, pre_layer_norm=pre_layer_norm, heads_per_layer=(2, 0)))
    set_flat_params(pruned, without_heads(flat, removed))
    reference = create_model(preset("tiny", vocab_size=100, pre_layer_norm=pre_layer_norm))
    set_flat_params(reference, masked(flat, removed))
    for kind in (PREFIX, L2R):
        got, want = np.asarray(pruned(batch_of(kind))), np.asarray(reference(batch_of(kind)))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    per_head = 64 * 3 * 16 + 3 * 16 + 16 * 64  # QKV kernel and bias, output kernel
    assert parameter_count(full) - parameter_count(pruned) == 6 * per_head
    assert pruned.blocks[0].attention.qkv_kernel.shape == (64, 3, 2, 16)
    assert pruned.blocks[1].attention.out_kernel.shape == (0, 16, 64)
    kept = flat_params(pruned)["blocks.0.attention.qkv_kernel"]
    np.testing.assert_array_equal(kept, flat["blocks.0.attention.qkv_kernel"][:, :, [0, 2]])


def test_the_importance_is_the_gradient_at_a_head_gate():
    """sum(W_out[h] * dL/dW_out[h]) equals dL/d xi_h of a gate xi scaling head h's output."""
    model = create_model(preset("tiny", vocab_size=100), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = batch_of(PREFIX)

    def loss(params, gates=None):
        if gates is not None:
            params = jax.tree_util.tree_map_with_path(
                lambda path, x: x * gates[int(path[1].key)][:, None, None] if "out_kernel" in str(path) else x,
                params)
        hidden = nnx.merge(graphdef, params, rest)(batch)
        return jnp.sum(jnp.sin(hidden))

    gradients = flat_params(nnx.merge(graphdef, jax.grad(loss)(params), rest))
    ours = head_importance(flat_params(model), gradients)
    gate_gradient = np.abs(np.asarray(jax.grad(lambda g: loss(params, g))(jnp.ones((2, 4)))))
    np.testing.assert_allclose(ours["blocks.0.attention"], gate_gradient[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ours["blocks.1.attention"], gate_gradient[1], rtol=1e-4, atol=1e-7)


def test_ranking_and_layer_normalization():
    importance = {"a": np.array([3.0, 4.0]), "b": np.array([1.0, 0.0, 0.5])}
    scaled = normalized(importance)
    np.testing.assert_allclose(scaled["a"], [0.6, 0.8])
    np.testing.assert_allclose(scaled["b"], np.array([1.0, 0.0, 0.5]) / np.sqrt(1.25))
    assert least_important(importance, 2) == {"b": [1, 2]}
    assert least_important(scaled, 3) == {"b": [1, 2], "a": [0]}


def test_iterative_pruning_of_a_fine_tuned_run_scores_every_step(tmp_path_factory, tmp_path):
    from pretrain.pruning import prune_run
    from pretrain.transfer import trainer as transfer
    from test_finetune import config_for, pretrained

    run = pretrained(tmp_path_factory, "mlm:1,clm:1,mass:1,unilm:1")
    finetuned = tmp_path / "topic"
    transfer.run_seeds(config_for(run), finetuned)
    result = prune_run(str(finetuned), str(tmp_path / "pruned"), target=0.5, step_fraction=0.25,
                       importance_batches=2)
    steps = result["steps"]
    assert result["heads"] == 8 and [s["removed_fraction"] for s in steps] == [0.0, 0.25, 0.5]
    assert [sum(s["heads_per_layer"][0]) for s in steps] == [8, 6, 4]
    assert steps[0]["parameters"] > steps[1]["parameters"] > steps[2]["parameters"]
    assert all(0 <= s["test"]["accuracy"] <= 1 and "loss" in s["dev"] for s in steps)
    full = transfer.read_records(finetuned / "seed_0")[-1]
    assert steps[0]["test"]["accuracy"] == full["eval/test/accuracy"]  # step 0 is the run as it was scored
    assert json.loads((tmp_path / "pruned" / "pruning.json").read_text())["steps"][-1] == steps[-1]
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    assert sum(v.size for v in stored.values()) == steps[-1]["parameters"]
