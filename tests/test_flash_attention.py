"""The fused attention path (`config.model.attention='flash'`) against the dense
reference, mixed precision, and the trainer's choice of path.

On CPU the fused path runs tokamax's chunked XLA implementation over the same key
ranges the GPU and TPU kernels take (tokamax's Pallas kernels have no interpret
mode), so these tests check the ranges and the plumbing exactly; the kernels
themselves run on accelerators only (benchmarks/throughput.py).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import objectives
from objectives.example import TextChunk
from pretrain.attention import has_key_ranges
from pretrain.loss import batch_loss
from pretrain.model import create_model, preset
from pretrain.packing import pack
from pretrain.train import Trainer
from train_helpers import read_metrics, restore_newest, tiny_config, tokenizer_file, workdir_with  # noqa: F401

SIZE = 400
VOCAB = objectives.Vocabulary.reserved(SIZE, sentinels=100,
                                       word_start=np.random.default_rng(0).random(SIZE) < 0.6)
SEQ_LEN = 128
# Float32 through the same products in another order (blocks of keys with an online
# softmax): measured differences are ~1e-6 on hidden states and ~1e-7 on gradients.
HIDDEN_TOLERANCE = dict(rtol=1e-4, atol=2e-5)
GRADIENT_TOLERANCE = dict(rtol=1e-3, atol=2e-6)


def ranged_leaves() -> list[objectives.Objective]:
    """Every leaf of every registered objective whose layout has key ranges."""
    leaves = []
    for name in objectives.registered_names():
        for leaf in objectives.build_mixture(name, VOCAB).objectives:
            if has_key_ranges(leaf.attention_kinds):
                leaves.append(leaf)
    return leaves


def mixed_batch(seed: int) -> dict[str, np.ndarray]:
    """Packed rows of examples of every ranged leaf, shuffled together (objective ids
    renumbered so the loss sees one mixture)."""
    draw = np.random.default_rng(seed)
    made = []
    leaves = ranged_leaves()
    for index, leaf in enumerate(leaves):
        leaf.objective_id = index
        for _ in range(2):
            length = int(draw.integers(max(leaf.min_text_tokens, 12), min(leaf.text_budget(SEQ_LEN // 2), 50) + 1))
            tokens = VOCAB.ordinary_ids[draw.integers(0, len(VOCAB.ordinary_ids), length)]
            chunk = TextChunk(tokens, np.array([0, length // 2], np.int32),
                              VOCAB.ordinary_ids[draw.integers(0, len(VOCAB.ordinary_ids), 60)])
            made.append(leaf(chunk, draw))
    order = draw.permutation(len(made))
    return pack([made[i] for i in order], SEQ_LEN), len(leaves)


def models(**overrides):
    shape = dict(vocab_size=SIZE, max_positions=SEQ_LEN, nsp_head=True, **overrides)
    return (create_model(preset("tiny", attention="dense", **shape), seed=3),
            create_model(preset("tiny", attention="flash", **shape), seed=3))


def test_flash_equals_dense_forward_and_gradients_on_every_objective_mixed():
    batch, count = mixed_batch(seed=0)
    assert len(np.unique(batch["objective_id"][batch["weights"] > 0])) == count, "every leaf in the batch"
    dense, flash = models()
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(np.asarray(flash(batch))[real], np.asarray(dense(batch))[real], **HIDDEN_TOLERANCE)

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: batch_loss(nnx.merge(graphdef, p, rest), batch, count)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    dense_loss, dense_grads = loss_and_grads(dense)
    flash_loss, flash_grads = loss_and_grads(flash)
    np.testing.assert_allclose(float(flash_loss), float(dense_loss), rtol=1e-6)
    for (path, want), (_, got) in zip(jax.tree_util.tree_leaves_with_path(dense_grads),
                                      jax.tree_util.tree_leaves_with_path(flash_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path),
                                   **GRADIENT_TOLERANCE)


def test_decoding_with_the_cache_is_unchanged_under_flash():
    """KV-cache decoding runs the dense rule over the cache (a few queries at a time)
    whichever path the stack trains with; prompt and steps match the dense model."""
    dense, flash = models()
    prompt = {"inputs": jnp.asarray(VOCAB.ordinary_ids[None, 5:15]), "positions": jnp.arange(10)[None],
              "token_types": jnp.zeros((1, 10), jnp.int32), "segment_ids": jnp.ones((1, 10), jnp.int32),
              "attention_kind": jnp.full((1, 10), objectives.example.L2R, jnp.int32)}
    outputs = []
    for model in (dense, flash):
        hidden, cache = model.extend(model.init_cache(1, 16), prompt)
        step = {k: v[:, -1:] for k, v in prompt.items()} | {"positions": jnp.array([[10]])}
        more, _ = model.extend(cache, step)
        outputs.append(np.concatenate([np.asarray(hidden), np.asarray(more)], axis=1))
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_bfloat16_trains_with_float32_master_weights_under_flash(tokenizer_file, tmp_path):  # noqa: F811
    """The accelerator preset (bfloat16 compute) with the fused path forced on, through
    the trainer: the loss falls, and parameters and optimizer state stay float32."""
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    config = tiny_config("mlm:1,clm:1", total_steps=24, log_every=4, checkpoint_every=24)
    config.model.dtype, config.model.attention = "bfloat16", "flash"
    trainer = Trainer(config, str(workdir))
    assert trainer.model_config.attention == "flash" and trainer.model_config.compute_dtype == jnp.bfloat16
    assert trainer.run() == 24
    losses = [r["loss"] for r in read_metrics(workdir)]
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses
    step, state, _ = restore_newest(workdir, config)
    assert step == 24
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes


def test_a_layout_without_key_ranges_falls_back_to_dense(tokenizer_file, tmp_path, caplog):  # noqa: F811
    config = tiny_config("mlm:1,mass:1")
    config.model.attention = "flash"
    with caplog.at_level(logging.WARNING, logger="pretrain.train"):
        trainer = Trainer(config, str(workdir_with(tokenizer_file, tmp_path / "run")))
    assert trainer.model_config.attention == "dense"
    assert ["config.model.attention='flash' falls back to 'dense': the objectives use attention kind ENCODER_ONLY"
            in record.getMessage() for record in caplog.records].count(True) == 1


@pytest.mark.parametrize("value", ["fused", "Flash"])
def test_an_unknown_attention_path_names_the_field(value):
    with pytest.raises(ValueError, match=rf"config.model.attention='{value}' must be one of"):
        preset("tiny", attention=value)
