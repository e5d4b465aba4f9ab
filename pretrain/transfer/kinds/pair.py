"""Pair classification: two texts -> one of the task's classes (same module, paraphrase,
entailment).

    file row   {"text", "text_b", "label"} (`.jsonl`), or a `.tsv` table with `text`,
               `text_b` and `label`
    segment    `[CLS] A [SEP] B [SEP]`, token types 0 then 1, the longer text cut first
               (BERT's rule); the class index at the example's first token
    head       one dense layer on the example's pooled features, one output per class
    loss       cross-entropy; the prediction is the argmax
    metrics    accuracy (selects the step), macro-F1, F1 of class 1 (GLUE's MRPC and
               QQP), MCC

Classification in all but the second text and the F1 of class 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from pretrain.transfer import scores
from pretrain.transfer.example import Record
from pretrain.transfer.kinds.classification import Classification
from pretrain.transfer.kinds.registry import register, values_metric


@register
class Pair(Classification):
    name = "pair"
    metrics = {"accuracy": Classification.metrics["accuracy"], "macro_f1": Classification.metrics["macro_f1"],
               "f1": values_metric(scores.f1), "mcc": Classification.metrics["mcc"]}
    detect_priority = 1  # a text row with `text_b` anywhere in training
    reads_pairs = True

    def detects(self, records: Sequence[Record], real_valued: bool) -> bool:
        return not real_valued and any(record.fields.get("text_b") is not None for record in records)

    def check(self, record: Record) -> None:
        super().check(record)
        if record.fields.get("text_b") is None:
            raise ValueError(f"{record.where} has no 'text_b'; a pair task needs both texts in every row")
