"""Regression: one text -> a real value (GLUE's STS-B similarity).

    file row   {"text", "label": <number>} (`.jsonl`) or a `.tsv` table with `text` and
               `label`; asked for with `config.task_kind=regression` (a file's numbers
               may as well be class names), or a TFDS label that is not a `ClassLabel`
    segment    `[CLS] text [SEP]` (a row's `text_b` is kept in the example but not
               read); the value at the example's first token
    head       one dense layer on the example's pooled features, one output
    loss       squared error; the prediction is the output
    metrics    Pearson's r (selects the step), Spearman's rho
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain.transfer import scores
from pretrain.transfer.example import Record, TaskExample
from pretrain.transfer.kinds.classification import ExampleLevel
from pretrain.transfer.kinds.registry import Found, first_found, register, values_metric

if TYPE_CHECKING:
    from pretrain.tokenizer import Tokenizer


@register
class Regression(ExampleLevel):
    name = "regression"
    metrics = {"pearson": values_metric(scores.pearson), "spearman": values_metric(scores.spearman)}
    detect_priority = 2  # before the text kinds, when the source declares its labels numbers

    def detects(self, records: Sequence[Record], real_valued: bool) -> bool:
        return real_valued

    def label_of(self, record: Record, labels: Sequence[str]) -> float:
        try:
            return float(record.fields["label"])
        except (TypeError, ValueError):
            raise ValueError(f"{record.where}: label {record.fields['label']!r} is not a number, but the task is a "
                             "regression (config.task_kind='regression'); give numbers, or another task_kind") from None

    def num_outputs(self, labels: Sequence[str]) -> int:
        return 1

    def describe_labels(self, labels: Sequence[str]) -> str:
        return "a real-valued label"

    def put_label(self, fields: dict[str, np.ndarray], example: TaskExample) -> None:
        fields["task_labels"][0] = 0  # marks where the value sits
        fields["task_values"][0] = float(example.label)

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        labelled = (batch["task_labels"] >= 0).astype(jnp.float32)
        predictions = outputs[..., 0]
        losses = (predictions - batch["task_values"]) ** 2
        correct = jnp.zeros_like(losses)
        return (losses * labelled).sum(), (correct * labelled).sum(), labelled.sum(), predictions

    def soft_target_sum(self, outputs: jax.Array, teacher: jax.Array, batch: Mapping[str, jax.Array],
                        temperature: float) -> jax.Array:
        """A value has no distribution to soften: the squared difference from the teacher's
        prediction at each labelled example (the distillation of regression heads in
        Tang et al. 2019's code); `temperature` does not apply."""
        del temperature
        labelled = (batch["task_labels"] >= 0).astype(jnp.float32)
        return (labelled * (outputs[..., 0] - teacher[..., 0]) ** 2).sum()

    def decode(self, examples: Sequence[TaskExample], labels: Sequence[str], found: Sequence[Found],
               tokenizer: Tokenizer) -> list[Any]:
        return first_found(examples, found, 0.0, float)
