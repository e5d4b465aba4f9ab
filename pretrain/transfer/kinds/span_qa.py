"""Extractive question answering: a question and a passage -> the span of the passage that
answers it (SQuAD v1.1; BERT's `run_squad.py` is the reference for the rows, the loss
and the decoding, SQuAD's `evaluate-v1.1.py` for the metrics).

    file row   {"question", "context", "answers": [{"text", "answer_start"}, ...]}
               (`.jsonl`, SQuAD's fields; `answer_start` is the answer's first
               character in `context`, where `text` must stand)
    segment    `[CLS] question [SEP] passage [SEP]`, token types 0 then 1; the question
               cut to MAX_QUERY_LENGTH pieces (at most half the row), the passage to
               the words that fit, each word encoded alone (as tagging's words). At each
               passage piece `task_labels` holds a code, START | END bits marking the
               first answer's boundary pieces (BERT trains on one answer), and
               `task_word` the piece's index in the passage
    head       one dense layer on every token's own features: a start and an end logit
    loss       the mean of the start and the end cross-entropy, each a softmax over the
               example's passage pieces
    decoding   of the N_BEST_SIZE best starts and ends, the pair with the largest start +
               end logit, end >= start and at most MAX_ANSWER_LENGTH pieces long
               (`n_best_size`, `max_answer_length`); the answer is the passage's
               characters from the start piece's first to the end piece's last
    metrics    exact match (selects the step) and the F1 of answer words, each the best
               over an example's gold answers after SQuAD's normalisation (lower case; no
               punctuation; no articles a, an, the; single spaces); fractions, where
               SQuAD prints percentages

A piece's characters: the pieces of a passage word, decoded one by one, spell the
word when the tokenizer keeps its characters, and then each piece spans its own;
otherwise every piece of the word spans the whole word (BERT aligns answers at its
whitespace words the same way). An answer covers the pieces its characters touch.

Deviations from `run_squad.py`, and why: one window per example, no `doc_stride`
windows over a long passage (a passage is cut to the row, and an answer beyond the
cut has no loss term though the example is still scored: rows here are short and
the built-in passages fit them); the softmaxes and the n best run over the passage's
pieces only, where BERT's run over the whole row and drop question positions after
choosing the n best (the question is never an answer either way).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain.transfer import encoding
from pretrain.transfer.example import Record, TaskExample
from pretrain.transfer.kinds.registry import Found, Kind, register

if TYPE_CHECKING:
    from pretrain.tokenizer import Tokenizer

N_BEST_SIZE = 20  # run_squad.py's n_best_size
MAX_ANSWER_LENGTH = 30  # run_squad.py's max_answer_length, in pieces
MAX_QUERY_LENGTH = 64  # run_squad.py's max_query_length, in pieces
START, END = 1, 2  # the bits of a passage piece's code
ROW_FIELDS = ("question", "context", "answers")

# A passage piece: (id, first character, end character) in the passage.
Piece = tuple[int, int, int]
_WORD = re.compile(r"\S+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


# -- characters and pieces ---------------------------------------------------------------


def passage_words(passage: str, tokenizer: Tokenizer) -> list[list[Piece]]:
    """The pieces of each whitespace-separated word of a passage, with the characters
    each spans (see the module docstring)."""
    words = []
    for match in _WORD.finditer(passage):
        ids = [int(i) for i in tokenizer.encode(match.group())]
        surfaces = [tokenizer.decode([i]) for i in ids]
        if "".join(surfaces) == match.group():
            ends = np.cumsum([len(s) for s in surfaces]) + match.start()
            spans = list(zip([match.start(), *ends[:-1].tolist()], ends.tolist()))
        else:
            spans = [(match.start(), match.end())] * len(ids)
        words.append([(i, int(first), int(last)) for i, (first, last) in zip(ids, spans)])
    return words


def answer_pieces(pieces: Sequence[Piece], start: int, end: int) -> tuple[int, int] | None:
    """(first, last) index of the pieces that the characters [start, end) touch, or None
    when none does."""
    touched = [number for number, (_, first, last) in enumerate(pieces) if first < end and last > start]
    return (touched[0], touched[-1]) if touched else None


def best_span(start_logits: Sequence[float], end_logits: Sequence[float], n_best: int = N_BEST_SIZE,
              max_length: int = MAX_ANSWER_LENGTH) -> tuple[int, int] | None:
    """(start, end) of the best answer: among the `n_best` largest start and end logits,
    the pair with the largest sum that has end >= start and at most `max_length` pieces;
    the first such pair in run_squad.py's order on a tie (starts, then ends, each by
    falling logit, a tie by position), None when no pair qualifies."""
    best = lambda logits: sorted(range(len(logits)), key=lambda i: logits[i], reverse=True)[:n_best]  # noqa: E731
    pairs = [(start_logits[s] + end_logits[e], s, e) for s in best(start_logits) for e in best(end_logits)
             if s <= e < s + max_length]
    return max(pairs, key=lambda pair: pair[0])[1:] if pairs else None


# -- SQuAD v1.1's metrics ------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, the articles a, an, the
    removed, whitespace collapsed to single spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1_of(predicted: str, gold: str) -> float:
    """The F1 of the normalised words of one prediction against one gold answer."""
    predicted_words, gold_words = normalize_answer(predicted).split(), normalize_answer(gold).split()
    same = sum((Counter(predicted_words) & Counter(gold_words)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_words), same / len(gold_words)
    return 2 * precision * recall / (precision + recall)


def _best_over_answers(score_one: Callable[[str, str], float], gold: Sequence[Sequence[str]],
                       predicted: Sequence[str]) -> float:
    """The mean over examples of the best score against any of an example's answers."""
    scored = [max(score_one(p, g) for g in answers) for answers, p in zip(gold, predicted, strict=True)]
    return float(np.mean(scored)) if scored else 0.0


def exact_match(gold: Sequence[Sequence[str]], predicted: Sequence[str], labels: Sequence[str] = ()) -> float:
    """The share of predictions equal, once normalised, to one of their gold answers."""
    return _best_over_answers(lambda p, g: float(normalize_answer(p) == normalize_answer(g)), gold, predicted)


def answer_f1(gold: Sequence[Sequence[str]], predicted: Sequence[str], labels: Sequence[str] = ()) -> float:
    """The mean over examples of the best word F1 against their gold answers."""
    return _best_over_answers(answer_f1_of, gold, predicted)


# -- the loss ------------------------------------------------------------------------------


def _groups(segment_ids: jax.Array) -> tuple[jax.Array, int]:
    """(one id per position for its row's segment, flattened [B * L]; how many ids)."""
    rows, length = segment_ids.shape
    return (jnp.arange(rows)[:, None] * (length + 1) + segment_ids).reshape(-1), rows * (length + 1)


def passage_log_softmax(logits: jax.Array, segment_ids: jax.Array, passage: jax.Array) -> jax.Array:
    """float32 [B, L, C]: per channel, the log-softmax of `logits` over the passage
    positions of each position's own segment (-inf off the passage)."""
    groups, count = _groups(segment_ids)
    flat = jnp.where(passage[..., None], logits, -jnp.inf).reshape(groups.shape[0], -1)
    maxima = jax.lax.stop_gradient(jax.ops.segment_max(flat, groups, count))
    maxima = jnp.where(jnp.isfinite(maxima), maxima, 0.0)  # a segment without a passage
    sums = jax.ops.segment_sum(jnp.exp(flat - maxima[groups]), groups, count)
    totals = jnp.log(jnp.where(sums > 0, sums, 1.0)) + maxima
    return (flat - totals[groups]).reshape(logits.shape)


# -- the kind ------------------------------------------------------------------------------


@register
class SpanQA(Kind):
    name = "span_qa"
    metrics = {"exact_match": exact_match, "answer_f1": answer_f1}
    per_token = True
    detect_priority = 3  # a row with a question and its context

    def detects(self, records: Sequence[Record], real_valued: bool) -> bool:
        return bool(records) and ("question" in records[0].fields or "context" in records[0].fields)

    def check(self, record: Record) -> None:
        fields, where = record.fields, record.where
        for name in ROW_FIELDS[:2]:
            if not isinstance(fields.get(name), str) or not fields[name].strip():
                raise ValueError(f"{where} has no {name!r} text; an extractive QA row needs {', '.join(ROW_FIELDS)}")
        answers = fields.get("answers")
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{where}: 'answers' must be a non-empty list of {{\"text\": ..., \"answer_start\": ...}}")
        for number, answer in enumerate(answers):
            text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)
            if not isinstance(text, str) or not text.strip() or not isinstance(start, int) or isinstance(start, bool):
                raise ValueError(f"{where}: answer {number} is not {{\"text\": <non-empty string>, \"answer_start\": "
                                 f"<character offset>}}: {answer!r}")
            found = fields["context"][start : start + len(text)]
            if start < 0 or found != text:
                raise ValueError(f"{where}: answer {number} {text!r} does not stand at character {start} of the "
                                 f"context (there: {found!r}); answer_start counts the context's characters from 0")

    def example(self, record: Record, labels: Sequence[str]) -> TaskExample:
        answers = tuple((a["answer_start"], a["answer_start"] + len(a["text"])) for a in record.fields["answers"])
        return TaskExample(record.fields["question"], record.fields["context"], answers=answers)

    def num_outputs(self, labels: Sequence[str]) -> int:
        return 2  # start, end

    def describe_labels(self, labels: Sequence[str]) -> str:
        return "answer spans"

    def gold(self, example: TaskExample) -> Any:
        return [example.text_b[start:end] for start, end in example.answers]

    def encode(self, example: TaskExample, index: int, tokenizer: Tokenizer, seq_len: int) -> encoding.Encoded:
        question = tokenizer.encode(example.text)[: min(MAX_QUERY_LENGTH, (seq_len - 3) // 2)]
        room, pieces, words = seq_len - len(question) - 3, [], passage_words(example.text_b, tokenizer)
        for word in words:
            if len(pieces) + len(word) > room:
                break
            pieces.extend(word)
        fields = encoding.lay_out(question, [piece for piece, _, _ in pieces], tokenizer.vocabulary())
        first = len(question) + 2
        passage = slice(first, first + len(pieces))
        fields["task_labels"][passage] = 0
        every = [piece for word in words for piece in word]
        span = answer_pieces(every, *example.answers[0]) if example.answers else None
        if span is not None and span[1] < len(pieces):  # the answer lies in the row
            fields["task_labels"][first + span[0]] |= START
            fields["task_labels"][first + span[1]] |= END
        fields["task_example"][passage] = index
        fields["task_word"][passage] = np.arange(len(pieces))
        return encoding.Encoded(fields)

    def count(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The examples whose answer lies in their row (one START each)."""
        labels = batch["task_labels"]
        return ((labels >= 0) & ((labels & START) > 0)).sum().astype(jnp.float32)

    def soft_target_sum(self, outputs: jax.Array, teacher: jax.Array, batch: Mapping[str, jax.Array],
                        temperature: float) -> jax.Array:
        """KL(teacher || outputs) at `temperature` (times T^2) of each example's start and of
        its end distribution over its passage, halved as the loss is (DistilBERT's SQuAD
        distillation, `run_squad_w_distillation.py`)."""
        labels, segment_ids = batch["task_labels"], batch["segment_ids"]
        passage = labels >= 0
        student = passage_log_softmax(outputs.astype(jnp.float32) / temperature, segment_ids, passage)
        taught = passage_log_softmax(teacher.astype(jnp.float32) / temperature, segment_ids, passage)
        terms = jnp.where(passage[..., None], jnp.exp(taught) * (taught - student), 0.0)
        return terms.sum() / 2 * temperature ** 2

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        labels, segment_ids = batch["task_labels"], batch["segment_ids"]
        passage = labels >= 0
        gold = jnp.stack([passage & ((labels & START) > 0), passage & ((labels & END) > 0)], axis=-1)
        log_probs = passage_log_softmax(outputs, segment_ids, passage)
        loss_sum = jnp.where(gold, -log_probs, 0.0).sum() / 2
        groups, count = _groups(segment_ids)
        top = jax.ops.segment_max(log_probs.reshape(groups.shape[0], -1), groups, count)[groups].reshape(outputs.shape)
        hits = jax.ops.segment_sum((gold & (log_probs >= top)).reshape(groups.shape[0], -1).astype(jnp.float32),
                                   groups, count)
        correct = (hits[:, 0] * hits[:, 1]).sum()  # both boundaries the most likely of their passage
        return loss_sum, correct, self.count(batch), outputs

    def decode(self, examples: Sequence[TaskExample], labels: Sequence[str], found: Sequence[Found],
               tokenizer: Tokenizer) -> list[Any]:
        logits: dict[int, dict[int, np.ndarray]] = {}
        for example, piece, value in found:
            logits.setdefault(int(example), {})[int(piece)] = np.asarray(value)
        predicted = []
        for number, example in enumerate(examples):
            mine = logits.get(number, {})
            values = np.stack([mine[p] for p in range(len(mine))]) if mine else np.zeros((0, 2), np.float32)
            span = best_span(values[:, 0].tolist(), values[:, 1].tolist())
            if span is None:
                predicted.append("")
                continue
            pieces = [piece for word in passage_words(example.text_b, tokenizer) for piece in word]
            predicted.append(example.text_b[pieces[span[0]][1] : pieces[span[1]][2]])
        return predicted
