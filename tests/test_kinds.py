"""Task kinds as a registry: the one message for an unknown kind, detection of a file's
kind, and each kind's encoding, loss and decoding on literal inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain.transfer import kinds, pydocs_tasks, tasks
from pretrain.transfer.example import Record, TaskExample
from pretrain.transfer.kinds import registry


def all_kinds(*first: str) -> str:
    """The list an unknown-kind message ends with."""
    return ", ".join((*first, *kinds.registered_names()))


def write_split_files(directory, rows: str):
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        (directory / f"{split}.jsonl").write_text(rows, encoding="utf-8")
    return directory


def test_an_unknown_kind_is_one_message_naming_the_field_and_the_known_kinds(tmp_path):
    assert {"classification", "pair", "regression", "tagging"} <= set(kinds.registered_names())
    directory = write_split_files(tmp_path / "t", '{"text": "a", "label": "x"}\n')
    with pytest.raises(ValueError) as raised:
        tasks.load_files(directory, kind="sentiment")
    assert str(raised.value) == (f"config.task_kind='sentiment' is not a task kind; known kinds: "
                                 f"{all_kinds('auto')}")
    splits = {s: (TaskExample("a", label=0),) for s in tasks.SPLITS}
    with pytest.raises(ValueError) as raised:
        tasks.Task("reviews", "sentiment", ("x",), splits, "accuracy", "literal")
    assert str(raised.value) == f"task 'reviews': kind='sentiment' is not a task kind; known kinds: {all_kinds()}"
    with pytest.raises(ValueError, match=r"^config.task_metric='span_f1' is not a metric of a classification task; "
                                         r"choose one of \('accuracy', 'macro_f1', 'mcc'\)$"):
        tasks.Task("reviews", "classification", ("x",), splits, "span_f1", "literal")
    with pytest.raises(ValueError, match=r"^unknown metric 'bleu'; the task kinds report accuracy, "):
        kinds.score(("bleu",), (), [0], [0])


def test_a_metric_name_means_one_function_across_kinds():
    class Clash(kinds.Kind):  # reports an 'accuracy' of its own: refused before it is registered
        name = "clash"
        metrics = {"accuracy": kinds.values_metric(lambda gold, predicted: 0.0)}

    with pytest.raises(ValueError, match=r"^metric 'accuracy' of task kind 'clash' is another function"):
        kinds.register(Clash)
    assert "clash" not in kinds.registered_names()
    with pytest.raises(ValueError, match=r"^task kind 'pair' is registered twice$"):
        kinds.register(type(kinds.lookup("pair")))


@pytest.mark.parametrize("rows, real_valued, expected", [
    ([{"tokens": ["a"], "tags": ["O"]}], False, "tagging"),
    ([{"text": "a", "label": "x"}, {"text": "b", "text_b": "c", "label": "y"}], False, "pair"),
    ([{"text": "a", "label": "x"}], False, "classification"),
    ([{"text": "a", "text_b": "b", "label": 0.5}], True, "regression"),
])
def test_the_rows_tell_a_files_kind(rows, real_valued, expected):
    records = [Record(f"train.jsonl:{i + 1}", row) for i, row in enumerate(rows)]
    assert kinds.detect(records, real_valued).name == expected


def fields_of(kind: str, example: TaskExample, tokenizer, seq_len: int = 32) -> dict[str, list]:
    return {name: values.tolist() for name, values in kinds.lookup(kind).encode(example, 3, tokenizer, seq_len)
            .fields.items()}


def test_example_level_kinds_put_their_label_at_the_first_token(word_tokenizer):
    text = word_tokenizer.encode("the join").tolist()
    cls, sep = word_tokenizer.vocabulary().tokens["[CLS]"], word_tokenizer.vocabulary().tokens["[SEP]"]
    classified = fields_of("classification", TaskExample("the join", "ignored", label=2), word_tokenizer)
    assert classified["inputs"] == [cls, *text, sep] and classified["token_types"] == [0] * (len(text) + 2)
    assert classified["task_labels"] == [2] + [-1] * (len(text) + 1)
    assert classified["task_example"] == [3] + [-1] * (len(text) + 1)
    assert classified["task_values"] == [0.0] * (len(text) + 2)
    valued = fields_of("regression", TaskExample("the join", label=2.5), word_tokenizer)
    assert valued["task_labels"] == [0] + [-1] * (len(text) + 1) and valued["task_values"][:2] == [2.5, 0.0]
    paired = fields_of("pair", TaskExample("the join", "a path", label=1), word_tokenizer)
    second = word_tokenizer.encode("a path").tolist()
    assert paired["inputs"] == [cls, *text, sep, *second, sep]
    assert paired["token_types"] == [0] * (len(text) + 2) + [1] * (len(second) + 1)


def found(*triples):
    return [(np.int32(e), np.int32(w), v) for e, w, v in triples]


def test_each_kind_decodes_its_positions_and_keeps_a_default_elsewhere(word_tokenizer):
    examples = (TaskExample("a", label=1), TaskExample("b", label=0), TaskExample("c", label=1))
    classes = kinds.lookup("classification").decode(examples, ("no", "yes"), found((0, -1, np.int32(1)),
                                                                                    (2, -1, np.int32(0))), None)
    assert classes == [1, 0.0, 0] and [type(p) for p in classes] == [int, float, int]
    values = kinds.lookup("regression").decode(examples, (), found((1, -1, np.float32(0.25))), None)
    assert values == [0.0, 0.25, 0.0]
    tagged = (TaskExample(words=("a", "b", "c"), tags=(0, 1, 2)), TaskExample(words=("d",), tags=(2,)))
    tags = kinds.lookup("tagging").decode(tagged, pydocs_tasks.CODE_TAGS, found((0, 0, np.int32(0)),
                                                                                (0, 1, np.int32(1))), None)
    assert tags == [[0, 1, 2], [2]]  # unseen words are O (index 2 of B-CODE, I-CODE, O)
    assert [kinds.lookup("tagging").gold(e) for e in tagged] == [[0, 1, 2], [2]]


def test_each_kind_loss_on_literal_outputs():
    """Cross-entropy and argmax at labelled positions (classes, tags), squared error at
    the first token (values); unlabelled positions add nothing; the count is the
    labelled positions."""
    batch = {"task_labels": jnp.asarray([[1, -1, 0]]), "task_values": jnp.asarray([[2.0, 9.0, 0.0]])}
    outputs = jnp.asarray([[[0.0, jnp.log(3.0)], [5.0, 0.0], [jnp.log(3.0), 0.0]]])  # p(1) = 3/4, then p(0) = 3/4
    for name in ("classification", "pair", "tagging"):
        loss, correct, count, predictions = jax.device_get(kinds.lookup(name).loss(outputs, batch))
        np.testing.assert_allclose(loss, -2 * np.log(0.75), rtol=1e-6)
        assert (correct, count) == (2.0, 2.0) and predictions.tolist() == [[1, 0, 0]]
        assert float(kinds.lookup(name).count(batch)) == 2.0
    loss, correct, count, predictions = jax.device_get(kinds.lookup("regression").loss(outputs[..., :1], batch))
    assert float(loss) == pytest.approx(4.0 + np.log(3.0) ** 2, rel=1e-6) and (correct, count) == (0.0, 2.0)
    np.testing.assert_allclose(predictions, [[0.0, 5.0, np.log(3.0)]], rtol=1e-6)


def test_each_kind_reports_its_own_metrics_and_head():
    expected = {"classification": (("accuracy", "macro_f1", "mcc"), False, 3),
                "pair": (("accuracy", "macro_f1", "f1", "mcc"), False, 3),
                "tagging": (("span_f1", "token_accuracy"), True, 3), "regression": (("pearson", "spearman"), False, 1)}
    for name, (metrics, per_token, outputs) in expected.items():
        kind = kinds.lookup(name)
        assert (tuple(kind.metrics), kind.per_token, kind.num_outputs(("a", "b", "c"))) == expected[name]
    assert registry.lookup("pair").metrics["accuracy"] is registry.lookup("classification").metrics["accuracy"]
    assert kinds.score(("span_f1", "token_accuracy"), pydocs_tasks.CODE_TAGS, [[0, 1, 2]], [[0, 2, 2]]) == {
        "span_f1": 0.0, "token_accuracy": pytest.approx(2 / 3)}  # B-CODE I-CODE vs B-CODE O: another span
