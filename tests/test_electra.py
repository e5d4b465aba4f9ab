"""ELECTRA (objectives/electra.py, pretrain/heads/generator.py and replaced_token.py):
the example, the generator and discriminator heads against NumPy references, the loss
they compose, that no gradient reaches the generator through its samples, training
with bit-exact resumption, fine-tuning, the held-out column, and the export of the
discriminator to `transformers`' ElectraForPreTraining.

Tolerances: float32 sums in another order agree to rtol 1e-5; exported logits to 1e-4
(the issue's bound; measured differences are printed)."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import objectives
from objectives.electra import DISCRIMINATED, GENERATOR_DRAWS
from objectives.example import PREFIX, TextChunk
from objectives.terms import as_uniform
from pretrain.layers import gelu
from pretrain.loss import batch_loss
from pretrain.model import create_model, preset
from pretrain.packing import pack
from train_helpers import shared_tokenizer, tiny_config

VOCAB = objectives.Vocabulary(size=100)
MASK, CLS, SEP = VOCAB.mask, VOCAB.cls, VOCAB.sep
ELECTRA_FORM = dict(pre_layer_norm=False, mlm_transform_head=True, gelu="exact", layer_norm_epsilon=1e-12)


def leaf(**settings):
    return objectives.build_mixture("electra", VOCAB, {"electra": settings}).objectives[0]


def test_the_example_masks_the_predicted_tokens_carries_their_draws_and_predicts_no_token_through_the_body():
    text = VOCAB.ordinary_ids[np.arange(40) % len(VOCAB.ordinary_ids)]
    example = leaf()(TextChunk(text), np.random.default_rng(0))
    tokens = np.concatenate([[CLS], text, [SEP]])
    np.testing.assert_array_equal(example.targets, tokens)
    assert not example.weights.any() and (example.attention_kind == PREFIX).all() and not example.token_types.any()
    draws, marked = example.extras[GENERATOR_DRAWS], example.extras[DISCRIMINATED]
    predicted = np.flatnonzero(draws)
    assert len(predicted) == round(0.15 * 40) and marked.tolist() == [1] * 42
    assert draws[0] == draws[-1] == 0  # never [CLS] or [SEP]
    changed = np.flatnonzero(example.inputs != tokens)
    assert set(changed) <= set(predicted) and (example.inputs[changed] == MASK).all()


def test_of_the_predicted_tokens_85_percent_become_mask_and_the_rest_stay():
    """10,000 predicted tokens (fixed seed): the [MASK] share within 4 binomial std of 0.85."""
    rng, masked, total = np.random.default_rng(1), 0, 0
    text = VOCAB.ordinary_ids[np.arange(60) % len(VOCAB.ordinary_ids)]
    electra = leaf()
    while total < 10_000:
        example = electra(TextChunk(text), rng)
        predicted = example.extras[GENERATOR_DRAWS] != 0
        masked += int((example.inputs[predicted] == MASK).sum())
        total += int(predicted.sum())
        assert (example.inputs[~predicted] == example.targets[~predicted]).all()
    assert abs(masked / total - 0.85) <= 4 * np.sqrt(0.85 * 0.15 / total)


def electra_model(seed: int = 0, **overrides):
    config = preset("tiny", vocab_size=VOCAB.size, heads=("generator", "replaced_token"), **{**ELECTRA_FORM,
                                                                                               **overrides})
    return create_model(config, seed)


def electra_batch(seed: int = 0, rows: int = 4, seq_len: int = 48) -> dict:
    mixture = objectives.build_mixture("electra", VOCAB)
    rng = np.random.default_rng(seed)
    examples = [mixture(TextChunk(rng.integers(7, VOCAB.size, size=int(rng.integers(8, 20)))), rng)
                for _ in range(3 * rows)]
    packed = pack(examples, seq_len, term_fields=mixture.term_fields)
    return {name: jnp.asarray(values[:rows]) for name, values in packed.items()}


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_the_generator_is_a_quarter_width_stack_on_the_bodys_own_embeddings():
    model = electra_model(model_dim=256, num_heads=4, mlp_dim=512, embedding_dim=128, num_layers=2)
    from pretrain.hf.models import flat_params

    prefix = "heads.generator."
    shapes = {key[len(prefix):]: value.shape for key, value in flat_params(model).items() if key.startswith(prefix)}
    assert shapes["projection_kernel"] == (128, 64)  # ELECTRA-Small: embeddings 128, generator width 64
    assert shapes["blocks.0.mlp.wi"] == (64, 256) and shapes["blocks.0.attention.qkv_kernel"] == (64, 3, 1, 64)
    assert "blocks.2.mlp.wi" not in shapes and "blocks.1.mlp.wi" in shapes  # the body's depth
    assert shapes["predictions.kernel"] == (64, 128) and shapes["output_bias"] == (VOCAB.size,)
    assert not any("embedding" in name for name in shapes)  # token, position and type tables are the body's


def test_the_generator_loss_and_samples_equal_a_numpy_reference():
    """The MLM loss sum at the drawn positions from the full generator logits, and each
    sample the inverse CDF of their softmax at the draw; the body then reads the samples."""
    model, batch = electra_model(1), electra_batch(1)
    generator = model.head("generator")
    term = leaf().loss_terms[0]
    hidden = generator.hidden(model, batch, deterministic=True)
    logits = np.asarray(generator.predictions(hidden) @ model.token_embedding[...].T + generator.output_bias[...])
    draws, targets = np.asarray(batch[GENERATOR_DRAWS]), np.asarray(batch["targets"])
    drawn = draws != 0
    expected_loss = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0][drawn].sum()
    probabilities = np.exp(log_softmax(logits))
    expected_samples = (np.cumsum(probabilities, -1) < as_uniform(draws)[..., None]).sum(-1)
    rewritten, stats = generator.prepare(model, batch, term)
    np.testing.assert_allclose(float(stats["loss_sum"]), expected_loss, rtol=1e-5)
    assert float(stats["weight_sum"]) == drawn.sum() > 0
    assert float(stats["correct_sum"]) == (logits.argmax(-1) == targets)[drawn].sum()
    np.testing.assert_array_equal(np.asarray(rewritten["inputs"])[drawn], expected_samples[drawn])
    np.testing.assert_array_equal(np.asarray(rewritten["inputs"])[~drawn], np.asarray(batch["inputs"])[~drawn])


def test_the_discriminator_head_and_the_composed_loss_equal_a_numpy_reference():
    """loss = generator loss sum / drawn positions + 50 x (sigmoid cross-entropy of
    `inputs != targets` over the marked tokens) / marked tokens; accuracy counts
    positive logits as 'replaced'."""
    model, batch = electra_model(2), electra_batch(2)
    terms = objectives.build_mixture("electra", VOCAB).loss_terms
    rewritten, generator_stats = model.head("generator").prepare(model, batch, terms[0])
    hidden = model(rewritten)
    detector = model.head("replaced_token")
    x = gelu(model.config, hidden @ detector.dense_kernel[...] + detector.dense_bias[...])
    logits = np.asarray(x @ detector.prediction_kernel[...])[..., 0] + float(detector.prediction_bias[0])
    labels = np.asarray(rewritten["inputs"] != rewritten["targets"], np.float64)
    taken = np.asarray(batch[DISCRIMINATED]) != 0
    losses = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    assert labels[taken].sum() > 0 and taken.sum() < taken.size  # some replaced tokens, some padding
    loss, stats = batch_loss(model, batch, 1, terms=terms)
    replaced = stats["terms"]["replaced"]
    np.testing.assert_allclose(float(replaced["loss_sum"]), losses[taken].sum(), rtol=1e-5)
    assert float(replaced["correct_sum"]) == ((logits > 0) == (labels > 0.5))[taken].sum()
    assert float(replaced["weight_sum"]) == taken.sum()
    expected = float(generator_stats["loss_sum"]) / float(generator_stats["weight_sum"]) + \
        50.0 * losses[taken].sum() / taken.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(stats["weight_sum"].sum()) == 0  # the body predicts no token through the vocabulary


def test_no_gradient_reaches_the_generator_through_its_samples():
    """With the generator's own loss weighted 0, the discriminator's loss gives every
    generator parameter a gradient of exactly 0 (the samples are not differentiated),
    while the shared embeddings and the body get one."""
    model, batch = electra_model(3), electra_batch(3)
    terms = objectives.build_mixture("electra", VOCAB, {"electra": {"generator_weight": 0.0}}).loss_terms
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: batch_loss(nnx.merge(graphdef, p, rest), batch, 1, terms=terms)[0])(params)
    pure = nnx.to_pure_dict(grads)
    generator = jax.tree.leaves(pure["heads"]["generator"])
    assert generator and all(not np.asarray(g).any() for g in generator)
    assert np.asarray(pure["token_embedding"]).any() and np.asarray(pure["blocks"][0]["mlp"]["wi"]).any()


def test_a_scan_layout_generator_converts_with_the_body():
    """The generator's own stack follows the model's layer layout, and `to_layout`
    converts it with the body's blocks: the loop model loaded from the scan model's
    parameters gives the same loss, bit for bit."""
    from pretrain.hf.models import flat_params, set_flat_params

    scan, loop = electra_model(4, scan_layers=True), electra_model(5)
    set_flat_params(loop, flat_params(scan))
    batch, terms = electra_batch(4), objectives.build_mixture("electra", VOCAB).loss_terms
    assert "heads.generator.blocks.1.mlp.wi" in flat_params(scan)
    assert float(batch_loss(scan, batch, 1, terms=terms)[0]) == float(batch_loss(loop, batch, 1, terms=terms)[0])


def test_the_discriminator_exports_to_electra_for_pretraining_with_its_embedding_projection(tmp_path):
    """A model with embeddings narrower than the stack (as ELECTRA-Small) and non-zero
    biases and norms, written with `to_hf` and `hf_config`: transformers'
    ElectraForPreTraining gives the discriminator's logits within 1e-4; the generator and
    the vocabulary head stay behind."""
    import torch
    import transformers
    from safetensors.numpy import save_file

    from pretrain.hf import convert
    from pretrain.hf.models import architecture_of, flat_params, hf_config, set_flat_params

    model = electra_model(6, model_dim=64, num_heads=4, embedding_dim=32, num_token_types=2)
    params = flat_params(model)
    draw = np.random.default_rng(0)
    set_flat_params(model, {key: value + 0.1 * draw.standard_normal(value.shape).astype(np.float32)
                            if value.ndim == 1 else value for key, value in params.items()})
    assert architecture_of(model.config) == "electra"
    state = convert.to_hf(flat_params(model), "electra")
    assert "electra.embeddings_project.weight" in state and not any("generator" in key or key.startswith("cls.")
                                                                    for key in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.config, {"[PAD]": 0})))
    reference = transformers.ElectraForPreTraining.from_pretrained(tmp_path).eval()
    ids = draw.integers(0, VOCAB.size, size=(2, 20))
    types = np.repeat([[0] * 12 + [1] * 8], 2, axis=0)
    batch = {"inputs": ids, "positions": np.tile(np.arange(20), (2, 1)), "token_types": types,
             "segment_ids": np.ones_like(ids), "attention_kind": np.full_like(ids, PREFIX)}
    ours = np.asarray(model.head("replaced_token")(model({k: jnp.asarray(v) for k, v in batch.items()})))
    with torch.no_grad():
        theirs = reference(torch.tensor(ids), token_type_ids=torch.tensor(types)).logits.numpy()
    worst = float(np.abs(ours - theirs).max())
    print(f"ElectraForPreTraining: max |logit difference| {worst:.2e}")
    assert worst <= 1e-4


@pytest.fixture(scope="module")
def electra_run(tmp_path_factory):
    """(workdir, config, final state) of a tiny ELECTRA run: 16 steps, checkpoints at 8 and 16."""
    from pretrain.train import Trainer

    workdir = tmp_path_factory.mktemp("electra") / "run"
    workdir.mkdir()
    shutil.copy(shared_tokenizer(tmp_path_factory), workdir / "tokenizer.model")
    config = tiny_config("electra", total_steps=16, checkpoint_every=8, log_every=4, eval_every=8,
                         peak_flops_per_device=1e12, **{"model.pre_layer_norm": False,
                                                        "model.mlm_transform_head": True})
    trainer = Trainer(config, str(workdir))
    trainer.run()
    return workdir, config, jax.device_get(trainer.state)


def test_electra_trains_and_resumes_bit_exactly(electra_run, tmp_path):
    """The run logs both terms and lowers the loss; resumed from its step-8 checkpoint it
    ends bit-identical to the uninterrupted run."""
    from pretrain.train import Trainer
    from train_helpers import read_metrics

    workdir, config, final_state = electra_run
    records = read_metrics(workdir)
    assert {"loss/generator", "loss/replaced", "accuracy/replaced"} <= set(records[-1])
    assert records[-1]["loss"] < records[0]["loss"]
    assert "eval/loss/replaced" in [r for r in records if "eval/loss/replaced" in r][-1]
    resumed = tmp_path / "run"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "16")
    trainer = Trainer(config, str(resumed))
    assert trainer.run() == 16
    for a, b in zip(jax.tree.leaves(jax.device_get(trainer.state)), jax.tree.leaves(final_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_held_out_column_is_replaced_token_detection_and_other_models_skip_it(electra_run, tmp_path_factory):
    from pretrain.evaluate import evaluate_run
    from train_helpers import shared_finished_run

    workdir, _, _ = electra_run
    result = evaluate_run(str(workdir), objective_names=["electra", "mlm"], max_documents=20)
    electra = result["objectives"]["electra"]
    assert 0 < electra["loss"] < 1.0 and 0.5 < electra["accuracy"] <= 1 and electra["targets"] > 100
    other = evaluate_run(str(shared_finished_run(tmp_path_factory)[0]), objective_names=["electra", "mlm"],
                         max_documents=20)
    assert "electra" not in other["objectives"] and "generator" in other["skipped"]["electra"]
    assert other["heldout"]["fingerprint"] == result["heldout"]["fingerprint"]


def test_the_discriminator_fine_tunes_and_exports(electra_run, tmp_path):
    """Fine-tuning starts from the discriminator's body; `pretrain.export` writes an
    ElectraForPreTraining directory transformers loads, with the run's logits."""
    import torch
    import transformers

    from pretrain.transfer import trainer as transfer
    from pretrain.export import export_run
    from pretrain.inference import load_trained
    from test_finetune import config_for

    workdir, _, _ = electra_run
    with transfer.FinetuneTrainer(config_for(str(workdir)), str(tmp_path / "ft")) as trainer:
        assert trainer.run() == 8
    wrote = export_run(str(workdir), str(tmp_path / "hf"))
    assert wrote["class"] == "ElectraForPreTraining"
    reference = transformers.ElectraForPreTraining.from_pretrained(tmp_path / "hf").eval()
    model = load_trained(str(workdir)).model
    ids = np.random.default_rng(0).integers(5, 400, size=(2, 24))
    batch = {"inputs": ids, "positions": np.tile(np.arange(24), (2, 1)), "token_types": np.zeros_like(ids),
             "segment_ids": np.ones_like(ids), "attention_kind": np.full_like(ids, PREFIX)}
    ours = np.asarray(model.head("replaced_token")(model({k: jnp.asarray(v) for k, v in batch.items()})))
    with torch.no_grad():
        theirs = reference(torch.tensor(ids)).logits.numpy()
    assert float(np.abs(ours - theirs).max()) <= 1e-4


def test_nothing_leaks_between_packed_examples_through_the_generator_or_the_discriminator():
    """Two examples packed in one row: changing every token of the second changes
    neither the first's generator states, nor its samples, nor its replaced-token logits."""
    mixture = objectives.build_mixture("electra", VOCAB)
    rng = np.random.default_rng(7)
    first = mixture(TextChunk(rng.integers(7, VOCAB.size, size=14)), np.random.default_rng(1))
    outputs = []
    for seed in (2, 3):
        second = mixture(TextChunk(np.random.default_rng(seed).integers(7, VOCAB.size, size=14)),
                         np.random.default_rng(seed))
        packed = pack([first, second], 40, term_fields=mixture.term_fields)
        batch = {name: jnp.asarray(values) for name, values in packed.items()}
        model = electra_model(8)
        generator = model.head("generator")
        rewritten, _ = generator.prepare(model, batch, mixture.loss_terms[0])
        logits = model.head("replaced_token")(model(rewritten))
        states = generator.hidden(model, batch, deterministic=True)
        outputs.append((np.asarray(rewritten["inputs"])[0, :len(first)], np.asarray(logits)[0, :len(first)],
                        np.asarray(states)[0, :len(first)], np.asarray(batch["inputs"])[0, len(first):2 * len(first)]))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outputs[0][2], outputs[1][2], rtol=0, atol=1e-6)  # the generator's own states
    assert (outputs[0][3] != outputs[1][3]).any()  # the second example did change


def test_the_uniform_generator_ablation_replaces_the_predicted_tokens_on_the_host():
    """`uniform_generator=True` (ELECTRA's ablation): every predicted token is an ordinary
    token drawn uniformly, no [MASK] is left, and only the detection term is trained."""
    text = VOCAB.ordinary_ids[np.arange(40) % len(VOCAB.ordinary_ids)]
    electra = leaf(uniform_generator=True)
    assert [term.name for term in electra.loss_terms] == ["replaced"]
    example = electra(TextChunk(text), np.random.default_rng(4))
    assert set(example.extras) == {DISCRIMINATED} and not (example.inputs == MASK).any()
    changed = np.flatnonzero(example.inputs != example.targets)
    assert len(changed) >= round(0.15 * 40) - 1 and not VOCAB.is_special(example.inputs[changed]).any()
