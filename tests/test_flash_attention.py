"""The fused attention path (`config.model.attention='flash'`) against the dense
reference, mixed precision, the trainer's choice of path, and the tokamax names
and kernels it stands on.

On CPU the fused path runs tokamax's chunked XLA implementation over the same key
ranges the GPU and TPU kernels take (tokamax's Pallas kernels have no interpret
mode), so these tests check the ranges and the plumbing exactly; the kernels
themselves run on accelerators only (benchmarks/accelerator.sh runs these tests
there, and every test that runs the fused path checks which kernel ran).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import objectives
from objectives.example import TextChunk
from pretrain import flash_attention
from pretrain.attention import has_key_ranges
from pretrain.loss import batch_loss
from pretrain.model import TransformerConfig, attention_kernel, create_model, preset
from pretrain.packing import pack
from pretrain.train import Trainer
from train_helpers import read_metrics, restore_newest, tiny_config, tokenizer_file, workdir_with  # noqa: F401

SIZE = 400
VOCAB = objectives.Vocabulary.reserved(SIZE, sentinels=100,
                                       word_start=np.random.default_rng(0).random(SIZE) < 0.6)
SEQ_LEN = 128
# On CPU, float32 through the same products in another order (blocks of keys with an
# online softmax). Measured there (tokamax 0.0.12, these batches): largest absolute
# difference 1.3e-6 on hidden states (|h| <= 3.9; 9.5e-7 in cached decoding) and 3.0e-8
# on gradients (|g| <= 0.12), the tolerances ~10x that. With every loss term in the loss
# (ELECTRA's detection weighted 50) a leaf's gradients reach |g| = 4, and differ by up to
# 1.6e-7 of the leaf's largest element (6.3e-7 in a near-cancelling one), so on gradients
# the absolute tolerance is taken per unit of the leaf's largest element (at least 1). The
# accelerator kernels differ from the dense path in more than order and are not measured
# yet: the earlier bounds.
HIDDEN_TOLERANCE, GRADIENT_TOLERANCE = (
    (dict(rtol=0, atol=1.3e-5), dict(rtol=0, atol=3e-7)) if jax.default_backend() == "cpu"
    else (dict(rtol=1e-4, atol=2e-5), dict(rtol=1e-3, atol=2e-6)))
# The kernel the fused path must run on each backend (pretrain.flash_attention.KERNELS_BY_BACKEND):
# on GPU and TPU, the chunked XLA fallback running in their place is a failure.
EXPECTED_KERNELS = {"cpu": ("xla_chunked",), "gpu": ("mosaic_gpu", "triton"), "tpu": ("mosaic_tpu",)}


@pytest.fixture(autouse=True)
def untraced():
    """Forgets the kernel an earlier test's trace chose, so a test reads its own."""
    flash_attention.CHOSEN.pop(jax.default_backend(), None)


def assert_flash_ran(config: TransformerConfig) -> str:
    """The kernel the latest trace of `config`'s stack ran, once it is the one meant
    for this backend."""
    backend = jax.default_backend()
    kernel = attention_kernel(config)
    expected = EXPECTED_KERNELS[backend]
    assert kernel in expected, f"attention on {backend} ran {kernel!r}, not {' or '.join(expected)}"
    return kernel


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
    fields = objectives.terms.term_fields(term for leaf in leaves for term in leaf.loss_terms)
    return pack([made[i] for i in order], SEQ_LEN, term_fields=fields), len(leaves)


def tiny_model(attention: str):
    """The tiny preset over this file's vocabulary; the same parameters whatever the path."""
    heads = tuple(dict.fromkeys(term.head for leaf in ranged_leaves() for term in leaf.loss_terms))
    return create_model(preset("tiny", attention=attention, vocab_size=SIZE, max_positions=SEQ_LEN, heads=heads),
                        seed=3)


def test_flash_equals_dense_forward_and_gradients_on_every_objective_mixed():
    """Every objective's loss, its loss terms included (ELECTRA's generator runs its own
    stack under the same key ranges), and every gradient agree between the paths."""
    batch, count = mixed_batch(seed=0)
    real = batch["segment_ids"] > 0
    assert len(np.unique(batch["objective_id"][real])) == count, "every leaf in the batch"
    terms = objectives.terms.merged_terms(term for leaf in ranged_leaves() for term in leaf.loss_terms)
    assert {term.name for term in terms} >= {"sbo", "generator", "replaced"}
    dense, flash = tiny_model("dense"), tiny_model("flash")
    np.testing.assert_allclose(np.asarray(flash(batch))[real], np.asarray(dense(batch))[real], **HIDDEN_TOLERANCE)

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: batch_loss(nnx.merge(graphdef, p, rest), batch, count, terms=terms)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    dense_loss, dense_grads = loss_and_grads(dense)
    flash_loss, flash_grads = loss_and_grads(flash)
    np.testing.assert_allclose(float(flash_loss), float(dense_loss), rtol=1e-6)
    for (path, want), (_, got) in zip(jax.tree_util.tree_leaves_with_path(dense_grads),
                                      jax.tree_util.tree_leaves_with_path(flash_grads)):
        scale = max(1.0, float(np.abs(np.asarray(want)).max()))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path),
                                   rtol=GRADIENT_TOLERANCE["rtol"], atol=GRADIENT_TOLERANCE["atol"] * scale)
    assert_flash_ran(flash.config)


def test_cached_decoding_of_a_flash_model_matches_its_fused_forward():
    """A flash model decodes through its KV cache with the dense rule over the cache (a
    few queries at a time) and trains through the fused kernel over key ranges: a
    prefix prompt and one L2R step through the cache give the hidden states of one
    fused pass over the same tokens."""
    flash = tiny_model("flash")
    kinds = [objectives.example.PREFIX] * 6 + [objectives.example.L2R] * 10
    length = len(kinds)
    tokens = {"inputs": jnp.asarray(VOCAB.ordinary_ids[None, 5:5 + length]), "positions": jnp.arange(length)[None],
              "token_types": jnp.zeros((1, length), jnp.int32), "segment_ids": jnp.ones((1, length), jnp.int32),
              "attention_kind": jnp.asarray([kinds], jnp.int32)}
    hidden, cache = flash.extend(flash.init_cache(1, length), {k: v[:, :-1] for k, v in tokens.items()})
    more, _ = flash.extend(cache, {k: v[:, -1:] for k, v in tokens.items()})
    assert jax.default_backend() not in flash_attention.CHOSEN, "the cache path runs the dense rule"
    fused = np.asarray(flash(tokens))
    assert_flash_ran(flash.config)
    np.testing.assert_allclose(np.concatenate([np.asarray(hidden), np.asarray(more)], axis=1), fused,
                               **HIDDEN_TOLERANCE)


def test_bfloat16_trains_with_float32_master_weights_under_flash(tokenizer_file, tmp_path, caplog):  # noqa: F811
    """The accelerator preset (bfloat16 compute) with the fused path forced on, through
    the trainer: the loss falls, parameters and optimizer state stay float32, and the
    run records the kernel it trained with (every metrics row, one log line)."""
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    config = tiny_config("mlm:1,clm:1", total_steps=24, log_every=4, checkpoint_every=24)
    config.model.dtype, config.model.attention = "bfloat16", "flash"
    trainer = Trainer(config, str(workdir))
    assert trainer.program.model_config.attention == "flash" and trainer.program.model_config.compute_dtype == jnp.bfloat16
    with caplog.at_level(logging.INFO, logger="pretrain.train"):
        assert trainer.run() == 24
    rows = read_metrics(workdir)
    kernel = assert_flash_ran(trainer.program.model_config)
    assert [r["attention_kernel"] for r in rows] == [kernel] * 6, rows
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention: ")] == [
        f"attention: flash via {kernel} on {jax.default_backend()}"]
    losses = [r["loss"] for r in rows]
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
    assert trainer.program.model_config.attention == "dense" and attention_kernel(trainer.program.model_config) == "dense"
    assert ["config.model.attention='flash' falls back to 'dense': the objectives use attention kind ENCODER_ONLY"
            in record.getMessage() for record in caplog.records].count(True) == 1


@pytest.mark.parametrize("value", ["fused", "Flash"])
def test_an_unknown_attention_path_names_the_field(value):
    with pytest.raises(ValueError, match=rf"config.model.attention='{value}' must be one of"):
        preset("tiny", attention=value)


def test_the_private_tokamax_names_flash_attention_uses_are_where_it_looks():
    """pretrain.flash_attention reaches into tokamax._src (pyproject.toml pins the tested
    releases); a release that moves these names fails here, by name."""
    version = importlib.metadata.version("tokamax")
    tokamax = flash_attention.tokamax_internals()  # an ImportError naming what moved
    assert isinstance(tokamax.implementations, Mapping), f"tokamax {version}: api.IMPLEMENTATIONS is not a mapping"
    asked = {name for names in (*flash_attention.KERNELS_BY_BACKEND.values(), *EXPECTED_KERNELS.values())
             for name in names}
    missing = sorted(asked - set(tokamax.implementations))
    assert not missing, f"tokamax {version}: api.IMPLEMENTATIONS has no {missing}"
    mask = tokamax.Mask(k_start=jnp.array([[0, 0, 2]]), k_end=jnp.array([[1, 2, 3]]))
    np.testing.assert_array_equal(mask.as_array(3, 3), [[[1, 0, 0], [1, 1, 0], [0, 0, 1]]],
                                  err_msg=f"tokamax {version}: base.Mask(k_start, k_end) changed meaning")
    assert tokamax.XlaChunked(chunk_size=(4, 2)).chunk_size == (4, 2), f"tokamax {version}: XlaChunked's chunk_size"


def test_a_kernel_tokamax_lacks_is_named_in_one_warning(caplog):
    """A kernel name the installed tokamax does not have is skipped with one warning per
    process and name (the trace of every step asks again), the rest resolve in order."""
    table = flash_attention.tokamax_internals().implementations
    with caplog.at_level(logging.WARNING, logger="pretrain.flash_attention"):
        for _ in range(2):
            assert flash_attention.resolve_kernels(("not_a_tokamax_kernel", "triton")) == [("triton", table["triton"])]
    assert [record.getMessage() for record in caplog.records] == [
        f"flash attention: tokamax {importlib.metadata.version('tokamax')} has no kernel 'not_a_tokamax_kernel'; "
        "the next kernel in line runs instead"]
