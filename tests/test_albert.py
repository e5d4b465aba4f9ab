"""ALBERT's options: cross-layer sharing (`model.share_layers`: one copy of a block's
parameters, applied every layer) and factorised embeddings (`model.embedding_dim`), which
train with every objective, resume bit for bit and export to `AlbertForMaskedLM` with
transformers' logits."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives.example import PREFIX
from pretrain.hf.models import architecture_of, flat_params, hf_config, set_flat_params
from pretrain.model import create_model, parameter_count, preset
from train_helpers import read_metrics, shared_tokenizer, tiny_config

ALBERT = {"pre_layer_norm": False, "mlm_transform_head": True, "output_bias": True, "share_layers": True}


def batch_of(ids: np.ndarray, types: np.ndarray) -> dict[str, jax.Array]:
    rows, length = ids.shape
    return {"inputs": jnp.asarray(ids), "positions": jnp.tile(jnp.arange(length), (rows, 1)),
            "token_types": jnp.asarray(types), "segment_ids": jnp.ones((rows, length), jnp.int32),
            "attention_kind": jnp.full((rows, length), PREFIX, jnp.int32)}


def test_shared_layers_hold_one_copy_and_apply_it_at_every_layer():
    shared = create_model(preset("tiny", num_layers=3, vocab_size=100, **ALBERT), seed=0)
    one = create_model(preset("tiny", num_layers=1, vocab_size=100, **ALBERT), seed=0)
    assert parameter_count(shared) == parameter_count(one)
    names = flat_params(shared)
    assert {name.split(".")[1] for name in names if name.startswith("blocks.")} == {"0"}
    # the same numbers as an unshared model whose three blocks are copies of the shared one
    unshared = create_model(preset("tiny", num_layers=3, vocab_size=100, **{**ALBERT, "share_layers": False}), seed=5)
    copies = {}
    for name in flat_params(unshared):
        source = name if not name.startswith("blocks.") else "blocks.0." + name.split(".", 2)[2]
        copies[name] = names[source]
    set_flat_params(unshared, copies)
    draw = np.random.default_rng(0)
    batch = batch_of(draw.integers(5, 100, (2, 12)), np.zeros((2, 12), np.int64))
    np.testing.assert_array_equal(np.asarray(shared(batch)), np.asarray(unshared(batch)))
    states = shared.layer_outputs(batch)
    assert len(states) == 4  # the embeddings, then each of the three applications


@pytest.mark.parametrize("embedding_dim", [32, 0])
def test_albert_exports_to_albert_for_masked_lm_with_its_logits(tmp_path, embedding_dim):
    """A shared-layer model (with narrower embeddings, or not) and non-zero biases and norms,
    written with `to_hf` and `hf_config`: transformers' AlbertForMaskedLM gives the same
    vocabulary logits within 1e-4."""
    import torch
    import transformers
    from safetensors.numpy import save_file

    from pretrain.hf import convert

    model = create_model(preset("tiny", num_layers=3, vocab_size=100, num_token_types=2,
                                embedding_dim=embedding_dim, **ALBERT), seed=0)
    params = flat_params(model)
    draw = np.random.default_rng(0)
    set_flat_params(model, {key: value + 0.1 * draw.standard_normal(value.shape).astype(np.float32)
                            if value.ndim == 1 else value for key, value in params.items()})
    assert architecture_of(model.config) == "albert"
    state = convert.to_hf(flat_params(model), "albert")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    described = hf_config(model.config, {"[PAD]": 0})
    (tmp_path / "config.json").write_text(json.dumps(described))
    reference = transformers.AlbertForMaskedLM.from_pretrained(tmp_path).eval()
    assert described["architectures"] == ["AlbertForMaskedLM"] and reference.config.embedding_size == (
        embedding_dim or 64)
    ids, types = draw.integers(5, 100, (2, 20)), np.repeat([[0] * 12 + [1] * 8], 2, axis=0)
    ours = np.asarray(model.logits(model(batch_of(ids, types))))
    with torch.no_grad():
        theirs = reference(torch.tensor(ids), token_type_ids=torch.tensor(types)).logits.numpy()
    worst = float(np.abs(ours - theirs).max())
    print(f"AlbertForMaskedLM (embedding_dim {embedding_dim}): max |logit difference| {worst:.2e}")
    assert worst <= 1e-4


def test_albert_trains_every_objective_resumes_bit_exactly_and_exports(tmp_path_factory, tmp_path):
    """Shared layers and 32-wide embeddings under every objective at once (MLM, causal LM,
    MASS, UniLM, ELECTRA's replaced tokens, SpanBERT's boundary objective, BERT's sentence pairs): the loss falls, a resume
    from the middle checkpoint ends bit-identical, and a masked-LM run exports to
    AlbertForMaskedLM."""
    from pretrain.export import export_run
    from pretrain.train import Trainer

    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(shared_tokenizer(tmp_path_factory), workdir / "tokenizer.model")
    model = {f"model.{k}": v for k, v in ALBERT.items()}
    config = tiny_config("mlm:1,clm:1,mass:1,unilm:1,electra:1,spanbert:1", total_steps=12, checkpoint_every=6,
                         log_every=6, peak_flops_per_device=1e12, **model,
                         **{"model.embedding_dim": 32, "objectives.mlm.nsp": True})
    trainer = Trainer(config, str(workdir))
    assert trainer.run() == 12
    final = jax.device_get(trainer.state)
    rows = read_metrics(workdir)
    assert rows[-1]["loss/mlm"] < rows[0]["loss/mlm"] and {"loss/replaced", "loss/nsp", "loss/sbo"} <= set(rows[-1])
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")
    again = Trainer(config, str(resumed))
    assert again.run() == 12
    for a, b in zip(jax.tree.leaves(jax.device_get(again.state)), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    masked = tmp_path / "masked"
    masked.mkdir()
    shutil.copy(shared_tokenizer(tmp_path_factory), masked / "tokenizer.model")
    Trainer(tiny_config("mlm", total_steps=2, checkpoint_every=2, peak_flops_per_device=1e12, **model,
                        **{"model.embedding_dim": 32, "optimizer.warmup_steps": 1}), str(masked)).run()
    written = export_run(str(masked), str(tmp_path / "hf"))
    assert written["class"] == "AlbertForMaskedLM"

    # int8 weight-only: transformers loads the weights that inference computes with, and gives its logits
    import torch
    import transformers

    from pretrain.inference import load_trained
    from pretrain.quantization import quantized_model

    assert export_run(str(masked), str(tmp_path / "hf-int8"), quantize="int8_weights")["quantized"] == "int8_weights"
    ours = quantized_model(load_trained(masked).model, "int8_weights")
    reference = transformers.AlbertForMaskedLM.from_pretrained(tmp_path / "hf-int8").eval()
    ids = np.random.default_rng(1).integers(20, 300, (2, 16))
    with torch.no_grad():
        theirs = reference(torch.tensor(ids), token_type_ids=torch.zeros(2, 16, dtype=torch.long)).logits.numpy()
    mine = np.asarray(ours.logits(ours(batch_of(ids, np.zeros((2, 16), np.int64)))))
    assert float(np.abs(mine - theirs).max()) <= 1e-4
    float_logits = transformers.AlbertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        unquantized = float_logits(torch.tensor(ids), token_type_ids=torch.zeros(2, 16, dtype=torch.long)).logits
    assert float(np.abs(unquantized.numpy() - theirs).max()) > 1e-4  # the export holds the quantized weights
    with pytest.raises(ValueError, match="no exact counterpart there"):
        export_run(str(masked), str(tmp_path / "hf-act"), quantize="int8")
