"""Task kinds by name: the interface each kind implements, and the registry.

A kind owns everything that differs between kinds of downstream task, so that the
rest of `pretrain.transfer` asks the kind and never names one:

  files     which rows of a task file it takes (`detects`), what a row must hold
            (`check`), the label set (`labels_of`) and the example a row becomes
            (`example`);
  rows      the packed-row segment of an example (`encode`; `pretrain.transfer.encoding`
            lays out its tokens and fields);
  outputs   the head's width (`num_outputs`) and whether it reads each token's own
            features or its example's pooled ones (`per_token`);
  loss      where loss terms sit in a batch (`count`, the global denominator) and,
            inside the compiled step, their sum with what decoding reads (`loss`);
  decoding  each example's prediction from the positions its rows name (`decode`)
            and its gold value (`gold`);
  metrics   every metric it reports by name, the first selecting the step on dev
            (`metrics`; formulas several kinds share live in `pretrain.transfer.scores`,
            a kind's own, such as SQuAD's exact match, in its module).

Metric names are one namespace over all kinds (a table column means one thing), so
`score` finds a metric by its name alone; two kinds may share a metric only as the
same function (pair classification reports classification's accuracy).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp

from pretrain.transfer.example import Record, TaskExample

if TYPE_CHECKING:
    from pretrain.tokenizer import Tokenizer
    from pretrain.transfer.encoding import Encoded
    from pretrain.transfer.tasks import Task

# A metric: (gold, predicted, label names) -> score, over a split's examples in order.
Metric = Callable[[Sequence[Any], Sequence[Any], Sequence[str]], float]
# What an evaluation batch says at one labelled position: (example index, word index, prediction).
Found = tuple[int, int, Any]


def values_metric(formula: Callable[[Sequence[Any], Sequence[Any]], float]) -> Metric:
    """A metric of values that need no label names (class indices, real values)."""

    def metric(gold: Sequence[Any], predicted: Sequence[Any], labels: Sequence[str]) -> float:
        del labels
        return formula(gold, predicted)

    metric.__name__ = metric.__qualname__ = formula.__name__
    metric.__doc__ = formula.__doc__
    return metric


class Kind(abc.ABC):
    """A kind of downstream task (see the module docstring). Subclasses set `name`,
    `metrics` and `detect_priority` and are registered with `@register`; one instance
    of each serves every task of its kind."""

    name: ClassVar[str]
    metrics: ClassVar[Mapping[str, Metric]]  # in the order reported; the first selects the step on dev
    per_token: ClassVar[bool] = False  # the head reads each token's features (else its example's pooled ones)
    detect_priority: ClassVar[int] = 0  # config.task_kind='auto' tries kinds from the highest

    @property
    def default_metric(self) -> str:
        """The metric that selects the step on dev unless the task names another."""
        return next(iter(self.metrics))

    # -- task files ------------------------------------------------------------------

    @abc.abstractmethod
    def detects(self, records: Sequence[Record], real_valued: bool) -> bool:
        """Whether a task whose training rows are `records` is of this kind, when no
        kind is asked for; `real_valued`: the source declares its labels numbers rather
        than classes (a TFDS label that is not a `ClassLabel`)."""

    @abc.abstractmethod
    def check(self, record: Record) -> None:
        """Raises one ValueError naming the row (`record.where`) and the fix when a row
        of a task of this kind lacks what it needs."""

    def labels_of(self, records: Sequence[Record]) -> tuple[str, ...]:
        """The task's label names from its checked training rows (none by default)."""
        del records
        return ()

    @abc.abstractmethod
    def example(self, record: Record, labels: Sequence[str]) -> TaskExample:
        """The example of a checked row; a label outside `labels` is refused by name."""

    # -- the task --------------------------------------------------------------------

    def num_outputs(self, labels: Sequence[str]) -> int:
        """The head's width at each position: one per label by default."""
        return len(labels)

    def describe_labels(self, labels: Sequence[str]) -> str:
        """The label set in words, for `Task.describe`."""
        return f"{len(labels)} labels"

    def classes(self, labels: Sequence[str]) -> int:
        """How many classes the examples fall into, one class per example (the
        per-class rule of a small test split counts them); 0 where an example has no
        single class (tags, values, spans)."""
        del labels
        return 0

    def stratum(self, example: TaskExample) -> Any:
        """The stratum of a training example in a label subset (`tasks.label_subset`):
        one stratum for all by default."""
        del example
        return None

    def baseline(self, task: Task) -> dict[str, float]:
        """Test scores of trivial predictors that a row must beat to have learnt
        anything, by name (none by default)."""
        del task
        return {}

    @abc.abstractmethod
    def gold(self, example: TaskExample) -> Any:
        """The value an example's prediction is scored against."""

    # -- rows ------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, example: TaskExample, index: int, tokenizer: Tokenizer, seq_len: int) -> Encoded:
        """The segment of one example, `index` its position in its split (at most
        `seq_len` tokens, both layouts' views)."""

    # -- the loss (traced inside the compiled step) ---------------------------------

    def count(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """float32 []: the loss terms of a batch (the global denominator): its labelled
        positions by default (`task_labels` >= 0)."""
        return (batch["task_labels"] >= 0).sum().astype(jnp.float32)

    @abc.abstractmethod
    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(loss sum, correct sum, term count, predictions) of the head's outputs
        [B, L, num_outputs]; the predictions are per position ([B, L, ...]) and are read
        by `decode` where `task_example` names an example."""

    def soft_target_sum(self, outputs: jax.Array, teacher: jax.Array, batch: Mapping[str, jax.Array],
                        temperature: float) -> jax.Array:
        """Task-time distillation's loss sum against a teacher's outputs (same shape), over
        the terms `count` counts: by default, for class logits, KL(teacher || outputs) at
        `temperature`, times T^2, at each labelled position (Hinton et al. 2015, as
        DistilBERT's code). A kind whose outputs are not class logits overrides it."""
        from pretrain.distillation import soft_target_sums

        labelled = (batch["task_labels"] >= 0).astype(jnp.float32)
        return soft_target_sums(outputs, teacher, labelled, temperature)["loss_sum"]

    # -- decoding (on the host) ------------------------------------------------------

    @abc.abstractmethod
    def decode(self, examples: Sequence[TaskExample], labels: Sequence[str], found: Sequence[Found],
               tokenizer: Tokenizer) -> list[Any]:
        """Each example's prediction, in order, from what the evaluation batches hold at
        its labelled positions (`found`; an example or word absent from them keeps a
        default prediction)."""


_REGISTRY: dict[str, Kind] = {}
_METRICS: dict[str, Metric] = {}


def register(cls: type[Kind]) -> type[Kind]:
    """Registers a kind class under its `name` (one instance serves every task), and
    its metrics under theirs."""
    if cls.name in _REGISTRY:
        raise ValueError(f"task kind {cls.name!r} is registered twice")
    for metric, function in cls.metrics.items():
        if _METRICS.get(metric, function) is not function:
            raise ValueError(f"metric {metric!r} of task kind {cls.name!r} is another function than the one of that "
                             "name another kind reports; give it its own name")
    _REGISTRY[cls.name] = cls()
    _METRICS.update(cls.metrics)
    return cls


def registered_names() -> tuple[str, ...]:
    """Every task kind, sorted."""
    return tuple(sorted(_REGISTRY))


def lookup(name: str, field: str = "kind", choices: Sequence[str] = ()) -> Kind:
    """The kind registered as `name`, or one message naming `field` (the config field or
    attribute that holds it) and the known kinds (`choices`: other values the field
    takes, listed first)."""
    if name not in _REGISTRY:
        raise ValueError(f"{field}={name!r} is not a task kind; known kinds: "
                         f"{', '.join((*choices, *registered_names()))}")
    return _REGISTRY[name]


def detect(records: Sequence[Record], real_valued: bool = False) -> Kind:
    """The kind of a task whose training rows are `records`, when none is asked for:
    the first kind, by falling `detect_priority`, that `detects` them."""
    for kind in sorted(_REGISTRY.values(), key=lambda k: (-k.detect_priority, k.name)):
        if kind.detects(records, real_valued):
            return kind
    raise ValueError(f"no task kind reads rows like {records[0].where if records else 'these'}; name one with "
                     f"config.task_kind ({', '.join(registered_names())})")


def score(metrics: Sequence[str], labels: Sequence[str], gold: Sequence[Any], predicted: Sequence[Any]
          ) -> dict[str, float]:
    """The named metrics of predictions against gold values, as the kinds that report
    them read those values (class indices, real values, tag-index lists through the
    label names, answers)."""
    unknown = [name for name in metrics if name not in _METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; the task kinds report {', '.join(sorted(_METRICS))}")
    return {name: _METRICS[name](gold, predicted, labels) for name in metrics}


def label_index(labels: Sequence[str], label: str, record: Record) -> int:
    """The index of a row's label among the training labels, or one message naming the
    row: a label never trained on cannot be learnt."""
    if label not in labels:
        raise ValueError(f"{record.where}: label {label!r} never occurs in the training file, so no model can learn "
                         f"it; the training labels are {sorted(labels)}. Add training examples of it or fix the label")
    return list(labels).index(label)


def first_found(examples: Sequence[TaskExample], found: Sequence[Found], default: Any,
                convert: Callable[[Any], Any]) -> list[Any]:
    """One prediction per example: `convert` of the value at its labelled position (an
    example-level label sits at one), else `default`."""
    predicted = [default] * len(examples)
    for example, _, value in found:
        predicted[example] = convert(value)
    return predicted

