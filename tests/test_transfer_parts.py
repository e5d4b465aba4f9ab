"""The parts of fine-tuning, each against literal expectations: metrics, schedules,
per-layer rates, unfreezing masks, pooling, tag alignment, task files and their errors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pretrain.model import create_model, preset
from pretrain.transfer import encoding, heads, kinds, methods, pydocs_tasks, scores, tasks

SETTINGS = {"discriminative": {"decay": 0.5, "head_gap": 0}, "stlr": {"cut_frac": 0.1, "ratio": 32.0},
            "gradual_unfreezing": {"every_steps": 3}, "aux_lm": {"objective": "", "start": 0.2, "end": 0.1,
                                                                 "decay_steps": 0},
            "probe": {"scalar_mix": False}}
OPTIMIZER = dict(learning_rate=1.0, warmup_fraction=0.1, weight_decay=0.0, clip_norm=0.0, b1=0.9, b2=0.999, eps=1e-12)


def test_metrics_on_literal_predictions():
    assert scores.accuracy([0, 1, 2, 2], [0, 2, 2, 2]) == 0.75
    # class 0: F1 1; class 1: F1 0 (never predicted); class 2: precision 2/3, recall 1 -> 0.8
    assert scores.macro_f1([0, 1, 2, 2], [0, 2, 2, 2]) == pytest.approx((1 + 0 + 0.8) / 3)
    assert scores.f1([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert scores.mcc([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0 and scores.mcc([1, 1, 0, 0], [0, 0, 1, 1]) == -1.0
    assert scores.mcc([1, 1, 0, 0], [1, 0, 1, 0]) == 0.0 and scores.mcc([1, 1, 1], [1, 1, 1]) == 0.0
    assert scores.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert scores.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert scores.spearman([1, 2, 3, 4], [4, 3, 3, 1]) == pytest.approx(-0.9486833, abs=1e-6)  # a tie: ranks 2.5, 2.5


def test_span_f1_decodes_bio_as_conlleval():
    assert scores.spans(["B-CODE", "I-CODE", "O", "B-CODE"]) == {(0, 2, "CODE"), (3, 4, "CODE")}
    assert scores.spans(["O", "I-CODE", "I-CODE", "B-CODE", "I-X"]) == {(1, 3, "CODE"), (3, 4, "CODE"), (4, 5, "X")}
    gold = [["B-CODE", "I-CODE", "O", "B-CODE"], ["O", "O"]]
    predicted = [["B-CODE", "O", "O", "B-CODE"], ["B-CODE", "O"]]
    # gold spans (0,2), (3,4); predicted (0,1), (3,4), and (0,1) in the second: 1 correct of 3 found, 2 expected
    assert scores.span_f1(gold, predicted) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert scores.token_accuracy(gold, predicted) == pytest.approx(4 / 6)


def test_slanted_triangular_and_warmup_linear_rates():
    stlr = methods.stlr_schedule(1.0, 100, cut_frac=0.1, ratio=32)
    assert [float(stlr(t)) for t in (0, 5, 10, 55, 100)] == [1 / 32, 16.5 / 32, 1.0, 16.5 / 32, 1 / 32]
    bert = methods.warmup_linear_schedule(1.0, 100, 0.1)
    assert [float(bert(t)) for t in (0, 5, 10, 55, 100)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    for peak, total, fraction in ((3e-3, 50, 0.1), (1e-2, 181, 0.06), (0.1, 7, 0.5)):  # bit for bit: optax's join
        warmup = max(1, round(total * fraction))
        reference = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                          optax.linear_schedule(peak, 0.0, total - warmup)], [warmup])
        ours = methods.warmup_linear_schedule(peak, total, fraction)
        traced = jax.jit(lambda t, w, n: methods._warmup_linear(peak, w, n)(t))  # noqa: B023
        for t in range(total + 2):
            assert float(ours(jnp.asarray(t))) == float(reference(jnp.asarray(t))), (peak, total, t)
            # compiled with traced breakpoints (a sweep's), XLA may fuse a multiply-add: 2 float32 ulps
            np.testing.assert_allclose(float(traced(jnp.asarray(t), jnp.asarray(warmup), jnp.asarray(total))),
                                       float(reference(t)), rtol=5e-7, atol=0)
    coefficient = lambda step: float(methods.aux_coefficient(SETTINGS["aux_lm"], step, 100))  # noqa: E731
    assert coefficient(0) == pytest.approx(0.2) and coefficient(100) == pytest.approx(0.1)
    assert coefficient(50) == pytest.approx(np.sqrt(0.2 * 0.1)) and coefficient(400) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def task_params():
    model = heads.TaskModel([create_model(preset("tiny", vocab_size=64))], ["bidirectional"], ["first"], 3,
                            per_token=False)
    params = nnx.state(model, nnx.Param)
    return params, heads.parameter_depths(params, [2])


def updates_over(spec: str, params, depths, steps: int, settings=SETTINGS) -> list[dict[tuple, float]]:
    """The largest |update| of each parameter at each of `steps` updates of a constant gradient."""
    optimizer = methods.make_optimizer(methods.plan(spec, settings, depths, 100), params, OPTIMIZER, settings, 100)
    state, grads, out = optimizer.init(params), jax.tree.map(jnp.ones_like, params), []
    for _ in range(steps):
        updates, state = optimizer.update(grads, state, params)
        out.append({heads.path_of(keys): float(jnp.abs(u).max())
                    for keys, u in jax.tree_util.tree_flatten_with_path(updates)[0]})
    return out


def test_parameter_depths_run_from_the_head_to_the_embeddings(task_params):
    _, depths = task_params
    assert depths[("head_kernel",)] == 0 and depths[("bodies", 0, "final_norm", "scale")] == 1
    assert depths[("bodies", 0, "blocks", 1, "mlp", "wi")] == 1 and depths[("bodies", 0, "blocks", 0, "mlp", "wi")] == 2
    assert depths[("bodies", 0, "token_embedding")] == 3 and depths[("bodies", 0, "position_embedding")] == 3


@pytest.mark.parametrize("decay, head_gap", [(0.5, 0), (methods.ULMFIT_DECAY, 0), (methods.ELECTRA_DECAY, 1)],
                         ids=["0.5", "ulmfit", "electra"])
def test_discriminative_rates_follow_the_formula(task_params, decay, head_gap):
    """On a constant gradient Adam's step is the learning rate itself, so each group's
    update is lr * decay**depth (ELECTRA's code adds one to every body depth)."""
    params, depths = task_params
    settings = {**SETTINGS, "discriminative": {"decay": decay, "head_gap": head_gap}}
    step = updates_over("discriminative", params, depths, 6, settings)[5]
    head = step[("head_kernel",)]
    assert head == pytest.approx(0.5, rel=1e-5)  # warmup over 10 steps: the 6th update (t=5) is at half the peak
    for path, depth in depths.items():
        expected = decay ** (depth + (head_gap if depth else 0))
        assert step[path] == pytest.approx(head * expected, rel=1e-5), path


def test_gradual_unfreezing_starts_each_group_at_its_step(task_params):
    params, depths = task_params
    history = updates_over("gradual_unfreezing", params, depths, 12)
    for path, depth in depths.items():
        start = depth * SETTINGS["gradual_unfreezing"]["every_steps"]
        assert all(step[path] == 0.0 for step in history[max(start, 1) - 1 if start else 0 : start]), path
        assert all(step[path] > 0.0 for step in history[max(start, 1) :]), path


def test_probe_trains_only_the_task_parameters(task_params):
    params, depths = task_params
    for step in updates_over("probe", params, depths, 3)[1:]:
        assert all(step[path] == 0.0 for path in depths if path[0] == "bodies")
        assert step[("head_kernel",)] > 0


def test_methods_that_clash_are_refused():
    with pytest.raises(ValueError, match=r"config.method='probe\+discriminative': 'probe' freezes the bodies"):
        methods.parse_methods("probe+discriminative")
    with pytest.raises(ValueError, match=r"config.method='ulmfit': unknown method 'ulmfit'; choose from full, probe"):
        methods.parse_methods("ulmfit")
    assert methods.parse_methods("discriminative+stlr+gradual_unfreezing") == (
        "discriminative", "stlr", "gradual_unfreezing")


def test_pooling_reads_each_example_of_a_packed_row():
    hidden = jnp.arange(2 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 1)  # value = position index (+6 in row 1)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(heads.pool(hidden, segments, "first")[..., 0],
                                  [[0, 0, 0, 3, 3, 5], [6, 6, 6, 6, 6, 6]])
    np.testing.assert_array_equal(heads.pool(hidden, segments, "last")[..., 0],
                                  [[2, 2, 2, 4, 4, 5], [11, 11, 11, 11, 11, 11]])
    concat = heads.pool(hidden, segments, "concat")  # last, max, mean
    np.testing.assert_array_equal(concat[0, 0], [2, 2, 1])
    np.testing.assert_array_equal(concat[0, 4], [4, 4, 3.5])
    np.testing.assert_array_equal(concat[1, 0], [11, 11, 8.5])
    np.testing.assert_array_equal(heads.pool(hidden, segments, "mean")[..., 0],
                                  [[1, 1, 1, 3.5, 3.5, 5], [8.5, 8.5, 8.5, 8.5, 8.5, 8.5]])


def test_the_fusion_gate_weighs_bodies_per_example():
    gate = heads.Gate([4, 6], nnx.Rngs(params=0))
    keys = jax.random.split(jax.random.key(1), 2)
    features = [jax.random.normal(keys[0], (2, 5, 4)), jax.random.normal(keys[1], (2, 5, 6))]
    weights = np.asarray(gate.weights(features))
    assert weights.shape == (2, 5, 2)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert np.ptp(weights[..., 0]) > 1e-3  # examples with other features get other weights: not one global gate
    joined = np.concatenate([np.asarray(f) for f in features], -1)  # the gate's formula, example by example
    logits = joined @ np.asarray(gate.kernel[...]) + np.asarray(gate.bias[...])
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(weights, expected / expected.sum(-1, keepdims=True), rtol=1e-5)
    mixed = sum(weights[..., i : i + 1] * (np.asarray(f) @ np.asarray(p[...]))
                for i, (f, p) in enumerate(zip(features, gate.projections)))
    np.testing.assert_allclose(np.asarray(gate(features)), mixed, rtol=1e-5, atol=1e-6)


def test_tags_sit_on_each_words_first_piece(word_tokenizer):
    words = ("Call", "os.path.join", "now")
    pieces = [len(word_tokenizer.encode(w)) for w in words]
    assert pieces == [4, 8, 3]  # words are spelt in several pieces of this small vocabulary
    task = tasks.Task("t", "tagging", pydocs_tasks.CODE_TAGS, {s: (tasks.TaskExample(),) for s in tasks.SPLITS},
                      "span_f1", "test")
    encoded = encoding.encode(tasks.TaskExample(words=words, tags=(2, 0, 2)), 7, task, word_tokenizer, 64).fields
    np.testing.assert_array_equal(encoded["task_labels"],
                                  [-1, 2, -1, -1, -1, 0, -1, -1, -1, -1, -1, -1, -1, 2, -1, -1, -1])
    np.testing.assert_array_equal(encoded["task_word"],
                                  [-1, 0, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1, -1, 2, -1, -1, -1])
    np.testing.assert_array_equal(encoded["task_example"] >= 0, encoded["task_labels"] >= 0)
    assert encoded["inputs"][0] == 4 and encoded["inputs"][-1] == 5  # [CLS] ... [SEP]
    assert encoded["inputs_causal"][0] == 2 and encoded["inputs_causal"][-1] == 3  # [BOS] ... [EOS]
    cut = encoding.encode(tasks.TaskExample(words=words, tags=(2, 0, 2)), 7, task, word_tokenizer, 11).fields
    assert cut["task_word"].tolist() == [-1, 0, -1, -1, -1, -1]  # the second word does not fit: it and the rest go


def test_pydocs_qa_asks_for_each_definition_in_a_docstring():
    """Each entry of a docstring's definition lists is a question on the docstring (its
    whitespace collapsed) whose answer is the entry's description; a long docstring's
    passage is one of its lists alone."""
    docstring = """Move the turtle.

    Arguments:
        distance -- a number, how far
            to go
        speed -- an integer

    Returns:
        The new position.

    :raises ValueError: if distance is negative
    """
    passage = ("Move the turtle. Arguments: distance -- a number, how far to go speed -- an integer Returns: The new "
               "position. :raises ValueError: if distance is negative")
    examples = pydocs_tasks.qa_examples("turtle.Turtle.forward", docstring)
    assert [(e.text, e.text_b, [e.text_b[a:b] for a, b in e.answers]) for e in examples] == [
        ("What is distance of forward?", passage, ["a number, how far to go"]),
        ("What is speed of forward?", passage, ["an integer"]),
        ("What does forward return?", passage, ["The new position."]),
        ("When does forward raise ValueError?", passage, ["if distance is negative"])]
    long = "Word " * 160 + "\n\n  Args:\n    a: the first.\n    b (int): the second.\n\n  c -- alone\n"
    assert [(e.text, e.text_b) for e in pydocs_tasks.qa_examples("m.C.__init__", long)] == [
        ("What is a of C.__init__?", "a: the first. b (int): the second."),
        ("What is b of C.__init__?", "a: the first. b (int): the second.")]  # a list of one entry is no passage


def test_code_spans_become_bio_tags():
    words, tags = pydocs_tasks.code_span_words('The simple form, "assert expression", is equivalent to "x".')
    assert words == ("The", "simple", "form,", "assert", "expression", ",", "is", "equivalent", "to", "x", ".")
    assert [pydocs_tasks.CODE_TAGS[t] for t in tags] == ["O", "O", "O", "B-CODE", "I-CODE", "O", "O", "O", "O",
                                                          "B-CODE", "O"]


def test_a_pair_is_cut_longer_text_first_and_types_mark_the_second(word_tokenizer):
    task = tasks.Task("p", "pair", ("no", "yes"), {s: (tasks.TaskExample(),) for s in tasks.SPLITS}, "accuracy", "t")
    example = tasks.TaskExample("the join of two paths is a path " * 3, "open the file", label=1)
    fields = encoding.encode(example, 0, task, word_tokenizer, 16).fields
    second = len(word_tokenizer.encode("open the file"))
    assert len(fields["inputs"]) == 16 and fields["token_types"].tolist() == [0] * (15 - second) + [1] * (second + 1)
    assert fields["task_labels"].tolist() == [1] + [-1] * 15


def write_task(directory, files: dict[str, str]):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


ROWS = '{"text": "a good film", "label": "pos"}\n{"text": "a bad film", "label": "neg"}\n'


def test_task_files_in_every_form(tmp_path):
    jsonl = tasks.load_files(write_task(tmp_path / "j", {f"{s}.jsonl": ROWS for s in ("train", "dev", "test")}))
    assert jsonl.kind == "classification" and jsonl.labels == ("neg", "pos") and jsonl.splits["test"][1].label == 0
    pairs = tasks.load_files(write_task(tmp_path / "p", {f"{s}.tsv": "text\ttext_b\tlabel\na\tb\tyes\nc\td\tno\n"
                                                         for s in ("train", "validation", "test")}))
    assert pairs.kind == "pair" and pairs.splits["dev"][0] == tasks.TaskExample("a", "b", 1)
    conll = "Call\tO\nos.path\tB-CODE\n\nnow\tO\n"
    tagging = tasks.load_files(write_task(tmp_path / "t", {f"{s}.tsv": conll for s in ("train", "dev", "test")}))
    assert tagging.kind == "tagging" and tagging.splits["train"][0] == tasks.TaskExample(words=("Call", "os.path"),
                                                                                          tags=(1, 0))
    values = '{"text": "x", "label": 0.5}\n{"text": "y", "label": 4}\n'
    regression = tasks.load_files(write_task(tmp_path / "r", {f"{s}.jsonl": values for s in ("train", "dev", "test")}),
                                  kind="regression")
    assert regression.num_outputs == 1 and [e.label for e in regression.splits["train"]] == [0.5, 4.0]


BAD_FILES = {
    "a row without a label": ({"train.jsonl": ROWS + '{"text": "no label here"}\n'},
                              r"train.jsonl:3 has no 'label'; add \"label\" to every row"),
    "a test label never trained on": ({"test.jsonl": ROWS + '{"text": "so so", "label": "mixed"}\n'},
                                      r"test.jsonl:3: label 'mixed' never occurs in the training file, so no model can "
                                      r"learn it; the training labels are \['neg', 'pos'\]"),
    "an empty file": ({"dev.jsonl": ""}, r"dev.jsonl holds no examples; put at least one row in it"),
    "tags and tokens of different lengths": ({"train.jsonl": '{"tokens": ["a", "b"], "tags": ["O"]}\n'},
                                             r"train.jsonl:1: 2 tokens but 1 tags; give one tag per token"),
    "no test file": ({"test.jsonl": None}, r"has no test file: add test.jsonl or test.tsv"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_task_files_name_the_file_the_line_and_the_fix(tmp_path, name):
    files, message = BAD_FILES[name]
    directory = write_task(tmp_path / "task", {f"{s}.jsonl": ROWS for s in ("train", "dev", "test")})
    for file, text in files.items():
        (directory / file).unlink() if text is None else (directory / file).write_text(text, encoding="utf-8")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        tasks.load_files(directory)


def test_the_pydocs_test_split_is_the_pretraining_heldout_split():
    """No test text occurs in a document that pretraining trains on; test texts come from
    held-out pydocs documents, or from docstrings too short to be a document at all
    (checked on the pair task, whose texts are unmasked)."""
    from ml_collections import ConfigDict

    from pretrain.sources import make_source

    config = ConfigDict(dict(test_fraction=0.1, dev_fraction=0.1, task_min_words=5, task_min_examples=30,
                             task_max_examples=0, task_metric=""))
    pretraining = ConfigDict(dict(kind="pydocs", heldout_fraction=0.1))
    source = make_source("pydocs", heldout_fraction=0.1)
    flat = lambda documents: "\n".join(" ".join(d.text.split()) for d in documents)  # noqa: E731
    train_text, heldout_text = flat(source.split("train")), flat(source.split("heldout"))
    for name, least in (("pydocs_topic", 300), ("pydocs_sentence_topic", 300), ("pydocs_same_module", 300),
                        ("pydocs_code_spans", 100), ("pydocs_qa", 15)):
        assert len(pydocs_tasks.build(name, config, pretraining).splits["test"]) >= least, name
    qa = pydocs_tasks.build("pydocs_qa", config, pretraining)  # its passages are unmasked docstrings too
    assert sum(len(examples) for examples in qa.splits.values()) >= 500
    assert not [e.text_b for e in qa.splits["test"] if e.text_b in train_text]
    assert not {e.text_b for e in qa.splits["test"]} & {e.text_b for e in qa.splits["train"] + qa.splits["dev"]}
    pairs = pydocs_tasks.build("pydocs_same_module", config, pretraining)
    texts = [text for example in pairs.splits["test"] for text in (example.text, example.text_b)]
    assert not [text for text in texts if text in train_text]
    assert sum(text in heldout_text for text in texts) > 0.8 * len(texts)
    assert sum(example.text in train_text for example in pairs.splits["train"]) > 0.8 * len(pairs.splits["train"])


def test_a_task_holds_further_test_sets_named_test_something():
    """`test_<name>` splits are test sets beside `test`, in the fingerprint (a task without
    them hashes as before they existed: the literal is that of the code before); any
    other split name is refused."""
    example = tasks.TaskExample
    splits = {"train": (example("a", label=0), example("b", label=1)), "dev": (example("c", label=1),),
              "test": (example("d", label=0),)}
    plain = tasks.Task("t", "classification", ("neg", "pos"), splits, "accuracy", "literal")
    more = tasks.Task("t", "classification", ("neg", "pos"), {**splits, "test_other": (example("e", label=1),)},
                      "accuracy", "literal")
    assert plain.fingerprint == "e0803b2cdd89" and plain.test_splits == ("test",)
    assert more.test_splits == ("test", "test_other") and more.evaluation_splits == ("dev", "test", "test_other")
    assert more.fingerprint == "b8a371772be8"
    assert tasks.label_subset(more, 0.5).splits["test_other"] == more.splits["test_other"]
    with pytest.raises(ValueError, match=r"task 't' has a split 'heldout' \(literal\); a task's splits are train, "
                                         r"dev, test and further test sets named test_<name>"):
        tasks.Task("t", "classification", ("neg", "pos"), {**splits, "heldout": splits["test"]}, "accuracy", "literal")
    with pytest.raises(ValueError, match=r"task 't' has no test_other examples"):
        tasks.Task("t", "classification", ("neg", "pos"), {**splits, "test_other": ()}, "accuracy", "literal")



def test_answers_enter_the_fingerprint_only_when_set():
    """A field added after the first five (answers) is hashed only when an example sets
    it, so every task made before it keeps its fingerprint (the literal above)."""
    plain, answered = tasks.TaskExample("q", "a passage"), tasks.TaskExample("q", "a passage", answers=((2, 9),))
    assert plain.hashed() == ("q", "a passage", 0, (), ())
    assert answered.hashed() == ("q", "a passage", 0, (), (), ((2, 9),))
    assert tasks.fingerprint((), {"train": (plain,)}) != tasks.fingerprint((), {"train": (answered,)})


MNLI = ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")


@pytest.mark.parametrize("available, expected", [
    (("train", "validation", "test"), {"test": "validation"}),  # GLUE's single-validation tasks
    (MNLI, {"test": "validation_matched", "test_mismatched": "validation_mismatched"}),
    (("train", "test", "unsupervised"), {"test": "test"}),  # no validation split (IMDB): its test split
    (("train", "validation_b", "validation_a"), {"test": "validation_a", "test_b": "validation_b"}),
    (("train", "validation_x", "validation"), {"test": "validation", "test_x": "validation_x"}),
    (("train", "validation_extra", "validation_matched"), {"test": "validation_matched",
                                                           "test_extra": "validation_extra"}),  # matched before name
])
def test_tfds_test_sets_follow_the_split_names(available, expected):
    assert tasks.tfds_test_splits("d", available) == expected


def mnli_config(name: str, data_dir) -> Any:
    """The config a user's `--config=configs/finetune.py:task=tfds --config.task_tfds_name=...` gives."""
    from configs.finetune import get_config

    config = get_config("task=tfds,method=full")
    config.task_tfds_name, config.task_tfds_data_dir, config.dev_fraction = name, str(data_dir), 0.3
    return config


def test_mnli_through_tfds_scores_both_validation_splits(tmp_path):
    """An MNLI-shaped TFDS dataset (train, validation_matched, validation_mismatched and
    unlabelled test_matched, test_mismatched) built locally: validation_matched is the
    test set, validation_mismatched the further test set test_mismatched, dev a share of
    train; the unlabelled test splits are not read."""
    import tfds_fixture

    name = tfds_fixture.prepare_glue(tmp_path / "tfds", "mnli")
    task = tasks.load_task(mnli_config(name, tmp_path / "tfds"))

    def rows(split: str) -> tuple[tasks.TaskExample, ...]:
        return tuple(tasks.TaskExample(p, h, label) for p, h, label in tfds_fixture.GLUE_MNLI[split])

    assert task.kind == "pair" and task.labels == ("entailment", "neutral", "contradiction")
    assert task.test_splits == ("test", "test_mismatched")
    assert {split: len(examples) for split, examples in task.splits.items()} == {
        "train": 18, "dev": 14, "test": 4, "test_mismatched": 3}
    assert task.splits["test"] == rows("validation_matched")
    assert task.splits["test_mismatched"] == rows("validation_mismatched")
    assert sorted(task.splits["train"] + task.splits["dev"], key=repr) == sorted(rows("train"), key=repr)
    assert task.describe() == (f"{name} (pair, 3 labels; train 18, dev 14, test 4, test_mismatched 3; selected by dev "
                               f"accuracy; TFDS {name} in {tmp_path / 'tfds'} (test: its validation_matched split; "
                               "test_mismatched: its validation_mismatched split; dev: 30% of train by hash))")


BAD_TFDS_SPLITS = {
    "only unlabelled test splits": (
        ("train", "test_matched", "test_mismatched"),
        r"TFDS dataset 'glue_tiny/mnli': its 'test_matched' split, the test set, has no labelled example \(2 "
        r"records, labels hidden as -1 as GLUE's test labels are; its splits: test_matched, test_mismatched, train\); "
        r"prepare it with a labelled 'validation' split$"),
    "no validation or test split": (
        ("train", "unsupervised"),
        r"TFDS dataset 'glue_tiny/mnli' has no validation or test split to score on \(its splits: train, "
        r"unsupervised\); prepare it with a labelled 'validation' split, e.g. by holding out part of its training "
        r"data$"),
    "no train split": (
        ("validation_matched", "validation_mismatched"),
        r"TFDS dataset 'glue_tiny/mnli' has no 'train' split \(its splits: validation_matched, "
        r"validation_mismatched\); a fine-tuning task trains on 'train': prepare the dataset with one$"),
}


@pytest.mark.parametrize("case", list(BAD_TFDS_SPLITS))
def test_tfds_splits_without_a_test_set_name_the_splits_and_the_fix(tmp_path, case):
    import tfds_fixture

    splits, message = BAD_TFDS_SPLITS[case]
    rows = {split: tfds_fixture.GLUE_MNLI.get(split, tfds_fixture.GLUE_MNLI["train"][:2]) for split in splits}
    name = tfds_fixture.prepare_glue(tmp_path / "tfds", "mnli", rows)
    with pytest.raises(ValueError, match=message):
        tasks.load_task(mnli_config(name, tmp_path / "tfds"))


def summary_of(mean: float, std: float) -> dict:
    return {"metric": "accuracy", "seeds": 3, "test": {"accuracy": {"mean": mean, "std": std, "per_seed": []}}}


def test_the_downstream_table_bolds_only_a_lead_beyond_the_pooled_spread():
    from pretrain.transfer import downstream_report as comparison

    results = {"mlm": {"t/full": summary_of(0.50, 0.02), "u/full": summary_of(0.40, 0.10)},
               "clm": {"t/full": summary_of(0.45, 0.02), "u/full": summary_of(0.45, 0.10)},
               "fusion(mlm+clm)": {"t/full": summary_of(0.48, 0.01), "u/full": summary_of(0.30, 0.05)}}
    # t: 0.50 leads 0.48 by 0.02 > sqrt((0.02² + 0.01²) / 2) = 0.0158: bold. u: 0.45 leads 0.40 by 0.05 < 0.10: none.
    assert comparison.table(results).splitlines() == [
        "| run | t/full (accuracy) | u/full (accuracy) |", "|---|---:|---:|",
        "| mlm | **0.500 ± 0.020** | 0.400 ± 0.100 |", "| clm | 0.450 ± 0.020 | 0.450 ± 0.100 |",
        "| fusion(mlm+clm) | 0.480 ± 0.010 | 0.300 ± 0.050 |"]
    assert comparison.fusion_lines(results) == [
        "fusion(mlm+clm) on t/full: 0.480, does not beat every body it fuses (best single: mlm 0.500, "
        "difference -0.020)",
        "fusion(mlm+clm) on u/full: 0.300, does not beat every body it fuses (best single: clm 0.450, "
        "difference -0.150)"]
    one_seed = {name: {column: {**summary, "seeds": 1} for column, summary in row.items()}
                for name, row in results.items()}
    assert comparison.table(one_seed).splitlines()[2:] == [  # one seed: no spread, so nothing is bold
        "| mlm | 0.500 ± n/a | 0.400 ± n/a |", "| clm | 0.450 ± n/a | 0.450 ± n/a |",
        "| fusion(mlm+clm) | 0.480 ± n/a | 0.300 ± n/a |"]
    results["mlm"]["t/full"]["vs_control"] = {"bootstrap": {"p": 0.004}}
    results["clm"]["t/full"]["vs_control"] = {"bootstrap": {"p": 0.03}}
    results["clm"]["u/full"]["vs_control"] = {"bootstrap": {"p": 0.2}}
    assert comparison.table(results).splitlines()[2:4] == [
        "| mlm | **0.500 ± 0.020**‡ | 0.400 ± 0.100 |", "| clm | 0.450 ± 0.020† | 0.450 ± 0.100 |"]


def test_a_small_test_split_is_warned_about_once_by_a_stated_rule():
    """At least 100 test examples, and 5 per class on average: pydocs_topic's test split at
    the default data.heldout_fraction=0.02 (129 examples, 54 classes) is warned about, the
    README's 0.1 (300-500) is not; a regression or tagging task counts examples only."""
    from configs.finetune import get_config as finetune_config
    from configs.pretrain import get_config as pretrain_config
    from pretrain.transfer.trainer import small_test_warning

    def task(name: str, kind: str, classes: int, test: int) -> tasks.Task:
        labels = tuple(f"c{i}" for i in range(classes))
        example = tasks.TaskExample("text", "other" if kind == "pair" else None, 0) if kind != "tagging" else \
            tasks.TaskExample(words=("w",), tags=(0,))
        return tasks.Task(name, kind, labels, {"train": (example,), "dev": (example,), "test": (example,) * test},
                          kinds.lookup(kind).default_metric, "literal")

    config, pydocs = finetune_config(), pretrain_config().data
    assert small_test_warning(task("pydocs_topic", "classification", 54, 129), config, pydocs) == (
        "the test split of pydocs_topic is small: 129 examples for 54 classes (2.4 per class), fewer than 270 (the "
        "rule: at least 100 examples and 5 per class on average), so its scores swing with a few examples; it is "
        "the pydocs held-out split of the body's pretraining (data.heldout_fraction=0.02), so pretrain with "
        "--config.data.heldout_fraction=0.1 for a test set worth its mean")
    assert small_test_warning(task("pydocs_topic", "classification", 54, 270), config, pydocs) is None
    assert small_test_warning(task("reviews", "pair", 2, 99), config, pydocs) == (
        "the test split of reviews is small: 99 examples for 2 classes (49.5 per class), fewer than 100 (the rule: "
        "at least 100 examples and 5 per class on average), so its scores swing with a few examples; a larger test "
        "set gives scores worth their mean")
    assert small_test_warning(task("reviews", "pair", 2, 100), config, pydocs) is None
    assert small_test_warning(task("spans", "tagging", 3, 99), config, pydocs).startswith(
        "the test split of spans is small: 99 examples, fewer than 100 (")
    config.task_max_examples = 48
    assert small_test_warning(task("pydocs_topic", "classification", 54, 48), config, pydocs).endswith(
        "with a few examples; --config.task_max_examples=48 keeps it this small; raise it, or 0 keeps all")


def test_the_sentence_task_is_the_topic_task_read_sentence_by_sentence():
    """pydocs_sentence_topic holds the sentences (of at least task_min_words words) of
    pydocs_topic's docstrings, masked, with the same package (of the packages both keep): train and dev together hold
    those of topic's train and dev (dev is drawn by the hash of the sentence, so the two
    tasks split it differently), and test those of topic's test minus any sentence that
    also occurs in a pretraining document. Its labels are the packages with at least 3 x
    task_min_examples sentences."""
    from collections import Counter

    from ml_collections import ConfigDict

    assert pydocs_tasks.sentences_of("Return the sum of a and b. Both are numbers. See e.g. the manual for more.",
                                     4) == ("Return the sum of a and b.", "See e.g. the manual for more.")
    config = ConfigDict(dict(test_fraction=0.1, dev_fraction=0.1, task_min_words=5, task_min_examples=30,
                             task_max_examples=0, task_metric=""))
    pretraining = ConfigDict(dict(kind="pydocs", heldout_fraction=0.1))
    topic = pydocs_tasks.build("pydocs_topic", config, pretraining)
    sentence = pydocs_tasks.build("pydocs_sentence_topic", config, pretraining)
    assert sentence.kind == "classification" and sentence.metric == "accuracy"
    common = set(sentence.labels) & set(topic.labels)  # (a package of few, long docstrings is only in one)
    assert len(sentence.labels) >= 30 and len(common) >= 0.9 * len(sentence.labels)

    def counts(task, splits):
        return Counter((text, task.labels[e.label]) for split in splits for e in task.splits[split]
                       for text in (pydocs_tasks.sentences_of(e.text, 5) if task is topic else (e.text,))
                       if task.labels[e.label] in common)

    # topic's texts are split after masking, the task's before: a masked name next to a
    # full stop moves a sentence boundary in a handful of sentences (19 of 8,067 here)
    got, expected = counts(sentence, ("train", "dev")), counts(topic, ("train", "dev"))
    assert sum(((got - expected) + (expected - got)).values()) <= 0.005 * sum(expected.values())
    tested, expected = counts(sentence, ("test",)), counts(topic, ("test",))
    assert tested and not tested - expected and sum(tested.values()) >= 0.8 * sum(expected.values())
    assert all(n >= 90 for n in Counter(e.label for split in tasks.SPLITS for e in sentence.splits[split]).values())
    assert not any(label.lstrip("_") in text.lower().split() for e in sentence.splits["train"]
                   for text, label in [(e.text, sentence.labels[e.label])])  # the package's name is masked
