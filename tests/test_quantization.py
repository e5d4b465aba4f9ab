"""Int8 quantization (`pretrain.quantization`, qwix): a quantized linear layer against a
NumPy reference to its rounding, weights and activations; the stored int8 body about 4x
smaller than float32; quantized scoring (`pretrain.evaluate --quantize`); the gradient
straight through; quantization-aware fine-tuning; task-time distillation from a
fine-tuned teacher."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives.example import PREFIX
from pretrain.hf.models import flat_params
from pretrain.layers import dense, quantized_activation
from pretrain.model import create_model, preset
from pretrain.quantization import fake_int8, fake_quantized, quantized_model, quantized_tensors, save_quantized
from train_helpers import ROOT


def reference_int8(w: np.ndarray, contracting: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales) of symmetric absmax int8 with one scale per index of
    the other axes: scale = absmax / 127.5, q = round(w * (1 / scale)) clipped to int8."""
    w = np.asarray(w, np.float32)
    scale = np.max(np.abs(w), axis=contracting, keepdims=True) * np.float32(1 / 127.5)
    q = np.clip(np.round(w * (np.float32(1) / scale)), -128, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def test_an_int8_linear_layer_matches_the_numpy_reference_to_its_rounding():
    draw = np.random.default_rng(0)
    w = draw.normal(size=(48, 20)).astype(np.float32)
    x = draw.normal(size=(3, 5, 48)).astype(np.float32)
    q, scale = reference_int8(w, (0,))
    stored = quantized_tensors({"blocks.0.mlp.wi": w})
    np.testing.assert_array_equal(stored["blocks.0.mlp.wi.qvalue"], q)
    np.testing.assert_array_equal(stored["blocks.0.mlp.wi.scale"], scale)
    assert stored["blocks.0.mlp.wi.qvalue"].dtype == np.int8 and scale.shape == (1, 20)
    # weight-only: the input in float, the weight int8 x its per-output-channel scale
    weight_only = np.asarray(dense(jnp.asarray(x), fake_int8(jnp.asarray(w), (1,))))
    np.testing.assert_allclose(weight_only, x @ (q.astype(np.float32) * scale), rtol=1e-6, atol=1e-6)
    # weights and activations: each token's input int8 x its own scale; int8 products summed exactly
    config = preset("tiny", activation_quantization="int8")
    qx, sx = reference_int8(x, (2,))
    both = np.asarray(dense(quantized_activation(config, jnp.asarray(x)), fake_int8(jnp.asarray(w), (1,))))
    integer = qx.astype(np.int32) @ q.astype(np.int32)  # the int8 kernel's int32 sums
    np.testing.assert_allclose(both, integer.astype(np.float32) * sx * scale, rtol=1e-6, atol=1e-5)  # float sums
    assert np.abs(both - x @ w).max() > 1e-4  # quantization changed the numbers


def test_the_straight_through_gradient_is_the_identity():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32))
    gradient = jax.grad(lambda v: (fake_int8(v, (1,)) * jnp.arange(24.0).reshape(6, 4)).sum())(w)
    np.testing.assert_array_equal(np.asarray(gradient), np.arange(24.0).reshape(6, 4))


def test_int8_weights_store_the_body_in_about_a_quarter_of_the_bytes(tmp_path):
    model = create_model(preset("small", vocab_size=8000, num_layers=2), seed=0)
    flat = flat_params(model)
    full = save_quantized(flat, str(tmp_path / "float.safetensors"), None)
    int8 = save_quantized(flat, str(tmp_path / "int8.safetensors"), "int8_weights")
    ratio = full / int8
    print(f"float32 {full:,} bytes, int8 weights {int8:,} bytes: {ratio:.2f}x")
    assert 3.8 < ratio < 4.0  # biases, norms and scales stay float32


def test_a_quantized_model_scores_as_its_dequantized_weights_and_leaves_the_model_alone():
    model = create_model(preset("tiny", vocab_size=100, pre_layer_norm=False, mlm_transform_head=True), seed=0)
    before = flat_params(model)
    ids = np.random.default_rng(2).integers(5, 100, (2, 12))
    batch = {"inputs": jnp.asarray(ids), "positions": jnp.tile(jnp.arange(12), (2, 1)),
             "token_types": jnp.zeros((2, 12), jnp.int32), "segment_ids": jnp.ones((2, 12), jnp.int32),
             "attention_kind": jnp.full((2, 12), PREFIX, jnp.int32)}
    weights_only = quantized_model(model, "int8_weights")
    by_hand = create_model(model.config, seed=0)
    from pretrain.hf.models import set_flat_params
    from pretrain.quantization import contracting_axes, is_quantized

    dequantized = {}
    for name, value in before.items():
        if is_quantized(name, value):
            q, scale = reference_int8(value, contracting_axes(name, value.ndim))
            dequantized[name] = q.astype(np.float32) * scale
        else:
            dequantized[name] = value
    set_flat_params(by_hand, dequantized)
    np.testing.assert_allclose(np.asarray(weights_only.logits(weights_only(batch))),
                               np.asarray(by_hand.logits(by_hand(batch))), rtol=1e-5, atol=1e-5)
    both = quantized_model(model, "int8")
    assert both.config.activation_quantization == "int8" and model.config.activation_quantization == "none"
    assert np.abs(np.asarray(both(batch)) - np.asarray(weights_only(batch))).max() > 0
    for name, value in flat_params(model).items():
        np.testing.assert_array_equal(value, before[name])
    assert not is_quantized("blocks.0.attention.qkv_bias", before["blocks.0.attention.qkv_bias"])
    assert is_quantized("blocks.0.mlp.wo", before["blocks.0.mlp.wo"]) and is_quantized("token_embedding",
                                                                                      before["token_embedding"])
    kept = {"blocks": {"0": {"attention": {"qkv_bias": jnp.ones((3, 2, 2))}}}}
    np.testing.assert_array_equal(fake_quantized(kept)["blocks"]["0"]["attention"]["qkv_bias"], jnp.ones((3, 2, 2)))


def test_evaluate_scores_a_quantized_run(tmp_path_factory, tmp_path):
    from trained_run import shared_run

    run = shared_run(tmp_path_factory)
    out = subprocess.run([sys.executable, "-m", "pretrain.evaluate", f"--workdir={run}", "--max_documents=8",
                          "--objectives=mlm", "--quantize=int8_weights", f"--output={tmp_path / 'q.json'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quantized int8_weights" in out.stdout
    quantized = json.loads((tmp_path / "q.json").read_text())
    from pretrain.evaluate import evaluate_run

    full = evaluate_run(str(run), max_documents=8, objective_names=["mlm"])
    assert quantized["quantization"] == "int8_weights" and full["quantization"] == "none"
    assert quantized["heldout"]["fingerprint"] == full["heldout"]["fingerprint"]
    loss, reference = quantized["objectives"]["mlm"]["loss"], full["objectives"]["mlm"]["loss"]
    assert loss != reference and abs(loss - reference) < 0.05 * reference


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A fine-tuned teacher on the built-in topic task (8 steps from the shared run)."""
    from pretrain.transfer import trainer as transfer
    from test_finetune import config_for, pretrained

    run = pretrained(tmp_path_factory, "mlm:1,clm:1,mass:1,unilm:1")
    workdir = tmp_path_factory.mktemp("teacher") / "topic"
    transfer.run_seeds(config_for(run), workdir)
    return run, workdir


def test_quantization_aware_fine_tuning_trains_and_scores_the_quantized_model(finetuned, tmp_path):
    from pretrain.transfer import trainer as transfer
    from test_finetune import config_for

    run, _ = finetuned
    with transfer.FinetuneTrainer(config_for(run, quantize="int8_weights"), str(tmp_path / "probe")) as trainer:
        program = trainer.program
        batch = {k: jnp.asarray(v) for k, v in next(iter(program.train_data)).items()}
        params = jax.device_get(trainer.state["params"])
        functions = [transfer.task_functions(program.graphdef, program.rest, program.task.kind, 1, program.plan, 8,
                                             quantize=scheme) for scheme in ("int8_weights", "none")]
    quantized, plain = (np.asarray(f[2](params, batch)["loss_sum"]) for f in functions)
    np.testing.assert_array_equal(quantized, np.asarray(functions[1][2](fake_quantized(params), batch)["loss_sum"]))
    assert quantized != plain  # the run trains and scores the int8 model, not the float one
    gradient = jax.grad(lambda p: functions[0][0](p, batch, (1.0, 1.0), 0)[0])(params)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(gradient) if g.ndim >= 2)  # straight through
    for scheme in ("int8_weights", "int8"):
        summary = transfer.run_seeds(config_for(run, quantize=scheme), tmp_path / scheme)
        assert 0 <= summary["test"]["accuracy"]["mean"] <= 1
        config = json.loads((tmp_path / scheme / "seed_0" / "config.json").read_text())
        assert config["quantize"] == scheme


def test_task_time_distillation_learns_the_teachers_soft_targets(finetuned, tmp_path):
    """The student (the same body, fine-tuned with the teacher's logits as soft targets)
    trains; its step's loss is hard x CE + soft x KL(teacher/T || student/T) T^2, checked
    against the teacher's and the student's logits by hand on one batch."""
    from flax import nnx

    from pretrain.transfer import trainer as transfer
    from test_finetune import config_for

    run, teacher = finetuned
    config = config_for(run, distill_from=str(teacher), **{"distill.temperature": 3.0, "distill.soft_weight": 0.7,
                                                          "distill.hard_weight": 0.4})
    with transfer.FinetuneTrainer(config, str(tmp_path / "probe")) as trainer:
        program = trainer.program
        batch = {k: jnp.asarray(v) for k, v in next(iter(program.train_data)).items()}
        params = jax.device_get(trainer.state["params"])
        loss_fn, totals_fn, _ = transfer.task_functions(program.graphdef, program.rest, program.task.kind, 1,
                                                        program.plan, 8, teacher=program.teacher,
                                                        teacher_params=program.frozen)
        totals = jax.tree.map(lambda t: jnp.maximum(t, 1.0), totals_fn(batch))
        loss, _ = loss_fn(params, batch, totals, 0)
        student, _ = nnx.merge(program.graphdef, params, program.rest)(batch)
        taught, _ = nnx.merge(program.teacher.graphdef, program.frozen, program.teacher.rest)(batch)
    labels = np.asarray(batch["task_labels"])
    where = labels >= 0
    s, t = np.asarray(student, np.float64)[where], np.asarray(taught, np.float64)[where]
    log = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)  # noqa: E731
    ce = -log(s)[np.arange(len(s)), labels[where]].sum()
    kl = (np.exp(log(t / 3)) * (log(t / 3) - log(s / 3))).sum() * 9
    np.testing.assert_allclose(float(loss), (0.4 * ce + 0.7 * kl) / where.sum(), rtol=1e-4)
    summary = transfer.run_seeds(config, tmp_path / "student")
    assert 0 <= summary["test"]["accuracy"]["mean"] <= 1
    other = config_for(run, task="pydocs_same_module", distill_from=str(teacher))
    with pytest.raises(ValueError, match="a teacher's soft targets need this run's task"):
        transfer.FinetuneTrainer(other, str(tmp_path / "other"))
