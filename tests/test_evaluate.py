"""The cross-objective matrix of a tiny trained checkpoint: every objective, finite,
reproducible, on the same held-out batches for any model; bad input."""

import json
import math
import re

import pytest
from train_helpers import tiny_config
from trained_run import shared_run

import objectives
from pretrain import evaluate
from pretrain.inference import load_trained
from pretrain.model import create_model

# every leaf of every registered objective, in registry order (a new objective joins by itself)
VOCAB = objectives.Vocabulary.reserved(400, sentinels=16)  # the tiny run's tokenizer layout
LEAVES = [leaf.name for name in objectives.registered_names() for leaf in objectives.build_mixture(name, VOCAB).objectives]
# a model trained without ELECTRA has no heads to score its column with: it is left out, saying why
SCORED = [name for name in LEAVES if name != "electra"]
DOCUMENTS = 4  # held-out documents scored here (all of them: --max_documents=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


def test_every_objective_is_scored_finite_and_a_rerun_is_identical(run_dir):
    first = evaluate.evaluate_run(str(run_dir), max_documents=DOCUMENTS)
    assert first["step"] == 10 and first["trained_objective"] == "mlm:1,clm:1,mass:1,unilm:1"
    assert LEAVES == [o.name for o in evaluate.evaluation_objectives(VOCAB)]
    assert list(first["objectives"]) == SCORED and list(first["skipped"]) == ["electra"]
    assert "'replaced' loss term, through heads generator, replaced_token" in first["skipped"]["electra"]
    for name, metrics in first["objectives"].items():
        assert metrics["targets"] > 0, name
        assert math.isfinite(metrics["loss"]) and 0 < metrics["loss"] < 10, (name, metrics)
        assert 0 <= metrics["accuracy"] <= 1 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert first["parameters"] > 0 and first["tokens_seen"] > 0
    assert evaluate.evaluate_run(str(run_dir), max_documents=DOCUMENTS) == first


def test_objectives_the_tokenizer_cannot_serve_are_left_out_saying_why_unless_named():
    without_sentinels = objectives.Vocabulary.reserved(400, sentinels=0)
    skipped = {}
    scored = [leaf.name for leaf in evaluate.evaluation_objectives(without_sentinels, skipped=skipped)]
    assert sorted(skipped) == ["span_corruption", "ul2"]
    assert "sentinel" in skipped["span_corruption"] and "tokenizer.sentinels" in skipped["span_corruption"]
    assert scored == [name for name in LEAVES if name.split("/")[0] not in skipped]
    with pytest.raises(ValueError, match="span_corruption.*sentinel"):
        evaluate.evaluation_objectives(without_sentinels, ["span_corruption"])


def test_the_heldout_set_is_the_same_for_any_model_of_the_tokenizer(run_dir):
    trained = load_trained(run_dir)
    fresh = create_model(trained.model.config, seed=7)
    kwargs = dict(seq_len=64, max_documents=2, objective_names=["mlm", "clm"])
    a = evaluate.evaluate_model(trained.model, trained.tokenizer, trained.config.data, **kwargs)
    b = evaluate.evaluate_model(fresh, trained.tokenizer, trained.config.data, **kwargs)
    assert a["heldout"] == b["heldout"]
    assert [m["targets"] for m in a["objectives"].values()] == [m["targets"] for m in b["objectives"].values()]
    assert a["objectives"]["clm"]["loss"] != b["objectives"]["clm"]["loss"]


def test_command_writes_json_and_prints_the_table(run_dir, tmp_path, capsys):
    output = tmp_path / "matrix.json"
    evaluate.main(["evaluate", f"--workdir={run_dir}", f"--max_documents={DOCUMENTS}", f"--output={output}"])
    printed = capsys.readouterr().out
    written = json.loads(output.read_text())
    assert written["objectives"] == evaluate.evaluate_run(str(run_dir), max_documents=DOCUMENTS)["objectives"]
    assert printed.splitlines()[1].split() == ["objective", "loss", "accuracy", "perplexity", "targets"]
    for name in SCORED:
        assert f"{written['objectives'][name]['loss']:.4f}" in printed
    assert "not scored: electra: 'electra' is scored by its 'replaced' loss term" in printed


def test_bad_input_gets_one_clear_message(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match=re.escape(
            f"error: --workdir={nowhere} does not exist; pass a training run's directory, or train one first: python "
            f"-m pretrain.train --config=configs/pretrain.py:objective=<objective> --workdir={nowhere}")):
        evaluate.main(["evaluate", f"--workdir={nowhere}"])
    with pytest.raises(SystemExit, match="--workdir is required"):
        evaluate.main(["evaluate"])
    with pytest.raises(SystemExit, match=re.escape(
            f"error: {tmp_path}/config.json is missing, so --workdir={tmp_path} is not a training run")):
        evaluate.main(["evaluate", f"--workdir={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit, match="checkpoints holds no finished checkpoint; let the run reach"):
        evaluate.main(["evaluate", f"--workdir={tmp_path}"])
    with pytest.raises(ValueError, match="unknown objective 'bert'; known objectives: "
                                         + ", ".join(objectives.registered_names())):
        evaluate.evaluation_objectives(objectives.Vocabulary(400), ["bert"])
