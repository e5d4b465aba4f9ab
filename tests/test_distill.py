"""Distillation (`pretrain.distill`, `pretrain.distillation`): the losses against NumPy
references on fixed numbers, the student's start from its teacher's layers bit for bit,
the step's loss against the same loss taken by hand, a run end to end (the teacher only
read, the student an ordinary run), TinyBERT's terms into a narrower student, bad
input as one message, and (slow) the command killed at seeded points losing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.distill import get_config
from pretrain.distill import DistillationTrainer
from pretrain.distillation import (DistillationWeights, cosine_sums, distillation_counts, layer_map,
                                   soft_target_sums, squared_error_sums, student_from_teacher, teacher_layers)
from pretrain.hf.models import flat_params, set_flat_params
from pretrain.inference import load_trained
from pretrain.loss import batch_loss
from pretrain.model import create_model, preset
from test_reliability import snapshot
from train_helpers import ROOT, compile_cache_env, read_metrics
from trained_run import shared_run


def distill_config(teacher: Path, **fields) -> object:
    config = get_config()
    config.teacher = str(teacher)
    for key, value in {"total_steps": 6, "checkpoint_every": 3, "log_every": 3, "eval_every": 0,
                       "optimizer.warmup_steps": 2, "sample_at_end": False, "peak_flops_per_device": 1e12,
                       **fields}.items():
        *groups, name = key.split(".")
        target = config
        for group in groups:
            target = target[group]
        target[name] = value
    return config


# -- the losses on fixed numbers ---------------------------------------------------------------

def test_soft_target_loss_on_fixed_logits_equals_the_numpy_reference():
    student = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = jnp.array([[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
    weights = jnp.array([1.0, 0.5])
    sums = soft_target_sums(student, teacher, weights, temperature=2.0)
    # KL(softmax(t/2) || softmax(s/2)) * 2^2 per row: 0.41851687, 0.50808635 (NumPy, by hand)
    np.testing.assert_allclose(float(sums["loss_sum"]), 1.0 * 0.41851687 + 0.5 * 0.50808635, rtol=1e-6)
    assert float(sums["correct_sum"]) == 0.5  # the top tokens agree in the second row only
    assert float(sums["weight_sum"]) == 1.5

    def reference(s, t, temperature):
        log = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))  # noqa: E731
        p = np.exp(log(t / temperature))
        return (p * (log(t / temperature) - log(s / temperature))).sum(-1) * temperature ** 2

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 11)) * 3, rng.normal(size=(2, 5, 11)) * 3
    w = (rng.random((2, 5)) > 0.4).astype(np.float32)
    for temperature in (1.0, 2.0, 5.0):
        got = soft_target_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temperature)["loss_sum"]
        np.testing.assert_allclose(float(got), (w * reference(s, t, temperature)).sum(), rtol=1e-5)


def test_cosine_and_squared_error_sums_equal_their_references():
    a = jnp.array([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0], [9.0, 9.0, 9.0]])
    b = jnp.array([[2.0, 0.0, 4.0], [0.0, 1.0, 1.0], [1.0, -5.0, 2.0]])
    tokens = jnp.array([True, True, False])  # the third is padding
    sums = cosine_sums(a, b, tokens)
    np.testing.assert_allclose(float(sums["loss_sum"]), (1 - 1.0) + (1 - 0.56568542), rtol=1e-6)
    np.testing.assert_allclose(float(sums["correct_sum"]), 1.56568542, rtol=1e-6)
    assert float(sums["weight_sum"]) == 2.0
    squared = squared_error_sums(a, b, tokens[:, None])
    assert float(squared["loss_sum"]) == 1 + 4 + 9 + 9 + 1  # rows 1 and 2 only
    assert float(squared["weight_sum"]) == 6


def test_teacher_layer_choices_follow_distilbert_code_and_paper():
    assert teacher_layers(12, 6, "distilbert") == (0, 2, 4, 7, 9, 11)  # extract_distilbert.py's
    assert teacher_layers(12, 6, "every_other") == (0, 2, 4, 6, 8, 10)  # the paper's one layer out of two
    assert teacher_layers(4, 2, "distilbert") == (0, 3)
    assert teacher_layers(4, 1, "distilbert") == (0,)
    assert layer_map(12, 4) == ((0, 3, 6, 9, 12), (2, 5, 8, 11))  # TinyBERT's uniform map
    with pytest.raises(ValueError, match="at most 2 layers, not 3"):
        teacher_layers(4, 3, "every_other")
    with pytest.raises(ValueError, match="between 1 and the teacher's layers"):
        teacher_layers(4, 5, "distilbert")


@pytest.mark.parametrize("choice", ["every_other", "distilbert"])
@pytest.mark.parametrize("scan", [False, True])
def test_a_student_from_every_other_teacher_layer_holds_those_layers_bit_for_bit(choice, scan):
    teacher = create_model(preset("tiny", num_layers=4, vocab_size=300, heads=("pair_classifier",)), seed=0)
    student = create_model(preset("tiny", num_layers=2, vocab_size=300, heads=("pair_classifier",),
                                  scan_layers=scan), seed=1)
    layers = teacher_layers(4, 2, choice)
    set_flat_params(student, student_from_teacher(flat_params(teacher), flat_params(student), layers))
    theirs, ours = flat_params(teacher), flat_params(student)
    for name, value in ours.items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            np.testing.assert_array_equal(value, theirs[f"blocks.{layers[int(index)]}.{rest}"])
        else:
            np.testing.assert_array_equal(value, theirs[name])
    assert sorted(name.split(".")[1] for name in ours if name.endswith("mlp.wi")) == ["0", "1"]


# -- the step's loss, a run ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)  # tiny, 2 layers, trained on mlm, clm, mass and unilm


def test_the_step_loss_is_the_distilbert_loss_taken_by_hand(teacher, tmp_path):
    """On a real batch of the teacher's mixture (masked and causal rows), the step's loss is
    hard x the objective's loss + soft x KL(teacher/T || student/T) T^2 over the weighted
    positions / their weight + cosine x the mean (1 - cos) over the real tokens, each
    computed here from the two models' full outputs."""
    weights = DistillationWeights(temperature=3.0, soft_weight=5.0, hard_weight=2.0, cosine_weight=1.5)
    config = distill_config(teacher, **{f"distill.{k}": v for k, v in vars(weights).items()})
    with DistillationTrainer(config, str(tmp_path / "student")) as trainer:
        program = trainer.program
        batch = {k: jnp.asarray(v) for k, v in next(iter(program.train_data)).items()}
        totals = jax.tree.map(lambda t: jnp.maximum(t, 1.0), distillation_counts(
            batch, program.pipeline.mixture.loss_terms, program.model_config.num_heads))
        params = jax.device_get(trainer.state["params"])
        loss, stats = program._loss(program.frozen)(params, batch, totals, 0)
        student = nnx.merge(program.graphdef, params, program.rest)
        teacher_model = load_trained(teacher).model
    hard, _ = batch_loss(student, batch, len(program.names), terms=program.pipeline.mixture.loss_terms)
    hidden_s, hidden_t = np.asarray(student(batch)), np.asarray(teacher_model(batch))
    s, t = np.asarray(student.logits(hidden_s)) / 3.0, np.asarray(teacher_model.logits(hidden_t)) / 3.0
    log = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)  # noqa: E731
    kl = (np.exp(log(t)) * (log(t) - log(s))).sum(-1) * 9.0
    w = np.asarray(batch["weights"])
    tokens = np.asarray(batch["segment_ids"]) > 0
    cos = (hidden_s * hidden_t).sum(-1) / np.sqrt(((hidden_s ** 2).sum(-1) + 1e-12) * ((hidden_t ** 2).sum(-1) + 1e-12))
    want = 2.0 * float(hard) + 5.0 * (w * kl).sum() / w.sum() + 1.5 * (1 - cos)[tokens].sum() / tokens.sum()
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    assert {"distill_soft", "distill_cosine"} <= set(stats["terms"])
    weighed = set(np.asarray(batch["objective_id"])[w > 0].tolist())
    names = program.names
    assert names.index("mlm") in weighed, "masked rows weigh"
    assert weighed & {names.index("clm"), names.index("unilm/left_to_right")}, "causal rows weigh"


def test_a_distillation_run_reads_its_teacher_only_and_leaves_an_ordinary_run(teacher, tmp_path):
    untouched = snapshot(teacher)
    workdir = tmp_path / "student"
    config = distill_config(teacher)
    with DistillationTrainer(config, str(workdir)) as trainer:
        start = flat_params(nnx.merge(trainer.program.graphdef, jax.device_get(trainer.state["params"]),
                                      trainer.program.rest))
    teacher_params = flat_params(load_trained(teacher).model)
    assert sorted({name.split(".")[1] for name in start if name.startswith("blocks.")}) == ["0"]  # half of 2
    for name, value in start.items():  # the student's one layer is the teacher's first ('distilbert': 0 of 0..1)
        np.testing.assert_array_equal(value, teacher_params[name])
    assert DistillationTrainer(config, str(workdir)).run() == 6
    assert snapshot(teacher) == untouched, "the teacher's directory is only read"
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == [3, 6]
    assert {"loss/distill_soft", "accuracy/distill_soft", "loss/distill_cosine", "eval/loss",
            "eval/accuracy/distill_soft"} <= set(rows[-1])
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["distill"]["teacher"] == str(teacher) and recorded["distill"]["teacher_layers"] == [0]
    assert recorded["model"]["num_layers"] == 1 and recorded["objective"] == "mlm:1,clm:1,mass:1,unilm:1"
    student = load_trained(workdir)  # an ordinary run: no teacher parameters in its checkpoints
    assert student.step == 6 and set(flat_params(student.model)) == set(start)


def test_tinybert_terms_train_a_narrower_student_through_a_projection(teacher, tmp_path):
    config = distill_config(teacher, total_steps=2, checkpoint_every=2, log_every=1,
                            **{"student.model_dim": 32, "student.mlp_dim": 128, "student.num_layers": 1,
                               "distill.cosine_weight": 0.0, "distill.hidden_weight": 1.0,
                               "distill.attention_weight": 1.0})
    workdir = tmp_path / "tiny-student"
    assert DistillationTrainer(config, str(workdir)).run() == 2
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["distill"]["init"] == "random" and recorded["model"]["hidden_projection_dim"] == 64
    assert "hidden_projection" in recorded["model"]["heads"]
    student = load_trained(workdir).model
    assert student.head("hidden_projection").kernel.shape == (32, 64)
    row = read_metrics(workdir)[-1]
    assert row["loss/distill_hidden"] > 0 and row["loss/distill_attention"] > 0 and "loss/distill_cosine" not in row


def run_distill(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.distill", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, XLA_FLAGS="", **(env or {})))


def test_bad_distillation_input_is_one_message(teacher, tmp_path):
    missing = run_distill(f"--config.teacher={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'a'}")
    assert missing.returncode != 0 and "--config.teacher" in missing.stderr and "Traceback" not in missing.stderr
    narrow = run_distill(f"--config.teacher={teacher}", f"--workdir={tmp_path / 'b'}", "--config.student.model_dim=32",
                         "--config.student.mlp_dim=128")
    assert narrow.returncode != 0 and "config.distill.cosine_weight" in narrow.stderr, narrow.stderr[-2000:]
    assert "Traceback" not in narrow.stderr and not (tmp_path / "b").exists()
    config = distill_config(teacher, **{"student.init": "teacher", "student.model_dim": 32})
    with pytest.raises(ValueError, match="config.student.init='teacher' needs the teacher's width"):
        DistillationTrainer(config, str(tmp_path / "c"))
    from pretrain.train import Trainer
    from train_helpers import tiny_config

    recorded = tiny_config()
    recorded.distill = {"teacher": str(teacher)}
    with pytest.raises(ValueError, match="config.distill is set"):
        Trainer(recorded, str(tmp_path / "d"))


# -- SIGKILL (slow) --------------------------------------------------------------------------------

@pytest.mark.slow
def test_distillation_under_fire_loses_nothing(tmp_path_factory, tmp_path):
    """The distillation command killed (SIGKILL) at twelve seeded points (start-up, a step,
    mid-save, just after a save) and rerun each time ends with the uninterrupted run's
    parameters, optimizer state and data state bit for bit and the same losses, and the
    teacher it reads is untouched."""
    from pretrain.checkpoint import Checkpointer
    from test_reliability import KILL_SEED, kill_kinds, kill_repeatedly
    from train_helpers import Watched

    teacher = shared_run(tmp_path_factory)
    untouched = snapshot(teacher)
    total, every = 40, 5
    base = [f"--config.teacher={teacher}", f"--config.total_steps={total}", f"--config.checkpoint_every={every}",
            "--config.log_every=1", "--config.optimizer.warmup_steps=5", "--config.sample_at_end=False",
            "--config.peak_flops_per_device=1e12"]
    cache = compile_cache_env(tmp_path / "jax-cache")
    reference = run_distill(*base, f"--workdir={tmp_path / 'reference'}", env=cache)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"

    def launch() -> Watched:
        return Watched(subprocess.Popen([sys.executable, "-m", "pretrain.distill", *base, f"--workdir={killed}"],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, XLA_FLAGS="", **cache)))

    report = kill_repeatedly(launch, killed / "checkpoints", kill_kinds(KILL_SEED), total, every, KILL_SEED)
    assert len(report) >= 12
    rerun = run_distill(*base, f"--workdir={killed}", env=cache)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert snapshot(teacher) == untouched, "the teacher is only read"
    records = [read_metrics(d) for d in (tmp_path / "reference", killed)]
    assert [r["step"] for r in records[1]] == list(range(1, total + 1)), "every step logged once"
    assert [(r["step"], r["loss"]) for r in records[0]] == [(r["step"], r["loss"]) for r in records[1]]
    config = distill_config(teacher, total_steps=total, checkpoint_every=every)
    with DistillationTrainer(config, str(tmp_path / "probe-restore")) as trainer:
        states = [Checkpointer(d).restore(trainer.abstract_state) for d in (tmp_path / "reference", killed)]
    assert states[0][0] == states[1][0] == total
    assert states[0][2] == states[1][2], "data-iterator state"
    for x, y in zip(jax.tree.leaves(states[0][1]), jax.tree.leaves(states[1][1]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pmap_distils_with_the_teacher_on_every_device(teacher, tmp_path):
    """Under pmap the teacher's parameters go to every device once; the step's losses are
    pjit's (the same global batch and loss, summed across devices)."""
    losses = {}
    for parallelism in ("pjit", "pmap"):
        workdir = tmp_path / parallelism
        config = distill_config(teacher, total_steps=2, checkpoint_every=2, log_every=1, parallelism=parallelism)
        assert DistillationTrainer(config, str(workdir)).run() == 2
        losses[parallelism] = [(row["step"], row["loss"], row["loss/distill_soft"]) for row in read_metrics(workdir)]
    np.testing.assert_allclose(np.asarray(losses["pmap"]), np.asarray(losses["pjit"]), rtol=1e-5)
