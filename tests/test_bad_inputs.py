"""The catalogue of bad inputs: each is refused before training, with a message that
names the problem and the fix (both asserted). README "Troubleshooting" lists them.

Config fields and mesh shapes go through `validate_config` (what the trainer calls
first); data files, tokenizer files and checkpoints through a real `Trainer`; command
line flags through the real command. Workdir problems (unwritable, uncreatable, no
space, locked) are in tests/test_reliability.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import sentencepiece as spm

from configs.finetune import get_config as get_finetune_config
from pretrain.checkpoint import CheckpointMismatch
from objectives import registered_names
from pretrain.config_checks import validate_config
from pretrain.tokenizer import train_tokenizer
from pretrain import compare, evaluate, finetune, generate, inspect_data, train
from pretrain.inference import read_run_config
from pretrain.train import Trainer
from pretrain.transfer.trainer import FinetuneTrainer
from train_helpers import (FINISHED_RUN, ROOT, TRAIN_COMMAND, apply, command, shared_corpus,  # noqa: F401
                           shared_finished_run, tiny_config, tokenizer_file, workdir_with)

DEVICES = 8

# (overrides of the tiny config, what the message must say of the problem, and of the fix)
CONFIG_CASES = {
    "unknown objective": ({"objective": "bert"}, r"unknown objective 'bert'", "known objectives: " + ", ".join(registered_names())),
    "unknown objective setting": ({"objectives.mlm.mask_ratio": 0.2}, r"objective 'mlm' has no setting 'mask_ratio'",
                                  r"valid settings: .*mask_rate"),
    "seq_len too short": ({"seq_len": 2}, r"config.seq_len=2 leaves objective 'mlm' no room", r"use seq_len >= 16"),
    "seq_len over max_positions": ({"seq_len": 1024}, r"config.seq_len=1024 exceeds config.model.max_positions=256",
                                   r"raise max_positions or shorten seq_len"),
    "batch not divisible": ({"batch_size": 6}, r"config.batch_size=6 must be divisible",
                            r"by data-parallel size 8 x config.accumulation_steps=1"),
    "accumulation not dividing": ({"accumulation_steps": 3}, r"config.batch_size=8 must be divisible",
                                  r"data-parallel size 8 x config.accumulation_steps=3"),
    "no steps": ({"total_steps": 0}, r"config.total_steps=0", r"must be a positive integer"),
    "warmup past the end": ({"total_steps": 50, "optimizer.warmup_steps": 100},
                            r"config.optimizer.warmup_steps=100", r"must lie in 0..config.total_steps=50"),
    "learning rate not finite": ({"optimizer.learning_rate": float("nan")}, r"config.optimizer.learning_rate=nan",
                                 r"must be a finite number > 0"),
    "unknown schedule": ({"optimizer.schedule": "step"}, r"config.optimizer.schedule='step'",
                         r"must be one of \('cosine', 'linear', 'constant'\)"),
    "Adam beta out of range": ({"optimizer.b2": 1.0}, r"config.optimizer.b2=1.0", r"must lie in \[0, 1\)"),
    "unknown parallelism": ({"parallelism": "dp"}, r"config.parallelism='dp'", r"must be one of \('pjit', 'pmap'\)"),
    "unknown non-finite policy": ({"nonfinite": "ignore"}, r"config.nonfinite='ignore'",
                                  r"must be one of \('stop', 'skip'\)"),
    "heads not dividing width": ({"model.num_heads": 3}, r"config.model.model_dim=64 is not divisible by "
                                 r"config.model.num_heads=3", r"choose num_heads among \[1, 2, 4, 8, 16, 32, 64\]"),
    "unknown compute dtype": ({"model.dtype": "float12"}, r"model.dtype='float12' is not a JAX dtype",
                              r"e.g. 'float32', 'bfloat16'"),
    "a loss term without its head": ({"objectives.mlm.nsp": True},
                                     r"objective 'mlm' trains loss term 'nsp' with head 'pair_classifier', which "
                                     r"config.model.heads=\(\) lacks",
                                     r"add it \(the trainer adds the heads the objectives declare itself"),
    "an unknown head": ({"model.heads": ("pair_classifier", "pooler")},
                        r"config.model.heads=\('pair_classifier', 'pooler'\): each head once, among",
                        r"an objective's loss terms add the heads they need"),
    "token types beyond the table": ({"objective": "unilm", "model.num_token_types": 4},
                                     r"config.model.num_token_types=4 is too small: objectives \['unilm/seq2seq'\] use "
                                     r"token types up to 5", r"set config.model.num_token_types=6 or more"),
    "Hugging Face directory missing": ({"init.hf": "/nonexistent/bert"},
                                       r"config.init.hf='/nonexistent/bert' is not a directory",
                                       r"give a local Hugging Face model directory \(save_pretrained writes one"),
    "Hugging Face directory incomplete": ({"init.hf": str(ROOT / "configs"), "tokenizer.model_path": "sp.model"},
                                          r"lacks config.json, model.safetensors, tokenizer.json; save the model and "
                                          r"its tokenizer there", r"config.tokenizer.model_path='sp.model' and "
                                          r"config.init.hf=.* both give a tokenizer; an imported model keeps its own"),
    "unknown GELU form": ({"model.gelu": "erf"}, r"config.model.gelu='erf' must be one of \('tanh', 'exact'\)",
                          r"'tanh': the approximation GPT-2 uses; 'exact': the erf form BERT uses"),
    "misspelt field": ({"total_step": 5}, r"config.total_step is not a field the trainer knows",
                       r"did you mean config.total_steps\?"),
    "vocabulary too small": ({"tokenizer.vocab_size": 100}, r"config.tokenizer.vocab_size=100 is too small",
                             r"must exceed 282 \(26 special tokens and 256 byte pieces\); raise it"),
    "tokenizer file missing": ({"tokenizer.model_path": "/nonexistent/sp.model"},
                               r"config.tokenizer.model_path='/nonexistent/sp.model' is not a file",
                               r"give the path of a SentencePiece .model file, or leave it empty to train one"),
    "unknown tokenizer type": ({"tokenizer.model_type": "wordpiece"}, r"config.tokenizer.model_type='wordpiece'",
                               r"must be one of \('unigram', 'bpe'\)"),
    "unknown data kind": ({"data.kind": "csv"}, r"config.data.kind='csv'", r"must be one of \('pydocs', 'files'"),
    "files without a path": ({"data.kind": "files"}, r"config.data.path is empty but config.data.kind='files'",
                             r"set it to a .txt/.jsonl file, directory or glob"),
    "TFDS without a name": ({"data.kind": "tfds"}, r"config.data.tfds_name is empty",
                            r"set it \(e.g. 'c4/en'\)"),
    "held-out fraction out of range": ({"data.heldout_fraction": 1.5}, r"config.data.heldout_fraction=1.5",
                                       r"must lie in \(0, 1\)"),
    "unknown packing": ({"data.packing": "greedy"}, r"config.data.packing='greedy'",
                        r"must be one of \('first_fit', 'best_fit'\)"),
    "mesh product wrong": ({"mesh.data": 3}, r"config.mesh data=3 x fsdp=1 x tensor=1 does not match the 8 devices",
                           r"make the product 8 \(data=-1 fills in\)"),
    "mesh axis not dividing": ({"mesh.fsdp": 3}, r"config.mesh data=-1 x fsdp=3 x tensor=1 does not match the 8 "
                               r"devices", r"make the product 8"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_names_the_field_and_the_fix(name):
    overrides, problem, fix = CONFIG_CASES[name]
    with pytest.raises(ValueError, match=problem) as error:
        validate_config(apply(tiny_config(), overrides), device_count=DEVICES)
    assert error.match(fix)


def test_missing_field_is_named_with_its_default():
    config = tiny_config()
    del config["seed"]
    with pytest.raises(ValueError, match=r"config.seed is missing; add it \(the default is 0\)"):
        validate_config(config, device_count=DEVICES)


def test_all_problems_are_reported_at_once():
    config = apply(tiny_config(), {"total_steps": 0, "parallelism": "dp", "data.packing": "greedy"})
    with pytest.raises(ValueError) as error:
        validate_config(config, device_count=DEVICES)
    assert [line.split("=")[0].strip() for line in str(error.value).splitlines()[1:]] == [
        "config.total_steps", "config.parallelism", "config.optimizer.warmup_steps", "config.data.packing"]


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# Data files: (file name, its content, message problem, message fix); kind='files', path=that file.
FILE_CASES = {
    "glob matching nothing": (None, None, r"no text files found for '.*/corpus/\*.txt'",
                              r"give an existing .txt/.jsonl file, a directory containing such files, or a glob"),
    "empty file": ("empty.txt", "", r"no text in .*empty.txt .*: the files are empty",
                   r"point the source at files that contain UTF-8 text"),
    "not UTF-8": ("latin1.txt", "Caf\xe9 cr\xe8me br\xfbl\xe9e is a dessert. It is sweet.\n".encode("latin-1"),
                  r"no usable documents in .*latin1.txt: every document or line was skipped \(\{'non_utf8': 1\}\)",
                  r"see the warnings above for files and lines, fix the input"),
    "jsonl without the text field": ("docs.jsonl", '{"body": "A document. With sentences."}\n' * 3,
                                     r"skipped \(\{'missing_field': 3\}\)",
                                     r"fix the input or its text_field='text'"),
}


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_bad_data_file_is_named_with_the_fix(tokenizer_file, tmp_path, name):
    filename, content, problem, fix = FILE_CASES[name]
    path = write(tmp_path / "corpus" / filename, content) if filename else tmp_path / "corpus" / "*.txt"
    config = tiny_config(**{"data.kind": "files", "data.path": str(path)})
    with pytest.raises((ValueError, FileNotFoundError), match=problem) as error:
        Trainer(config, str(workdir_with(tokenizer_file, tmp_path / "run")))
    assert error.match(fix)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tokenizer_file, tmp_path):
    config = tiny_config(**{"data.kind": "tfds", "data.tfds_name": "lm1b", "data.tfds_data_dir": str(tmp_path / "tfds")})
    with pytest.raises(FileNotFoundError, match=r"TFDS data_dir '.*/tfds' for dataset 'lm1b' does not exist") as error:
        Trainer(config, str(workdir_with(tokenizer_file, tmp_path / "run")))
    assert error.match(r"prepare it on a machine with network .*download_and_prepare\(file_format='array_record'\)")


def sentences(tmp_path_factory, count=2000):
    lines = shared_corpus(tmp_path_factory).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:count]


def test_tokenizer_vocab_file_instead_of_model(tokenizer_file, tmp_path):
    vocab = tokenizer_file.with_suffix(".vocab")
    config = tiny_config(**{"tokenizer.model_path": str(vocab)})
    with pytest.raises(ValueError, match=rf"{vocab} is not a SentencePiece model") as error:
        Trainer(config, str(tmp_path / "run"))
    assert error.match(r"expected the binary .model file that SentencePiece training writes \(not the .vocab")


def test_tokenizer_without_the_special_tokens(tmp_path_factory, tmp_path):
    """A SentencePiece model trained with its own defaults (<unk>, <s>, </s> at ids 0-2)."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(tmp_path_factory)),
                                   model_prefix=str(tmp_path / "plain"), vocab_size=300, minloglevel=2)
    config = tiny_config(**{"tokenizer.model_path": str(tmp_path / "plain.model")})
    with pytest.raises(ValueError, match=r"plain.model does not have this project's special tokens:\n  \[PAD\] is "
                                         r"missing") as error:
        Trainer(config, str(tmp_path / "run"))
    assert error.match(r"To fix it, retrain it with pretrain.tokenizer.train_tokenizer \(or leave the tokenizer path "
                       r"unset so the run trains one\), or pass these flags to spm_train: --pad_id=0")


def test_workdir_tokenizer_of_another_size(tokenizer_file, tmp_path):
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    with pytest.raises(ValueError, match=r"tokenizer.model has 400 tokens but tokenizer.vocab_size is 500") as error:
        Trainer(tiny_config(**{"tokenizer.vocab_size": 500}), str(workdir))
    assert error.match(r"restore tokenizer.vocab_size=400 or use a new workdir")


def test_workdir_tokenizer_that_is_not_a_model(tmp_path):
    write(tmp_path / "run" / "tokenizer.model", b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(ValueError, match=r"run/tokenizer.model is not a SentencePiece model") as error:
        Trainer(tiny_config(), str(tmp_path / "run"))
    assert error.match(r"expected the binary .model file")


def test_vocabulary_larger_than_the_text_supports(tmp_path):
    corpus = write(tmp_path / "small.txt", "A short text. It has few words. Nothing more to say here.\n")
    config = tiny_config(**{"data.kind": "files", "data.path": str(corpus), "tokenizer.vocab_size": 5000})
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=5000 is more than the training text supports") as error:
        Trainer(config, str(tmp_path / "run"))
    assert error.match(r"lower tokenizer.vocab_size or train on more text")


# Checkpoints written by another run shape: (what changes, problem, fix is common).
CHECKPOINT_FIX = r"Resume with the settings the run started with .*config.json.*, or pass a new --workdir"


@pytest.fixture
def finished_copy(tmp_path_factory, tmp_path):
    """A copy of the session's finished tiny run (checkpoints at steps 20 and 40)."""
    workdir = tmp_path / "run"
    shutil.copytree(shared_finished_run(tmp_path_factory)[0], workdir)
    return workdir


@pytest.mark.parametrize("overrides, problem", [
    ({"model.num_layers": 3}, r"model.num_layers is 2 there and 3 now.*params/blocks/2/.* is missing from the checkpoint"),
    ({"optimizer.clip_norm": 0.0}, r"optimizer.clip_norm is 1.0 there and 0.0 now.*arrays: opt_state/"),
    # model.output_bias's default changed (True -> False): resuming with the other value names it (this run has none)
    ({"model.output_bias": True}, r"model.output_bias is False there and True now.*params/output_bias/value is "
                                  r"missing from the checkpoint"),
], ids=["model shape", "optimizer structure", "output bias"])
def test_checkpoint_of_another_configuration(finished_copy, overrides, problem):
    config = tiny_config(**FINISHED_RUN, **overrides)
    with pytest.raises(CheckpointMismatch, match=r"checkpoint at step 40 in .* was written by a different model or "
                                                 r"optimizer configuration: " + problem) as error:
        Trainer(config, str(finished_copy)).run()
    assert error.match(CHECKPOINT_FIX)


def test_checkpoint_of_another_tokenizer(tmp_path_factory, finished_copy):
    """The workdir's tokenizer replaced by another of the same size (BPE instead of unigram)."""
    train_tokenizer(sentences(tmp_path_factory), finished_copy / "tokenizer", 400, "bpe")
    with pytest.raises(CheckpointMismatch, match=r"checkpoint at step 40 in .* was written by a different tokenizer: "
                                                 r"tokenizer_sha256 is '[0-9a-f]{64}' there and '[0-9a-f]{64}' now") \
            as error:
        Trainer(tiny_config(**FINISHED_RUN), str(finished_copy)).run()
    assert error.match(CHECKPOINT_FIX)


def test_checkpoint_of_another_vocabulary_size(tmp_path_factory, finished_copy):
    train_tokenizer(sentences(tmp_path_factory), finished_copy / "tokenizer", 500)
    config = tiny_config(**FINISHED_RUN, **{"tokenizer.vocab_size": 500})
    with pytest.raises(CheckpointMismatch, match=r"model.vocab_size is 400 there and 500 now.*tokenizer_sha256 is .*"
                                                 r"params/token_embedding/value is \(400, 64\) float32 there and "
                                                 r"\(500, 64\) float32 now") as error:
        Trainer(config, str(finished_copy)).run()
    assert error.match(CHECKPOINT_FIX)


# Command-line mistakes on every entry point: (tool, flags, the one line it must print).
# In process (each tool's `main`); the command itself is run in the test below.
FIELDS = r"its fields: accumulation_steps, batch_size, .*, tokenizer, total_steps$"
CLI_CASES = {
    "misspelt override": (train, ["--config.total_step=5"],
                          r"^--config.total_step: config has no field 'total_step'; did you mean config.total_steps\? "
                          + FIELDS),
    "misspelt nested override": (train, ["--config.optimizer.learning_rat=0.1"],
                                 r"config.optimizer has no field 'learning_rat'; did you mean "
                                 r"config.optimizer.learning_rate\? its fields: b1, b2, clip_norm"),
    "no close field": (train, ["--config.model.size=huge"],
                       r"^--config.model.size: config.model has no field 'size'; its fields: activation_quantization, "
                       r"attention, dropout_rate, dtype, "),
    "a variant given as a field": (train, ["--config.size=base"],
                                   r"config has no field 'size'; size is a variant of configs/pretrain.py, not a "
                                   r"field: write --config=configs/pretrain.py:...,size=<value>"),
    "misspelt objective setting": (train, ["--config.objectives.mlm.mask_ratio=0.2"],
                                   r"config.objectives.mlm has no field 'mask_ratio'; did you mean "
                                   r"config.objectives.mlm.mask_rate\?"),
    "value of the wrong type": (train, ["--config.total_steps=abc"],
                                r"^--config.total_steps=abc: config.total_steps takes an int \(it is 1000 now\); give "
                                r"one, e.g. --config.total_steps=1000$"),
    "boolean of the wrong type": (train, ["--config.model.pre_layer_norm=maybe"],
                                  r"config.model.pre_layer_norm takes a bool \(it is True now\)"),
    "a group given a value": (train, ["--config.optimizer=3"],
                              r"config.optimizer is a group of fields \(b1, b2, .*\); set one of them"),
    "unknown size variant": (train, ["--config=configs/pretrain.py:objective=mlm,size=huge"],
                             r"^--config=configs/pretrain.py:objective=mlm,size=huge: unknown size 'huge'; choose one "
                             r"of tiny, small, base, large$"),
    "unknown variant": (train, ["--config=configs/pretrain.py:sise=tiny"],
                        r"unknown config variant 'sise' in 'sise=tiny'; variants: objective, size, data, platform$"),
    "no such config file": (train, ["--config=configs/pretrian.py"],
                            r"^--config=configs/pretrian.py: there is no config file 'configs/pretrian.py'"),
    "misspelt flag": (train, ["--workdirr=/tmp/x"], r"^Unknown command line flag 'workdirr'. Did you mean: workdir \?"),
    "compare: misspelt budget field": (compare, ["--config.budget.batch_sise=3"],
                                       r"config.budget has no field 'batch_sise'; did you mean "
                                       r"config.budget.batch_size\?"),
    "compare: unknown preset": (compare, ["--config=configs/compare.py:preset=t6"],
                                r"unknown comparison preset 't6'; choose one of objectives, "),
    "inspect_data: misspelt override": (inspect_data, ["--config.seq_lenn=3"],
                                        r"config has no field 'seq_lenn'; did you mean config.seq_len\?"),
    "evaluate: misspelt flag": (evaluate, ["--max_document=3"], r"Unknown command line flag 'max_document'"),
    "generate: bad enum": (generate, ["--mode=translate"],
                           r"flag --mode=translate: value should be one of <auto\|continue\|seq2seq\|fill>"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_bad_command_line_is_one_line_naming_the_field(tmp_path, name):
    tool, flags, message = CLI_CASES[name]
    with pytest.raises(SystemExit) as stopped:
        tool.main([tool.__name__, f"--workdir={tmp_path / 'run'}", *flags])
    text = str(stopped.value.code)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    assert re.search(message, text[len("error: "):]), text


def test_config_error_from_the_command_is_one_message_without_a_traceback(tmp_path):
    result = subprocess.run(command(tmp_path / "run", 10, **{"optimizer.warmup_steps": 50}), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert ("error: invalid config:\n  config.optimizer.warmup_steps=50 must lie in 0..config.total_steps=10"
            in result.stderr), result.stderr[-2000:]


# -- fine-tuning: what it reads before anything else -----------------------------------------

FINETUNE_CONFIG = f"--config={ROOT}/configs/finetune.py:task=files"


def task_directory(path, rows: str = '{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n'):
    """A `files` task directory whose train, dev and test files hold `rows`."""
    path.mkdir()
    for split in ("train", "dev", "test"):
        (path / f"{split}.jsonl").write_text(rows)
    return path


def test_a_misspelt_run_directory_is_named_by_the_flag_that_gave_it(tmp_path, monkeypatch):
    """`--config.init=runs/cml` (for runs/clm): the message names that flag, the runs beside
    it with close names, and a training command with no objective assumed; a directory
    named after an objective gets that objective in the command."""
    monkeypatch.chdir(tmp_path)
    for name in ("clm", "mlm", "unrelated"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    with pytest.raises(SystemExit) as stopped:
        finetune.main(["finetune", FINETUNE_CONFIG, f"--config.task_path={task_directory(tmp_path / 'task')}",
                       "--config.init=runs/cml", "--workdir=runs/ft"])
    assert stopped.value.code == (
        "error: --config.init=runs/cml does not exist (did you mean --config.init=runs/clm or "
        "--config.init=runs/mlm?); pass a training run's directory, or train one first: python -m pretrain.train "
        "--config=configs/pretrain.py:objective=<objective> --workdir=runs/cml")
    assert not (tmp_path / "runs" / "ft").exists(), "refused before the workdir was made"
    with pytest.raises(FileNotFoundError) as missing:
        read_run_config("elsewhere/clm", "--config.shape_from")
    assert str(missing.value) == (
        "--config.shape_from=elsewhere/clm does not exist; pass a training run's directory, or train one first: "
        "python -m pretrain.train --config=configs/pretrain.py:objective=clm --workdir=elsewhere/clm")


def test_a_fine_tune_reads_its_task_before_restoring_a_body_and_a_failed_start_leaves_no_lock(tmp_path_factory,
                                                                                              tmp_path, caplog):
    """The body's checkpoints are moved away, so a run that restored before reading its task
    would fail on them instead: a missing task_path and a task row that does not parse are
    refused first, before the workdir exists. With a good task the start fails on the
    checkpoints, after it took the lock: it leaves no train.lock, and the next start (the
    checkpoints back) is not refused."""
    body = tmp_path / "body"
    shutil.copytree(shared_finished_run(tmp_path_factory)[0], body)
    (body / "checkpoints").rename(tmp_path / "checkpoints-aside")
    workdir = tmp_path / "ft"
    flags = [FINETUNE_CONFIG, f"--config.init={body}", f"--workdir={workdir}", "--config.seq_len=64",
             "--config.batch_size=8", "--config.seeds=(0,)"]
    with pytest.raises(SystemExit) as stopped:
        finetune.main(["finetune", *flags, f"--config.task_path={tmp_path / 'reviews'}"])
    assert stopped.value.code == (
        f"error: invalid fine-tuning config:\n  config.task_path='{tmp_path / 'reviews'}' does not exist; give a "
        "directory holding train.jsonl, dev.jsonl and test.jsonl (or .tsv files)")
    task = task_directory(tmp_path / "task", rows="not json\n")
    with pytest.raises(SystemExit) as stopped:
        finetune.main(["finetune", *flags, f"--config.task_path={task}"])
    assert stopped.value.code == (f"error: {task / 'train.jsonl'}:1 is not JSON (Expecting value); write one JSON "
                                  "object per line")
    assert not workdir.exists(), "both refused before the workdir was made"

    for split in ("train", "dev", "test"):
        (task / f"{split}.jsonl").write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n')
    with pytest.raises(SystemExit) as stopped:
        finetune.main(["finetune", *flags, f"--config.task_path={task}"])
    assert stopped.value.code.startswith(f"error: {body} has no checkpoints/ directory: the run has not saved")
    assert os.listdir(workdir / "seed_0") == [], "no train.lock (nor anything else) left behind"

    (tmp_path / "checkpoints-aside").rename(body / "checkpoints")
    config = apply(get_finetune_config("task=files"), {"init": str(body), "task_path": str(task), "seq_len": 64,
                                                       "batch_size": 8, "seeds": (0,)})
    with FinetuneTrainer(config, str(workdir / "seed_0")) as trainer:  # not refused: the lock is free
        assert trainer.program.bodies[0].step == 40 and (workdir / "seed_0" / "train.lock").exists()
    assert not (workdir / "seed_0" / "train.lock").exists()
    assert [r.getMessage() for r in caplog.records if "test split" in r.getMessage()] == [  # said once, when it starts
        "the test split of task is small: 2 examples for 2 classes (1.0 per class), fewer than 100 (the rule: at "
        "least 100 examples and 5 per class on average), so its scores swing with a few examples; a larger test set "
        "gives scores worth their mean"]
