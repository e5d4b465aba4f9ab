"""Extractive span QA against literal expectations: characters to pieces, the row, the
loss over passage positions, best-span decoding (run_squad.py's rules) and SQuAD
v1.1's exact match and F1."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain.transfer import kinds, tasks
from pretrain.transfer.example import TaskExample
from pretrain.transfer.kinds import span_qa

PASSAGE = "Call os.path.join on (the) parts, then open the file."
QA = kinds.lookup("span_qa")


def spelt(passage: str, words) -> list[list[str]]:
    return [[passage[first:last] for _, first, last in word] for word in words]


def test_characters_map_to_the_pieces_that_spell_them(word_tokenizer):
    words = span_qa.passage_words(PASSAGE, word_tokenizer)
    assert spelt(PASSAGE, words)[:4] == [["", "C", "al", "l"], ["", "os", ".", "path", ".", "j", "o", "in"],
                                         ["", "on"], ["", "(", "t", "he", ")"]]
    pieces = [piece for word in words for piece in word]
    assert [i for i, _, _ in pieces] == word_tokenizer.encode(PASSAGE.split()[0]).tolist() + [
        i for w in PASSAGE.split()[1:] for i in word_tokenizer.encode(w).tolist()]
    assert span_qa.answer_pieces(pieces, 8, 12) == (7, 7)  # "path" inside "os.path.join"
    assert span_qa.answer_pieces(pieces, 5, 17) == (5, 11)  # the whole word, not its boundary mark
    assert span_qa.answer_pieces(pieces, 22, 25) == (16, 17)  # "the" inside "(the)": the brackets left out
    assert span_qa.answer_pieces(pieces, 100, 104) is None
    # a word whose pieces do not spell it (an unknown character): every piece spans the word
    unknown = span_qa.passage_words("Ωmega is", word_tokenizer)
    assert {(first, last) for _, first, last in unknown[0]} == {(0, 5)} and len(unknown[0]) == 5
    assert spelt("Ωmega is", unknown)[1] == ["i", "s"]


def test_a_qa_row_marks_the_answer_pieces_in_the_passage(word_tokenizer):
    example = TaskExample("What is path?", PASSAGE, answers=((8, 12), (5, 17)))
    fields = {k: v.tolist() for k, v in QA.encode(example, 3, word_tokenizer, 64).fields.items()}
    question = word_tokenizer.encode("What is path?").tolist()
    passage = [i for w in PASSAGE.split() for i in word_tokenizer.encode(w).tolist()]
    first = len(question) + 2
    assert fields["inputs"] == [4, *question, 5, *passage, 5]  # [CLS] question [SEP] passage [SEP]
    assert fields["token_types"] == [0] * first + [1] * (len(passage) + 1)
    assert fields["task_labels"] == [-1] * first + [0] * 7 + [span_qa.START | span_qa.END] + [0] * 28 + [-1]
    assert fields["task_word"] == [-1] * first + list(range(len(passage))) + [-1]
    assert fields["task_example"] == [-1] * first + [3] * len(passage) + [-1]
    cut = QA.encode(example, 3, word_tokenizer, 16).fields  # question cut to 6 pieces, then the words that fit
    assert cut["task_labels"].tolist() == [-1] * 8 + [0, 0, 0, 0] + [-1]  # the answer is cut off: no loss term
    assert float(QA.count({"task_labels": jnp.asarray(cut["task_labels"])[None]})) == 0.0


def test_the_loss_is_the_mean_of_start_and_end_cross_entropy_over_each_passage():
    """Two examples packed in one row; the question positions carry huge logits that a
    softmax over the whole row would take, and must not."""
    labels = jnp.asarray([[-1, 0, span_qa.START, span_qa.END, -1, 0, span_qa.START | span_qa.END]])
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2]])
    log2, log3 = float(np.log(2)), float(np.log(3))
    start = [100.0, 0.0, log2, 0.0, 100.0, 0.0, 0.0]  # p(gold start) = 1/2 and 1/2
    end = [100.0, 0.0, 0.0, log2, 100.0, log3, 0.0]  # p(gold end) = 1/2 and 1/4
    outputs = jnp.asarray([list(zip(start, end))], jnp.float32)
    batch = {"task_labels": labels, "segment_ids": segments}
    loss, correct, count, predictions = jax.device_get(QA.loss(outputs, batch))
    np.testing.assert_allclose(loss, (2 * np.log(2)) / 2 + (np.log(2) + np.log(4)) / 2, rtol=1e-6)
    assert (correct, count) == (1.0, 2.0)  # the second example's end is not its most likely
    np.testing.assert_array_equal(predictions, outputs)
    grads = jax.grad(lambda o: QA.loss(o, batch)[0])(outputs)
    assert np.isfinite(grads).all() and np.all(grads[0, [0, 4]] == 0)  # nothing flows to the question


def test_the_best_span_follows_run_squad():
    assert span_qa.best_span([0.0, 5.0, 1.0], [0.0, 1.0, 6.0]) == (1, 2)
    assert span_qa.best_span([0.0, 0.0, 9.0], [8.0, 0.0, 0.0]) == (2, 2)  # (2, 0) scores 17 but ends first
    # (0, 3) is 4 pieces long; of the pairs scoring 9, (0, 0) comes first in run_squad.py's order
    assert span_qa.best_span([9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0], max_length=3) == (0, 0)
    assert span_qa.best_span([9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0], max_length=4) == (0, 3)
    assert span_qa.best_span([0.0, 0.0, 9.0], [9.0, 0.0, 0.0], n_best=1) is None  # the only pair ends first
    assert span_qa.best_span([0.0, 0.0, 9.0], [9.0, 0.0, 0.0], n_best=2) == (0, 0)  # the second start pairs with it
    assert span_qa.best_span([], []) is None


def test_decoding_reads_the_passage_characters_of_the_best_span(word_tokenizer):
    examples = (TaskExample("q", PASSAGE, answers=((8, 12),)), TaskExample("q", "never in a row", answers=((0, 5),)))
    logits = np.zeros((36, 2), np.float32)
    logits[16, 0], logits[17, 1] = 5.0, 5.0  # the pieces "t" and "he" of "(the)"
    found = [(0, piece, logits[piece]) for piece in range(36)]
    assert QA.decode(examples, (), found, word_tokenizer) == ["the", ""]
    assert [QA.gold(e) for e in examples] == [["path"], ["never"]]


@pytest.mark.parametrize("text, expected", [("The Cat!", "cat"), ("an  apple, a day", "apple day"),
                                            ("Theatre of the absurd", "theatre of absurd"), ("a", "")])
def test_answers_are_normalised_as_squad_does(text, expected):
    assert span_qa.normalize_answer(text) == expected


def test_exact_match_and_f1_take_the_best_gold_answer():
    gold = [["The cat"], ["Paris"], ["dog", "big cat"], ["a"]]
    predicted = ["cat.", "paris france", "the big cat", ""]
    assert span_qa.exact_match(gold, predicted) == 0.75  # SQuAD's quirk: "" matches "a", both normalise to ""
    # per example: 1; 2 * (1/2 * 1) / (1/2 + 1) = 2/3; 1 ("big cat"); 0 (no words in common)
    assert span_qa.answer_f1(gold, predicted) == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert span_qa.answer_f1([["the big red cat"]], ["red cats"]) == pytest.approx(2 * (1 / 2 * 1 / 3) / (5 / 6))
    assert kinds.score(("exact_match", "answer_f1"), (), gold[:1], predicted[:1]) == {"exact_match": 1.0,
                                                                                     "answer_f1": 1.0}


def test_a_qa_task_reads_squads_fields_and_names_a_bad_answer(tmp_path):
    row = {"question": "What is path?", "context": PASSAGE, "answers": [{"text": "path", "answer_start": 8},
                                                                         {"text": "os.path.join", "answer_start": 5}]}
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    task = tasks.load_files(tmp_path)
    assert task.kind == "span_qa" and task.metric == "exact_match" and task.num_outputs == 2
    assert task.splits["test"] == (TaskExample("What is path?", PASSAGE, answers=((8, 12), (5, 17))),)
    assert task.describe().startswith(f"{tmp_path.name} (span_qa, answer spans; train 1, dev 1, test 1; selected by "
                                      "dev exact_match;")
    moved = {**row, "answers": [{"text": "path", "answer_start": 9}]}
    (tmp_path / "dev.jsonl").write_text(json.dumps(moved) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev.jsonl:1: answer 0 'path' does not stand at character 9 of the "
                                         r"context \(there: 'ath\.'\); answer_start counts the context's characters"):
        tasks.load_files(tmp_path)
    (tmp_path / "dev.jsonl").write_text(json.dumps({**row, "answers": []}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev.jsonl:1: 'answers' must be a non-empty list"):
        tasks.load_files(tmp_path)
