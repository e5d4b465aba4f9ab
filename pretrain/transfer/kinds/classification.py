"""Classification: one text -> one of the task's classes (topic, sentiment, acceptability).

    file row   {"text", "label"} (`.jsonl`), or a `.tsv` table with `text` and `label`
    segment    `[CLS] text [SEP]`; the class index at the example's first token
    head       one dense layer on the example's pooled features, one output per class
    loss       cross-entropy; the prediction is the argmax
    metrics    accuracy (selects the step), macro-F1, MCC

`ExampleLevel` is what every kind with one label per example shares (this one, pair
classification, regression): the segment, where the label sits, and reading it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pretrain.transfer import encoding, scores
from pretrain.transfer.example import Record, TaskExample
from pretrain.transfer.kinds.registry import Found, Kind, first_found, label_index, register, score, values_metric

if TYPE_CHECKING:
    from pretrain.tokenizer import Tokenizer
    from pretrain.transfer.tasks import Task


def categorical_loss(outputs: jax.Array, batch: Mapping[str, jax.Array]
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(loss sum, correct sum, labelled count, argmax predictions [B, L]) of class
    logits where `task_labels` marks a label: cross-entropy (classes, pairs, tags)."""
    labelled = (batch["task_labels"] >= 0).astype(jnp.float32)
    labels = jnp.maximum(batch["task_labels"], 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    predictions = jnp.argmax(outputs, axis=-1).astype(jnp.int32)
    correct = (predictions == labels).astype(jnp.float32)
    return (losses * labelled).sum(), (correct * labelled).sum(), labelled.sum(), predictions


class ExampleLevel(Kind):
    """A kind with one label per example, at the example's first token: a text row of a
    task file (`text`, optional `text_b`, `label`) and its `[CLS] text [SEP]` segment
    (`[CLS] A [SEP] B [SEP]` when `reads_pairs`, the longer text cut first)."""

    reads_pairs = False  # whether the segment holds `text_b` after `text`

    def check(self, record: Record) -> None:
        if not isinstance(record.fields.get("text"), str):
            raise ValueError(f"{record.where} has no 'text' string; every row needs \"text\" (and \"label\")")
        if record.fields.get("label") is None:
            raise ValueError(f"{record.where} has no 'label'; add \"label\" to every row")

    def example(self, record: Record, labels: Sequence[str]) -> TaskExample:
        text_b = record.fields.get("text_b")
        return TaskExample(record.fields["text"], None if text_b is None else str(text_b),
                           self.label_of(record, labels))

    def label_of(self, record: Record, labels: Sequence[str]) -> float:
        """The example's label from its checked row."""
        return label_index(labels, str(record.fields["label"]), record)

    def gold(self, example: TaskExample) -> Any:
        return example.label

    def encode(self, example: TaskExample, index: int, tokenizer: Tokenizer, seq_len: int) -> encoding.Encoded:
        first = tokenizer.encode(example.text)
        second = tokenizer.encode(example.text_b) if self.reads_pairs else None
        first, second = encoding.truncate(first, second, seq_len - (3 if second is not None else 2))
        fields = encoding.lay_out(first, second, tokenizer.vocabulary())
        self.put_label(fields, example)
        fields["task_example"][0] = index
        return encoding.Encoded(fields)

    def put_label(self, fields: dict[str, np.ndarray], example: TaskExample) -> None:
        """Writes the example's label at its first token."""
        fields["task_labels"][0] = int(example.label)


@register
class Classification(ExampleLevel):
    name = "classification"
    metrics = {"accuracy": values_metric(scores.accuracy), "macro_f1": values_metric(scores.macro_f1),
               "mcc": values_metric(scores.mcc)}
    detect_priority = 0  # the kind of a text row that nothing more specific claims

    def detects(self, records: Sequence[Record], real_valued: bool) -> bool:
        return not real_valued

    def labels_of(self, records: Sequence[Record]) -> tuple[str, ...]:
        return tuple(sorted({str(record.fields["label"]) for record in records}))

    def classes(self, labels: Sequence[str]) -> int:
        return len(labels)

    def stratum(self, example: TaskExample) -> Any:
        return example.label

    def baseline(self, task: Task) -> dict[str, float]:
        """Always the training split's majority class, and (for accuracy) a uniform guess."""
        counts = np.bincount([int(e.label) for e in task.splits["train"]], minlength=len(task.labels))
        gold = [e.label for e in task.splits["test"]]
        out = {"majority": score((task.metric,), task.labels, gold, [int(counts.argmax())] * len(gold))[task.metric]}
        if task.metric == "accuracy":
            out["chance"] = 1.0 / len(task.labels)
        return out

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        return categorical_loss(outputs, batch)

    def decode(self, examples: Sequence[TaskExample], labels: Sequence[str], found: Sequence[Found],
               tokenizer: Tokenizer) -> list[Any]:
        return first_found(examples, found, 0.0, int)
