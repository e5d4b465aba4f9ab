"""The comparison tool: two runs of a few steps give report.md with the matrix and PNG
plots; a rerun trains nothing; config mistakes are named before anything trains."""

import copy
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from matplotlib import image
from train_helpers import shared_tokenizer

import objectives
from configs.compare import get_config
from pretrain import compare


def small_budget(preset: str = "mlm_rate") -> ml_collections.ConfigDict:
    config = get_config(f"preset={preset},size=tiny,steps=4")
    budget = config.budget
    budget.seq_len, budget.batch_size, budget.log_every, budget.checkpoint_every = 64, 8, 1, 4
    budget.tokenizer.vocab_size, budget.tokenizer.sentinels = 400, 16
    budget.tokenizer.sample_documents = 100  # the tokenizer is given; this only bounds the start-up statistics
    budget.data.heldout_fraction = 0.005  # a small held-out split: the trainer scores it at the end of each run
    budget.peak_flops_per_device = 1e12  # MFU's denominator given, not measured at each start
    budget.optimizer.learning_rate = 3e-3
    config.evaluation.max_documents = 2
    return config


def test_run_configs_expand_the_budget_and_the_sweep():
    config = small_budget()
    config.sweep.grid = (0.15, 0.3)
    runs = compare.run_configs(config)
    assert list(runs) == ["mlm-mask_rate=0.15", "mlm-mask_rate=0.3"]
    assert [run.objectives.mlm.mask_rate for run in runs.values()] == [0.15, 0.3]
    assert all(run.objective == "mlm" and run.total_steps == 4 and run.seq_len == 64 for run in runs.values())
    four = get_config("preset=objectives")
    four.runs.mlm.overrides = ml_collections.ConfigDict({"objectives": {"mlm": {"whole_word": True}}})
    objectives = compare.run_configs(four)
    assert {name: run.objective for name, run in objectives.items()} == {
        "clm": "clm", "mass": "mass", "mlm": "mlm", "unilm": "unilm"}
    assert [run.objectives.mlm.whole_word for run in objectives.values()] == [False, False, True, False]
    config.budget_tokens = 64 * 8 * 10
    assert {run.total_steps for run in compare.run_configs(config).values()} == {10}


@pytest.mark.parametrize("preset, expected", [
    ("t5", {"mlm": "mlm", "mass": "mass", "span_corruption": "span_corruption", "prefix_lm": "prefix_lm",
            "clm": "clm"}),
    ("ul2", {"ul2": "ul2", "span_corruption": "span_corruption", "clm": "clm"}),
    ("electra", {"mlm": "mlm", "clm": "clm", "electra": "electra"}),
    ("extended", {"mlm": "mlm", "clm": "clm", "mass": "mass", "unilm": "unilm", "electra": "electra"}),
])
def test_the_t5_ul2_and_electra_presets_build_valid_runs_under_one_budget(preset, expected):
    runs = compare.run_configs(get_config(f"preset={preset}"))  # validated against the budget's tokenizer layout
    assert {name: run.objective for name, run in runs.items()} == expected
    assert len({(run.total_steps, run.batch_size, run.seq_len, repr(sorted(run.model.to_dict().items())))
                for run in runs.values()}) == 1
    assert get_config(f"preset={preset}").downstream.tasks == "pydocs_topic,pydocs_sentence_topic"


def test_config_mistakes_name_the_run_and_the_field():
    config = get_config("preset=objectives")
    config.runs.mlm.objective = "bert"
    with pytest.raises(ValueError, match=r"config.runs.mlm \(objective 'bert'\): .*unknown objective 'bert'; "
                                         "known objectives: " + ", ".join(objectives.registered_names())):
        compare.run_configs(config)
    config = get_config("preset=objectives")
    config.runs.clm.overrides = ml_collections.ConfigDict({"optimizer": {"learning_rat": 0.1}})
    with pytest.raises(ValueError, match="config.runs.clm.overrides: the budget has no field 'optimizer.learning_rat'"):
        compare.run_configs(config)
    config = get_config("preset=mass_span")
    config.sweep.field = "objectives.mass.span_fractio"
    with pytest.raises(ValueError, match="config.sweep.field: the budget has no field 'objectives.mass.span_fractio'"):
        compare.run_configs(config)
    config = get_config("preset=mass_span")
    config.sweep.run = "mlm"
    with pytest.raises(ValueError, match="config.sweep.run='mlm' is not a run; choose one of mass"):
        compare.run_configs(config)
    with pytest.raises(ValueError, match="unknown comparison preset 'all'; choose one of objectives"):
        get_config("preset=all")
    with pytest.raises(SystemExit, match="--workdir is required"):
        compare.main(["compare", "--config=configs/compare.py"])


def test_downstream_mistakes_are_named_before_anything_trains(tmp_path):
    config = get_config("preset=objectives,steps=4")
    runs = [compare.Run(name, run, str(tmp_path / name)) for name, run in compare.run_configs(config).items()]
    config.downstream.methods = "full,aux_lm"
    with pytest.raises(ValueError, match=r"config.downstream.methods='full,aux_lm': aux_lm mixes language-model rows"):
        compare.check_downstream(config, runs)
    config.downstream.methods, config.downstream.label_fractions = "full", (0.0, 1.0)
    with pytest.raises(ValueError, match=r"config.downstream.label_fractions=\(0.0, 1.0\): 0.0 must lie in \(0, 1\]"):
        compare.check_downstream(config, runs)
    config.downstream.label_fractions, config.downstream.control_layout = (1.0,), "sideways"
    with pytest.raises(ValueError, match=r"config.downstream.control_layout='sideways' must be one of"):
        compare.check_downstream(config, runs)
    config.downstream.control_layout, config.downstream.label_fractions = "bidirectional", (0.005, 1.0)
    with pytest.raises(ValueError, match=r"config.downstream.label_fractions: label fraction 0.005 of task "
                                         r"'pydocs_topic' leaves class '.*' \(\d+ training examples\) without an "
                                         r"example; use a fraction of at least"):
        compare.check_downstream(config, runs)


def test_two_runs_give_a_report_with_the_matrix_and_plots_and_a_rerun_trains_nothing(tmp_path_factory, tmp_path):
    """With a downstream block: 2 runs x 1 task x 2 fine-tuning seeds."""
    config = small_budget()
    config.sweep.grid = (0.15, 0.3)
    config.budget.data.heldout_fraction = 0.05  # the built-in task's test split is this held-out split
    config.downstream.tasks, config.downstream.seeds, config.downstream.control = "pydocs_topic", (0, 1), True
    config.downstream.methods, config.downstream.fusion = "full", ""
    config.downstream.learning_rates, config.downstream.label_fractions = (1e-3, 3e-3), (0.5, 1.0)
    tune = config.downstream.finetune
    tune.epochs, tune.total_steps, tune.evaluations, tune.log_every = 0, 4, 2, 2
    tune.seq_len, tune.batch_size, tune.task_max_examples, tune.peak_flops_per_device = 64, 8, 24, 1e12
    workdir = tmp_path / "comparison"
    workdir.mkdir()
    shutil.copy(shared_tokenizer(tmp_path_factory), workdir / "tokenizer.model")

    runs = compare.compare(config, str(workdir), command="python -m pretrain.compare --workdir=X")
    assert [run.trained_now for run in runs] == [True, True]
    report = (workdir / "report.md").read_text()
    assert "python -m pretrain.compare --workdir=X" in report
    header = "| run | trained on | mlm |"  # the matrix scores the trained objectives ('all': every registered)
    assert report.count(header) == 2  # loss and accuracy
    for run in runs:
        assert f"| {run.name} | `mlm` | " in report
        assert run.evaluation["step"] == 4 and run.evaluation["tokens_seen"] > 0
        loss = run.evaluation["objectives"]["mlm"]["loss"]
        assert f"{loss:.3f}" in report
    assert "| run | objective | steps | tokens seen | parameters | final training loss | training wall time |" in report
    for name in ("loss_curves.png", "matrix.png", "downstream.png", "sample_efficiency.png"):
        pixels = image.imread(workdir / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300, name
        assert f"]({name})" in report
    summary = json.loads((workdir / "comparison.json").read_text())
    assert list(summary["runs"]) == [run.name for run in runs]
    assert "| run | pydocs_topic/full@0.5 (accuracy) | pydocs_topic/full (accuracy) |" in report
    assert "pooled std" in report and "On pydocs_topic/full (accuracy)" in report
    rows = [run.name for run in runs] + ["random-init"]
    assert list(summary["downstream"]) == rows
    for name in rows:
        for column in ("pydocs_topic/full@0.5", "pydocs_topic/full"):
            cell = summary["downstream"][name][column]
            accuracy = cell["test"]["accuracy"]
            assert len(accuracy["per_seed"]) == 2 and cell["learning_rate"] in (1e-3, 3e-3)
            assert set(cell["grid"]) == {"0.001", "0.003"}
            assert cell["learning_rate"] == max((1e-3, 3e-3), key=lambda r: (cell["grid"][f"{r:g}"], -r))
            assert "test_predictions" not in cell  # kept in each cell.json, not in the summary
            if name != "random-init":
                test = cell["vs_control"]
                assert test["row"] == "random-init" and 0 <= test["bootstrap"]["p"] <= 1
                assert test["welch_p"] is None or 0 <= test["welch_p"] <= 1
                assert f"| {name} vs random-init | {column} | {test['difference']:+.3f} |" in report
            np.testing.assert_allclose([accuracy["mean"], accuracy["std"]],
                                       [np.mean(accuracy["per_seed"]), np.std(accuracy["per_seed"], ddof=1)])
    for name in rows:  # each table row rebuilt from comparison.json with the caption's rules, not from the report
        texts = []
        for column in ("pydocs_topic/full@0.5", "pydocs_topic/full"):
            means = {row: summary["downstream"][row][column]["test"]["accuracy"]["mean"] for row in rows}
            stds = {row: summary["downstream"][row][column]["test"]["accuracy"]["std"] for row in rows}
            best, runner_up = sorted(rows, key=means.get, reverse=True)[:2]
            pooled = np.sqrt((stds[best] ** 2 + stds[runner_up] ** 2) / 2)
            bold = name == best and means[best] - means[runner_up] > pooled
            text = f"{means[name]:.3f} ± {stds[name]:.3f}"
            p = summary["downstream"][name][column].get("vs_control", {}).get("bootstrap", {}).get("p", 1.0)
            texts.append((f"**{text}**" if bold else text) + ("‡" if p < 0.01 else "†" if p < 0.05 else ""))
        assert f"| {name} | {texts[0]} | {texts[1]} |" in report.splitlines()
    assert "| run | pydocs_topic/full@0.5 | pydocs_topic/full |" in report  # the chosen rates
    sizes = [summary["downstream"]["random-init"][c]["train_examples"] for c in ("pydocs_topic/full@0.5",
                                                                                 "pydocs_topic/full")]
    assert sizes[0] < sizes[1] <= 2 * sizes[0] + 54  # stratified: round(n_c / 2) of each class
    tuned = workdir / "downstream" / runs[0].name / "pydocs_topic" / "full"
    stamps_tuned = {path: os.stat(path).st_mtime_ns for path in (tuned / "fraction_1" / "cell.json",
                                                                tuned / "fraction_0.5" / "cell.json")}

    stamps = {path: os.stat(path).st_mtime_ns for run in runs for path in (
        os.path.join(run.directory, "metrics.jsonl"), os.path.join(run.directory, "evaluation.json"))}
    rerun = compare.compare(config, str(workdir), command="again")
    assert [run.trained_now for run in rerun] == [False, False]
    assert [run.wall_time_s for run in rerun] == [run.wall_time_s for run in runs]
    assert [run.evaluation for run in rerun] == [run.evaluation for run in runs]
    assert stamps == {path: os.stat(path).st_mtime_ns for path in stamps}, "nothing trained or evaluated again"
    assert stamps_tuned == {path: os.stat(path).st_mtime_ns for path in stamps_tuned}, "nothing fine-tuned again"
    assert "again" in (workdir / "report.md").read_text()

    config.budget.optimizer.learning_rate = 1e-2
    with pytest.raises(ValueError, match=r"run 'mlm-mask_rate=0.15' in .* was trained with another config "
                                         r"\(changed: optimizer.learning_rate\); delete that directory"):
        compare.compare(config, str(workdir))


def test_runs_whose_objectives_add_heads_are_checked_as_their_trainer_resolves_them():
    """ELECTRA's and SpanBERT's loss terms need heads the budget's model does not list:
    the run's trainer adds them (`pretrain.resolve`), so the comparison checks each run
    resolved, and keeps the config as given."""
    config = small_budget()
    config.sweep.run, config.sweep.field, config.sweep.grid = "", "", ()
    config.runs = ml_collections.ConfigDict({name: {"objective": name, "overrides": {}}
                                             for name in ("electra", "spanbert")})
    runs = compare.run_configs(config)
    assert list(runs) == ["electra", "spanbert"] and all(tuple(run.model.heads) == () for run in runs.values())


def test_pretraining_seeds_become_one_row_with_mean_and_std():
    from pretrain import compare_report

    config = small_budget()
    config.sweep.run, config.sweep.field, config.sweep.grid = "", "", ()
    config.pretrain_seeds = (0, 1)
    runs = compare.run_configs(config)
    assert list(runs) == ["mlm-seed0", "mlm-seed1"] and [r.seed for r in runs.values()] == [0, 1]
    assert compare.group_of("mlm-seed1", (0, 1)) == "mlm" and compare.group_of("mlm", (0,)) == "mlm"
    evaluations = [{"objectives": {"clm": {"loss": 6.0, "accuracy": 0.1}, "mlm": {"loss": 5.0, "accuracy": 0.2}}},
                   {"objectives": {"clm": {"loss": 6.2, "accuracy": 0.1}, "mlm": {"loss": 5.4, "accuracy": 0.3}}}]
    seeded = [compare.Run(name, run, f"/runs/{name}", "mlm", evaluation=evaluation)
              for (name, run), evaluation in zip(runs.items(), evaluations)]
    assert compare_report.matrix_table(seeded, "loss", lower_is_better=True).splitlines()[2] == \
        "| mlm | `mlm` | 6.100 ± 0.141 | 5.200 ± 0.283 |"  # one row: nothing to be best against


def test_a_cell_a_run_could_not_be_scored_in_is_na_and_left_out_of_the_best(tmp_path):
    """An objective scored through heads only its own runs have (ELECTRA's) leaves the
    other runs' cells empty: 'n/a' in the table, blank in the heatmap, and the best of
    the column is among the scored runs."""
    from pretrain import compare_report

    config = small_budget()
    run = next(iter(compare.run_configs(config).values()))
    evaluations = {"mlm": {"objectives": {"mlm": {"loss": 5.0, "accuracy": 0.2}}},
                   "electra": {"objectives": {"mlm": {"loss": 7.0, "accuracy": 0.1},
                                              "electra": {"loss": 0.3, "accuracy": 0.9}}}}
    runs = [compare.Run(name, run, str(tmp_path / name), name, evaluation=evaluation)
            for name, evaluation in evaluations.items()]
    assert compare_report.matrix_table(runs, "loss", lower_is_better=True).splitlines()[2:] == [
        "| mlm | `mlm` | **5.000** | n/a |", "| electra | `mlm` | 7.000 | 0.300 |"]
    compare_report.plot_matrix(runs, str(tmp_path / "matrix.png"))
    assert (tmp_path / "matrix.png").stat().st_size > 0


def test_the_report_states_the_schedule_the_runs_ran_not_the_unresolved_budget():
    """With steps derived from tokens per parameter the budget holds warmup 0 ('a tenth');
    the report's budget line gives the runs' resolved warmup."""
    import types

    from pretrain import compare_report

    config = get_config("preset=objectives,size=tiny")
    assert config.budget.optimizer.warmup_steps == 0
    run_config = copy.deepcopy(config.budget)
    run_config.total_steps, run_config.optimizer.warmup_steps = 3643, 364
    run = types.SimpleNamespace(config=run_config, evaluation={"parameters": 372992})
    line = compare_report._budget_line(config, [run])
    assert "3,643 steps x 16 rows x 128 tokens" in line and "(364 warmup steps, cosine decay)" in line


def test_compression_columns_report_every_technique_with_size_speed_and_retained_score(tmp_path_factory, tmp_path):
    """One MLM run with every technique: a distilled row of its own (half the layers), and
    each fine-tuned seed scored again int8 (weights; weights and inputs) and head-pruned, with
    parameters, bytes on disk, tokens/s and the retained fraction per seed in the report."""
    config = small_budget("mlm_rate")
    config.sweep.run, config.sweep.field, config.sweep.grid = "", "", ()
    config.budget.model.num_layers = 2
    config.budget.data.heldout_fraction = 0.05
    config.downstream.tasks, config.downstream.seeds, config.downstream.control = "pydocs_topic", (0, 1), False
    config.downstream.methods, config.downstream.fusion = "full", ""
    config.downstream.learning_rates, config.downstream.label_fractions = (3e-3,), (1.0,)
    tune = config.downstream.finetune
    tune.epochs, tune.total_steps, tune.evaluations, tune.log_every = 0, 4, 2, 2
    tune.seq_len, tune.batch_size, tune.task_max_examples, tune.peak_flops_per_device = 64, 8, 24, 1e12
    config.compression.techniques = "distil,int8_weights,int8,prune"
    config.compression.importance_batches, config.compression.speed_repeats = 1, 1
    config.compression.prune_step_fraction = 0.25
    workdir = tmp_path / "comparison"
    workdir.mkdir()
    shutil.copy(shared_tokenizer(tmp_path_factory), workdir / "tokenizer.model")
    runs, downstream = compare.compare_with_downstream(config, str(workdir))
    assert [run.name for run in runs] == ["mlm", "mlm/distilled"]
    assert json.loads((workdir / "runs" / "mlm-distilled" / "config.json").read_text())["model"]["num_layers"] == 1
    cell = downstream["mlm"]["pydocs_topic/full"]
    compressed = cell["compressed"]
    assert set(compressed) == {"none", "int8_weights", "int8", "prune"}
    assert 3.3 < compressed["none"]["bytes"] / compressed["int8_weights"]["bytes"] < 4.0
    assert compressed["prune"]["parameters"] < compressed["none"]["parameters"]
    assert all(entry["tokens_per_second"] > 0 for entry in compressed.values())
    for technique in ("int8_weights", "int8", "prune"):
        base = np.asarray(cell["test"]["accuracy"]["per_seed"])
        ratios = np.asarray(compressed[technique]["test"]["per_seed"]) / np.where(base != 0, base, np.nan)
        np.testing.assert_allclose(compressed[technique]["retained"]["per_seed"], ratios)  # NaN where base is 0
    assert set(downstream["mlm/distilled"]["pydocs_topic/full"]["compressed"]) == set(compressed)
    report = (workdir / "report.md").read_text()
    assert "### Compressed" in report and "| mlm | distil | pydocs_topic/full |" in report
    assert "| mlm | int8_weights | pydocs_topic/full |" in report and "| mlm | prune | pydocs_topic/full |" in report
    pixels = image.imread(workdir / "compression.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 200
