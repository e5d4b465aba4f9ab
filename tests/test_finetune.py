"""Fine-tuning end to end on tiny pretrained runs: the body restored bit for bit with a new
head, frozen parameters bit-identical, unfreezing inside the compiled step, fusion, packed
equal to unpacked, every head, seeds and selection, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs.finetune import get_config
from pretrain import finetune
from pretrain.inference import model_config, read_run_config, restore_params
from pretrain.model import create_model
from pretrain.tokenizer import load_tokenizer
from pretrain.train import Trainer
from pretrain.transfer import heads, tasks, trainer as transfer
from train_helpers import ROOT, checkpoint_steps, compile_cache_env, read_metrics, shared_tokenizer, tiny_config
from trained_run import shared_run

_RUNS: dict[str, str] = {}


def pretrained(factory, objective: str = "mlm") -> str:
    """A tiny run of `objective` (10 steps, pydocs, the session's tokenizer), made once."""
    if objective not in _RUNS:
        if objective == "mlm:1,clm:1,mass:1,unilm:1":
            _RUNS[objective] = str(shared_run(factory))
        else:
            workdir = factory.mktemp(f"pretrained_{objective}")
            shutil.copy(shared_tokenizer(factory), workdir / "tokenizer.model")
            Trainer(tiny_config(objective, total_steps=10, checkpoint_every=10, peak_flops_per_device=1e12),
                    str(workdir)).run()
            _RUNS[objective] = str(workdir)
    return _RUNS[objective]


def config_for(init: str, task: str = "pydocs_topic", method: str = "full", **overrides):
    """A tiny fine-tuning config: few examples, short rows, 8 steps."""
    config = get_config(f"task={task},method={method}")
    config.init = init
    fields = dict(seq_len=64, batch_size=8, total_steps=8, log_every=4, eval_every=4, checkpoint_every=4,
                  task_max_examples=48, peak_flops_per_device=1e12, seeds=(0,), **{"optimizer.learning_rate": 1e-3})
    for key, value in {**fields, **overrides}.items():
        *groups, name = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[name] = value
    return config


def parameters(tree) -> dict[tuple, np.ndarray]:
    return {heads.path_of(keys): np.asarray(leaf) for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoint_body(run: str) -> dict[tuple, np.ndarray]:
    """The run's newest checkpointed parameters, under the task model's body paths."""
    config = read_run_config(run)
    model = create_model(model_config(config, load_tokenizer(os.path.join(run, "tokenizer.model")).vocab_size),
                         seed=123)
    restore_params(run, model)
    return {("bodies", 0, *path): value for path, value in parameters(nnx.state(model, nnx.Param)).items()}


def test_the_body_is_restored_bit_for_bit_and_the_head_is_new(tmp_path_factory, tmp_path):
    run = pretrained(tmp_path_factory)
    with transfer.FinetuneTrainer(config_for(run), str(tmp_path / "ft")) as trainer:
        state = parameters(trainer.state["params"])
        head = state[("head_kernel",)]
    expected = checkpoint_body(run)
    assert set(expected) == {path for path in state if path[0] == "bodies"}
    for path, value in expected.items():
        np.testing.assert_array_equal(state[path], value, err_msg=str(path))
    fresh = heads.TaskModel([create_model(model_config(read_run_config(run), 400), seed=5)], ["bidirectional"],
                            ["first"], head.shape[1], per_token=False, seed=0)
    np.testing.assert_array_equal(head, np.asarray(fresh.head_kernel[...]))  # the head depends on the seed alone
    assert head.shape == (64, len(trainer.program.task.labels)) and np.abs(head).max() < 0.2


def test_a_body_that_is_not_its_runs_shape_or_not_a_run_is_refused(tmp_path_factory, tmp_path):
    run = tmp_path / "edited"
    shutil.copytree(pretrained(tmp_path_factory), run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["num_layers"] = 3
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the checkpoint at step 10 in .*/edited was written by a model of another "
                                         r"shape: model.num_layers is 2 there and 3 here. The body's shape comes from "
                                         r"config.json"):
        transfer.FinetuneTrainer(config_for(str(run)), str(tmp_path / "ft1"))
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match=r"edited has no checkpoints/ directory: the run has not saved"):
        transfer.FinetuneTrainer(config_for(str(run)), str(tmp_path / "ft2"))
    with pytest.raises(FileNotFoundError, match=r"config.json is missing, so .*/ft1 is not a training run"):
        transfer.FinetuneTrainer(config_for(str(tmp_path / "ft1")), str(tmp_path / "ft3"))


def run_steps(trainer, steps: int) -> list[dict[tuple, np.ndarray]]:
    """The parameters after each of `steps` compiled train steps."""
    iterator, history = iter(trainer.program.train_data), []
    for _ in range(steps):
        trainer.state, _ = trainer.train_step(trainer.state, trainer.strategy.put_batch(next(iterator)))
        history.append(parameters(trainer.state["params"]))
    return history


def test_probe_leaves_every_body_parameter_bit_identical(tmp_path_factory, tmp_path):
    run = pretrained(tmp_path_factory)
    with transfer.FinetuneTrainer(config_for(run, method="probe", **{"methods.probe.scalar_mix": True}),
                                  str(tmp_path / "ft")) as trainer:
        before = parameters(trainer.state["params"])
        after = run_steps(trainer, 3)[-1]
    for path, value in before.items():
        if path[0] == "bodies":
            np.testing.assert_array_equal(after[path], value, err_msg=str(path))
    assert not np.array_equal(after[("head_kernel",)], before[("head_kernel",)])
    assert not np.array_equal(after[("mixes", 0, "weights")], before[("mixes", 0, "weights")])  # ELMo's mix trains


def test_gradual_unfreezing_inside_the_compiled_step(tmp_path_factory, tmp_path):
    """Tiny bodies have depths 0 (head) .. 3 (embeddings); one more group every 2 steps,
    so group d may change from step 2d + 1 on (the head from step 2: warmup's first
    rate is 0), with no recompilation."""
    run = pretrained(tmp_path_factory)
    config = config_for(run, method="gradual_unfreezing", **{"methods.gradual_unfreezing.every_steps": 2})
    with transfer.FinetuneTrainer(config, str(tmp_path / "ft")) as trainer:
        depths = heads.parameter_depths(trainer.state["params"], [2])
        history = [parameters(trainer.state["params"]), *run_steps(trainer, 8)]
        assert trainer.train_step._cache_size() == 1
    for path, depth in depths.items():
        changed = [not np.array_equal(history[s][path], history[s - 1][path]) for s in range(1, 9)]
        first = max(2 * depth, 1) + 1
        assert not any(changed[: first - 1]), (path, changed)
        if path[-1] not in ("output_bias", "type_embedding", "position_embedding"):  # may see no gradient
            assert changed[first - 1], (path, changed)


@pytest.mark.parametrize("method", ["probe", "full"])
def test_fused_bodies_are_probed_frozen_or_fine_tuned_jointly_and_the_gate_mixes_them(tmp_path_factory, tmp_path,
                                                                                      method):
    """An MLM-family body (bidirectional view) and a causal LM (causal view) read one batch;
    probe trains only the gate and head, full trains the bodies with them (model stitching's
    second stage)."""
    runs = [pretrained(tmp_path_factory, "mlm:1,clm:1,mass:1,unilm:1"), pretrained(tmp_path_factory, "clm")]
    config = config_for(",".join(runs), fusion="gate", method=method)
    with transfer.FinetuneTrainer(config, str(tmp_path / "ft")) as trainer:
        assert [b.layout for b in trainer.program.bodies] == ["bidirectional", "causal"]
        assert [b.pooling for b in trainer.program.bodies] == ["mean", "mean"]
        before = parameters(trainer.state["params"])
        after = run_steps(trainer, 2)[-1]
        model = nnx.merge(trainer.program.graphdef, trainer.state["params"], trainer.program.rest)
        batch = trainer.program.eval_data["dev"][0]
        pooled = [heads.pool(model.body_hidden(batch, i), batch["segment_ids"], p)
                  for i, p in enumerate(model.poolings)]
        weights = np.asarray(model.gate.weights(pooled))
        real = np.asarray(batch["segment_ids"]) > 0
        assert weights.shape == (*batch["inputs"].shape, 2) and weights[real].min() > 1e-3  # both bodies weigh in
        assert np.ptp(weights[real][:, 0]) > 1e-4  # per example, not one global gate
        mixed = sum(weights[..., i : i + 1] * (np.asarray(f) @ np.asarray(p[...]))
                    for i, (f, p) in enumerate(zip(pooled, model.gate.projections)))
        np.testing.assert_allclose(np.asarray(model(batch)[0]), mixed @ np.asarray(model.head_kernel[...])
                                   + np.asarray(model.head_bias[...]), rtol=1e-4, atol=1e-5)  # the head reads the mix
    bodies = [path for path in before if path[0] == "bodies"]
    changed = [path for path in bodies if not np.array_equal(after[path], before[path])]
    if method == "probe":
        assert changed == []  # bit for bit
    else:
        assert {path[1] for path in changed} == {0, 1} and len(changed) > len(bodies) // 2
    assert not np.array_equal(after[("gate", "kernel")], before[("gate", "kernel")])


@pytest.mark.parametrize("task", ["pydocs_topic", "pydocs_same_module", "pydocs_code_spans", "pydocs_qa"])
def test_packed_and_unpacked_rows_give_the_same_predictions(tmp_path_factory, tmp_path, task):
    run = pretrained(tmp_path_factory)
    results = []
    for packed in (True, False):
        with transfer.FinetuneTrainer(config_for(run, task=task, packed=packed, pooling="concat", seq_len=256),
                                      str(tmp_path / f"ft-{packed}")) as trainer:
            params = trainer.strategy.unreplicate(trainer.state["params"])
            score = lambda batch: jax.device_get(trainer.eval_step(params, trainer.strategy.put_eval_batch(batch)))
            gold, predicted, loss, count = trainer.program.predict(score, "dev")
            rows = sum(len(b["inputs"]) for b in trainer.program.eval_data["dev"])
            results.append((predicted, loss / count, rows))
    assert results[0][0] == results[1][0]
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    assert results[0][2] <= results[1][2]
    if task == "pydocs_code_spans":  # short sentences: packing must have used fewer rows
        assert results[0][2] < results[1][2]


def run_command(argv, env=None):
    return subprocess.run([sys.executable, "-m", "pretrain.finetune", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, XLA_FLAGS="", **(env or {})))


def flags_of(config_fields: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in config_fields.items()]


def test_seeds_give_mean_and_std_at_the_dev_selected_step_and_a_rerun_trains_nothing(tmp_path_factory, tmp_path):
    run = pretrained(tmp_path_factory)
    config = config_for(run, task="pydocs_code_spans", method="aux_lm", seeds=(0, 1))
    summary = transfer.run_seeds(config, tmp_path / "ft")
    results = [json.loads((tmp_path / "ft" / f"seed_{s}" / "result.json").read_text()) for s in (0, 1)]
    for seed, result in zip((0, 1), results):
        records = [r for r in read_metrics(tmp_path / "ft" / f"seed_{seed}") if "eval/dev/span_f1" in r]
        best = max(records, key=lambda r: (r["eval/dev/span_f1"], -r["step"]))
        assert result["selected_step"] == best["step"] and result["test"]["span_f1"] == best["eval/test/span_f1"]
        assert {"loss/task", "loss/mlm"} <= set(read_metrics(tmp_path / "ft" / f"seed_{seed}")[0])  # the auxiliary LM
    values = [r["test"]["span_f1"] for r in results]
    assert summary["test"]["span_f1"]["per_seed"] == values
    assert summary["test"]["span_f1"]["mean"] == pytest.approx(np.mean(values))
    assert summary["test"]["span_f1"]["std"] == pytest.approx(np.std(values, ddof=1))
    stamp = os.path.getmtime(tmp_path / "ft" / "seed_1" / "metrics.jsonl")
    assert transfer.run_seeds(config, tmp_path / "ft") == summary
    assert os.path.getmtime(tmp_path / "ft" / "seed_1" / "metrics.jsonl") == stamp


def test_regression_and_pair_files_train_and_report_their_metrics(tmp_path_factory, tmp_path):
    run = pretrained(tmp_path_factory)
    rng = np.random.default_rng(0)
    words = "the list of items in a module returns value when called with keys".split()
    for split, count in (("train", 40), ("dev", 16), ("test", 16)):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(count):
                text = " ".join(rng.choice(words, 6))
                handle.write(json.dumps({"text": text, "text_b": text[::-1], "label": float(len(set(text.split())))})
                             + "\n")
    config = config_for(run, task="files", task_path=str(tmp_path), task_kind="regression")
    summary = transfer.run_seeds(config, tmp_path / "ft")
    assert set(summary["test"]) == {"pearson", "spearman", "loss"} and summary["metric"] == "pearson"


QA_ROWS = [  # two questions on one passage: the question, not the passage, tells the answer
    ("What is fun of onkey?", "fun -- a function with no arguments. key -- a string naming the key.",
     "a function with no arguments"),
    ("What is key of onkey?", "fun -- a function with no arguments. key -- a string naming the key.",
     "a string naming the key"),
    ("What is t of ontimer?", "fun -- the function to call. t -- a number of milliseconds.",
     "a number of milliseconds"),
    ("What is size of resize?", "size -- the new size in pixels. bg -- the colour to fill with.",
     "the new size in pixels")]


def test_a_tiny_model_learns_a_handful_of_qa_examples_to_exact_match(tmp_path_factory, tmp_path):
    """Extractive QA from a `files` task in SQuAD's fields, end to end: the start and end
    logits of four examples are learnt until every answer is read back exactly."""
    run = pretrained(tmp_path_factory)
    for split in ("train", "dev", "test"):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for question, context, answer in QA_ROWS:
                handle.write(json.dumps({"question": question, "context": context,
                                         "answers": [{"text": answer, "answer_start": context.index(answer)}]}) + "\n")
    config = config_for(run, task="files", task_path=str(tmp_path), seq_len=128, batch_size=8, total_steps=120,
                        eval_every=120, checkpoint_every=120, log_every=40,
                        **{"optimizer.learning_rate": 3e-3, "optimizer.weight_decay": 0.0})
    summary = transfer.run_seeds(config, tmp_path / "ft")
    assert summary["metric"] == "exact_match"
    assert summary["test"]["exact_match"]["mean"] == 1.0 and summary["test"]["answer_f1"]["mean"] == 1.0
    assert summary["test"]["loss"]["mean"] < 0.05


def test_the_builtin_qa_task_fine_tunes_end_to_end(tmp_path_factory, tmp_path):
    """pydocs_qa through the command's own path (seeds, evaluation, result.json): the
    rows hold answers to learn from, and the scores are SQuAD's."""
    run = pretrained(tmp_path_factory)
    config = config_for(run, task="pydocs_qa", seq_len=256)
    with transfer.FinetuneTrainer(config, str(tmp_path / "rows")) as trainer:
        assert trainer.program.task.kind == "span_qa" and trainer.program.task.num_outputs == 2
        starts = sum(float(trainer.program.task.kind_spec.count(batch)) for batch in trainer.program.eval_data["dev"])
        assert starts >= 0.5 * len(trainer.program.task.splits["dev"])  # most dev answers lie inside their rows
    summary = transfer.run_seeds(config, tmp_path / "ft")
    assert summary["metric"] == "exact_match" and set(summary["test"]) == {"exact_match", "answer_f1", "loss"}
    result = json.loads((tmp_path / "ft" / "seed_0" / "result.json").read_text())
    assert result["baselines"] == {} and 0.0 <= result["test"]["answer_f1"] <= 1.0
    assert np.isfinite(result["test"]["loss"])


def test_finetuning_resumes_bit_identically_after_sigkill(tmp_path_factory, tmp_path):
    run = pretrained(tmp_path_factory)
    fields = dict(init=run, seq_len=64, batch_size=8, total_steps=24, log_every=1, eval_every=12, checkpoint_every=6,
                  task_max_examples=48, peak_flops_per_device=1e12, seeds="(0,)")
    base = ["--config=configs/finetune.py:task=pydocs_topic,method=discriminative+stlr", *flags_of(fields)]
    cache = compile_cache_env(tmp_path / "jax-cache")
    reference = run_command([*base, f"--workdir={tmp_path / 'reference'}"], cache)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pretrain.finetune", *base, f"--workdir={killed}"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, XLA_FLAGS="", **cache))
    for line in process.stdout:
        if line.startswith("step 20/"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert checkpoint_steps(killed / "seed_0")[-1] in (6, 12, 18)  # killed mid-run (an async save may be lost)
    rerun = run_command([*base, f"--workdir={killed}"], cache)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "reference", killed))
    assert a["test"] == b["test"]
    for directory in ("reference", "killed"):
        assert [r["step"] for r in read_metrics(tmp_path / directory / "seed_0")] == list(range(1, 25))
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / d / "seed_0")} for d in ("reference", "killed")]
    assert losses[0] == losses[1]
    config = config_for(run, method="discriminative+stlr", total_steps=24, checkpoint_every=6, eval_every=12)
    with transfer.FinetuneTrainer(config, str(tmp_path / "probe-restore")) as trainer:
        from pretrain.checkpoint import Checkpointer  # the final states of both runs, bit for bit

        states = [Checkpointer(tmp_path / d / "seed_0").restore(trainer.abstract_state)
                  for d in ("reference", "killed")]
    assert states[0][0] == states[1][0] == 24
    for x, y in zip(jax.tree.leaves(states[0][1]), jax.tree.leaves(states[1][1]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


CLI_CASES = {
    "unknown task": (["--config.task=sst2"], r"config.task='sst2' is not a task; choose one of pydocs_topic, "),
    "unknown method": (["--config.method=ulmfit"], r"config.method='ulmfit': unknown method 'ulmfit'; choose from"),
    "files without a path": (["--config.task=files"], r"config.task_path is empty but config.task='files'"),
    "no body and no shape": (["--config.init="], r"config.init is empty \(random initialisation\) and "
                                                 r"config.shape_from is empty"),
    "aux_lm with probe": (["--config.method=probe+aux_lm", "--config.init=x"],
                          r"aux_lm trains one body with its language-model loss, so it cannot be combined with "
                          r"probe"),
    "misspelt field": (["--config.learning_rate=1"], r"config has no field 'learning_rate'; its fields: "),
    "unknown task kind": (["--config.task_kind=sentiment"], r"config.task_kind='sentiment' is not a task kind; known "
                                                             r"kinds: auto, classification, pair, "),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_bad_finetuning_input_is_one_line(tmp_path, name):
    flags, message = CLI_CASES[name]
    with pytest.raises(SystemExit) as stopped:
        finetune.main(["finetune", f"--workdir={tmp_path}", "--config.init=runs/none", *flags])
    text = str(stopped.value.code)
    assert text.startswith("error: ") and "Traceback" not in text, text
    assert __import__("re").search(message, text), text


@pytest.mark.parametrize("glue, metrics, test_splits", [("sst2", {"accuracy", "macro_f1", "mcc"}, ["test"]),
                                                        ("stsb", {"pearson", "spearman"}, ["test"]),
                                                        ("mnli", {"accuracy", "macro_f1", "f1", "mcc"},
                                                         ["test", "test_mismatched"])])
def test_glue_through_tfds_from_a_prepared_data_dir(tmp_path_factory, tmp_path, glue, metrics, test_splits):
    """A GLUE-shaped TFDS dataset built locally (tests/tfds_fixture.py), read by the same code
    a prepared `glue/<task>` is: its validation split is the test split; MNLI's matched
    one is, and its mismatched one is scored and reported beside it (`test_mismatched`),
    at every evaluation, in result.json, summary.json and the printed summary."""
    import tfds_fixture

    name = tfds_fixture.prepare_glue(tmp_path / "tfds", glue)
    config = config_for(pretrained(tmp_path_factory), task="tfds", task_tfds_name=name,
                        task_tfds_data_dir=str(tmp_path / "tfds"), dev_fraction=0.3)
    summary = transfer.run_seeds(config, tmp_path / "ft")
    result = json.loads((tmp_path / "ft" / "seed_0" / "result.json").read_text())
    assert result["task"] == name and result["metric"] == ("pearson" if glue == "stsb" else "accuracy")
    assert result["test_splits"] == summary["test_splits"] == test_splits
    selected = next(r for r in read_metrics(tmp_path / "ft" / "seed_0")
                    if r["step"] == result["selected_step"] and "eval/dev/loss" in r)
    printed = transfer.format_summary(summary).splitlines()
    for split in test_splits:
        assert result[split] == {k.split("/")[2]: v for k, v in selected.items() if k.startswith(f"eval/{split}/")}
        assert set(result[split]) == set(summary[split]) == metrics | {"loss"}
        assert {m: s["per_seed"] for m, s in summary[split].items()} == {m: [v] for m, v in result[split].items()}
    if glue == "mnli":
        value = result["test_mismatched"]["accuracy"]
        at = printed.index("  test_mismatched:")
        assert f"    accuracy        {value:.4f} ± n/a   ({value:.4f})" in printed[at:]
    with pytest.raises(FileNotFoundError, match=r"TFDS dataset 'glue/cola' is not prepared as ArrayRecord in .*tfds.*: "
                                                r"prepare it on a machine with network"):
        tasks.load_task(config_for("", task="tfds", task_tfds_name="glue/cola",
                                      task_tfds_data_dir=str(tmp_path / "tfds")))


def test_pretraining_beats_the_random_init_control_on_the_topic_task(tmp_path_factory, tmp_path):
    """A tiny MLM pretrained 1,000 steps on 64-token rows (past the masked-LM plateau; under
    a minute here) against the same shape and tokenizer from random initialisation, each
    fine-tuned alike over 2 seeds (150 steps). Both pool with ULMFiT's concat pooling: an
    MLM without NSP never trains its [CLS], so first-token pooling reads a position the
    body learnt to ignore, and at this scale a random body's near-uniform attention pools
    better (measured when written: macro-F1 0.030 against 0.060). With concat pooling,
    measured when written over seeds 0-2: test loss 3.298 ± 0.013 against 3.450 ± 0.057 (every
    pretrained seed below every control seed; over seeds 0 and 1, 3.301 against 3.409),
    macro-F1 0.069 against 0.058; asserted: the mean test loss over seeds 0 and 1 lower by
    0.05."""
    run = tmp_path_factory.mktemp("mlm_1000")
    config = tiny_config("mlm", total_steps=1000, batch_size=32, checkpoint_every=1000, log_every=250,
                         peak_flops_per_device=1e12, **{"tokenizer.vocab_size": 2000, "data.heldout_fraction": 0.1,
                                                        "optimizer.warmup_steps": 50})
    Trainer(config, str(run)).run()
    scores = {}
    for name, init, shape in (("pretrained", str(run), ""), ("control", "", str(run))):
        tune = config_for(init, shape_from=shape, pooling="concat", total_steps=150, eval_every=150,
                          checkpoint_every=150, batch_size=32, task_max_examples=0, seeds=(0, 1))
        scores[name] = transfer.run_seeds(tune, tmp_path / name)["test"]
    assert scores["pretrained"]["loss"]["mean"] < scores["control"]["loss"]["mean"] - 0.05, scores


@pytest.mark.slow
def test_finetuning_under_fire_loses_nothing(tmp_path_factory, tmp_path):
    """The fine-tuning command killed (SIGKILL) at fourteen seeded points: three each at
    start-up, at a step, mid-save and just after a save, and twice while it restores its
    pretrained body; rerun each time, it ends with the uninterrupted run's test scores,
    metrics and final state, bit for bit, and the pretrained run it reads is untouched."""
    from test_reliability import KILL_SEED, kill_kinds, kill_repeatedly, snapshot
    from train_helpers import Watched

    run = pretrained(tmp_path_factory)
    untouched = snapshot(Path(run))
    total, every = 40, 5
    fields = dict(init=run, seq_len=64, batch_size=8, total_steps=total, log_every=1, eval_every=20,
                  checkpoint_every=every, task_max_examples=48, peak_flops_per_device=1e12, seeds="(0,)")
    base = ["--config=configs/finetune.py:task=pydocs_topic,method=discriminative+stlr", *flags_of(fields)]
    cache = compile_cache_env(tmp_path / "jax-cache")
    reference = run_command([*base, f"--workdir={tmp_path / 'reference'}"], cache)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"

    def launch() -> Watched:
        return Watched(subprocess.Popen([sys.executable, "-m", "pretrain.finetune", *base, f"--workdir={killed}"],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, XLA_FLAGS="", **cache)))

    report = kill_repeatedly(launch, killed / "seed_0" / "checkpoints", kill_kinds(KILL_SEED, ("body", "body")),
                             total, every, KILL_SEED)
    assert sum(point.kind == "body" for point in report) == 2
    rerun = run_command([*base, f"--workdir={killed}"], cache)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert snapshot(Path(run)) == untouched, "the pretrained run is only read"
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "reference", killed))
    assert a["test"] == b["test"]
    records = [read_metrics(tmp_path / d / "seed_0") for d in ("reference", "killed")]
    assert [r["step"] for r in records[1]] == list(range(1, total + 1)), "every step logged once"
    assert [(r["step"], r["loss"]) for r in records[0]] == [(r["step"], r["loss"]) for r in records[1]]
    config = config_for(run, method="discriminative+stlr", total_steps=total, checkpoint_every=every, eval_every=20)
    with transfer.FinetuneTrainer(config, str(tmp_path / "probe-restore")) as trainer:
        from pretrain.checkpoint import Checkpointer

        states = [Checkpointer(tmp_path / d / "seed_0").restore(trainer.abstract_state)
                  for d in ("reference", "killed")]
    assert states[0][0] == states[1][0] == total
    for x, y in zip(jax.tree.leaves(states[0][1]), jax.tree.leaves(states[1][1]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
