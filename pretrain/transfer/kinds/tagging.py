"""Token tagging: one tag per word (BIO spans such as code in documentation, named entities).

    file row   {"tokens": [...], "tags": [...]} (`.jsonl`), or CoNLL `token<TAB>tag`
               lines with a blank line between sentences (`.tsv`)
    segment    `[CLS] pieces [SEP]`, each word encoded alone; its tag at the word's
               first piece (BERT's rule); words that do not fit the row are left out
               and predicted as O
    head       one dense layer on every token's own features, one output per tag
    loss       cross-entropy at each word's first piece; the prediction is the argmax
    metrics    span F1 (exact spans as conlleval decodes BIO; selects the step), token
               accuracy
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax

from pretrain.transfer import encoding, scores
from pretrain.transfer.example import Record, TaskExample
from pretrain.transfer.kinds.classification import categorical_loss
from pretrain.transfer.kinds.registry import Found, Kind, Metric, label_index, register, score

if TYPE_CHECKING:
    from pretrain.tokenizer import Tokenizer
    from pretrain.transfer.tasks import Task

OUTSIDE = "O"  # the tag of a word in no span: the default prediction and the majority baseline


def _by_name(formula: Callable[[Sequence[Sequence[str]], Sequence[Sequence[str]]], float]) -> Metric:
    """A tag metric (over tag names) of tag-index lists, through the task's label names."""

    def metric(gold: Sequence[Sequence[int]], predicted: Sequence[Sequence[int]], labels: Sequence[str]) -> float:
        names = lambda rows: [[labels[t] for t in row] for row in rows]  # noqa: E731
        return formula(names(gold), names(predicted))

    metric.__name__ = metric.__qualname__ = formula.__name__
    return metric


def outside_index(labels: Sequence[str]) -> int:
    """The index of the O tag (the first tag when there is none)."""
    return labels.index(OUTSIDE) if OUTSIDE in labels else 0


@register
class Tagging(Kind):
    name = "tagging"
    metrics = {"span_f1": _by_name(scores.span_f1), "token_accuracy": _by_name(scores.token_accuracy)}
    per_token = True
    detect_priority = 3  # a row of tokens and tags

    def detects(self, records: Sequence[Record], real_valued: bool) -> bool:
        return bool(records) and ("tokens" in records[0].fields or "tags" in records[0].fields)

    def check(self, record: Record) -> None:
        tokens, tags = record.fields.get("tokens"), record.fields.get("tags")
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise ValueError(f"{record.where}: a tagging row needs lists 'tokens' and 'tags'")
        if len(tokens) != len(tags):
            raise ValueError(f"{record.where}: {len(tokens)} tokens but {len(tags)} tags; give one tag per token")

    def labels_of(self, records: Sequence[Record]) -> tuple[str, ...]:
        return tuple(sorted({str(tag) for record in records for tag in record.fields["tags"]}))

    def example(self, record: Record, labels: Sequence[str]) -> TaskExample:
        return TaskExample(words=tuple(map(str, record.fields["tokens"])),
                           tags=tuple(label_index(labels, str(tag), record) for tag in record.fields["tags"]))

    def baseline(self, task: Task) -> dict[str, float]:
        """Every word tagged O."""
        gold = [self.gold(e) for e in task.splits["test"]]
        outside = [[outside_index(task.labels)] * len(g) for g in gold]
        return {"majority": score((task.metric,), task.labels, gold, outside)[task.metric]}

    def gold(self, example: TaskExample) -> Any:
        return list(example.tags)

    def encode(self, example: TaskExample, index: int, tokenizer: Tokenizer, seq_len: int) -> encoding.Encoded:
        pieces, firsts, room = [], [], seq_len - 2
        for number, word in enumerate(encoding.word_pieces(example.words, tokenizer)):
            if not len(word) or len(pieces) + len(word) > room:
                if len(word):
                    break
                continue
            firsts.append((len(pieces) + 1, number))
            pieces.extend(word.tolist())
        fields = encoding.lay_out(pieces, None, tokenizer.vocabulary())
        for position, number in firsts:
            fields["task_labels"][position] = example.tags[number]
            fields["task_example"][position] = index
            fields["task_word"][position] = number
        return encoding.Encoded(fields)

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        return categorical_loss(outputs, batch)

    def decode(self, examples: Sequence[TaskExample], labels: Sequence[str], found: Sequence[Found],
               tokenizer: Tokenizer) -> list[Any]:
        predicted = [[outside_index(labels)] * len(e.words) for e in examples]
        for example, word, value in found:
            predicted[example][word] = int(value)
        return predicted
