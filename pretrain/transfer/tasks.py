"""Downstream tasks: what a fine-tuning run learns and is scored on.

A `Task` holds its kind, its label names, its metrics and three splits of
`TaskExample`s. What differs between kinds (classification, pair, tagging,
regression, ...: how rows are read, encoded, trained, decoded and scored) is the
kind's (`pretrain.transfer.kinds`); this module asks it. Tasks come from three
places, chosen by `config.task`:

  pydocs_topic, pydocs_sentence_topic, pydocs_same_module, pydocs_code_spans, pydocs_qa
          built in and offline, derived from the Python documentation
          (`pretrain.transfer.pydocs_tasks`);
  files   a directory of the user's `train`, `dev` (or `validation`) and `test`
          files, `.jsonl` (one JSON object per row, with the fields its kind reads:
          {"text", "text_b"?, "label"}, {"tokens", "tags"}, ...) or `.tsv` (a header
          row naming `text`, `text_b`, `label`; or CoNLL-style `token<TAB>tag` lines
          with a blank line between sentences); `config.task_kind` names the kind, or
          'auto' lets the rows tell (`kinds.detect`);
  tfds    a TFDS dataset prepared as ArrayRecord in a data_dir, GLUE's feature
          names understood (`glue/sst2`, `glue/mrpc`, `glue/stsb`, `glue/mnli`, ...).
          GLUE hides its test labels, so its validation splits are the test sets and
          dev is a fixed tenth of train (by text hash); see `tfds_test_splits` for
          which split is `test` when there are several (MNLI: `validation_matched`,
          with `validation_mismatched` scored beside it as `test_mismatched`).

Besides `test`, a task may hold further labelled test sets, `test_<name>`: each is
scored and reported like `test`, which stays the headline score.

Bad input is one message naming the file, the line and the fix: a row without a
label, a test label never seen in training, an empty file, tags and tokens of
different lengths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.transfer import kinds
from pretrain.transfer.example import Record, TaskExample

SPLITS = ("train", "dev", "test")
# A further labelled test set of a task is `test_<name>` (MNLI's mismatched validation
# split: `test_mismatched`); `test` is the headline one.
EXTRA_TEST_PREFIX = "test_"
BUILTIN = ("pydocs_topic", "pydocs_sentence_topic", "pydocs_same_module", "pydocs_code_spans", "pydocs_qa")
SOURCES = (*BUILTIN, "files", "tfds")
# GLUE's own primary metric where it is not accuracy (its paper, table 1).
GLUE_METRICS = {"cola": "mcc", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


@dataclasses.dataclass(frozen=True)
class Task:
    """A downstream task: kind, labels, metrics and its three splits (and any further
    test sets, `test_<name>`)."""

    name: str
    kind: str
    labels: tuple[str, ...]  # class names, or tag names (BIO) for tagging; () for regression
    splits: Mapping[str, tuple[TaskExample, ...]]
    metric: str  # the metric that selects the step on dev
    origin: str  # where it came from, in words
    fingerprint: str = ""  # of the label set and the examples (built-in tasks: per Python minor version)

    def __post_init__(self) -> None:
        kind = kinds.lookup(self.kind, f"task {self.name!r}: kind")
        if self.metric not in kind.metrics:
            raise ValueError(f"config.task_metric={self.metric!r} is not a metric of a {self.kind} task; choose one "
                             f"of {tuple(kind.metrics)}")
        unknown = sorted(set(self.splits) - set(split_names(self.splits)))
        if unknown:
            raise ValueError(f"task {self.name!r} has a split {unknown[0]!r} ({self.origin}); a task's splits are "
                             f"{', '.join(SPLITS)} and further test sets named {EXTRA_TEST_PREFIX}<name>")
        for split in split_names(self.splits):
            if not self.splits.get(split):
                raise ValueError(f"task {self.name!r} has no {split} examples ({self.origin}); every task needs "
                                 "train, dev and test examples")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint(self.labels, self.splits))

    @property
    def kind_spec(self) -> kinds.Kind:
        """The task's kind, which reads, encodes, trains, decodes and scores its examples."""
        return kinds.lookup(self.kind)

    @property
    def num_outputs(self) -> int:
        """Width of the head at each position (classes, tags, 1 for a value, ...)."""
        return self.kind_spec.num_outputs(self.labels)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the task reports, its kind's; the first is the default `metric`."""
        return tuple(self.kind_spec.metrics)

    def gold(self, split: str) -> list[Any]:
        """The gold values of a split's examples, in order, as its metrics read them."""
        return [self.kind_spec.gold(example) for example in self.splits[split]]

    def score(self, gold: Sequence[Any], predicted: Sequence[Any]) -> dict[str, float]:
        """Every metric of the task, of predictions against gold values."""
        return kinds.score(self.metrics, self.labels, gold, predicted)

    @property
    def test_splits(self) -> tuple[str, ...]:
        """`test` and then each further test set, by name: every split scored as a test."""
        return ("test", *split_names(self.splits)[len(SPLITS):])

    @property
    def evaluation_splits(self) -> tuple[str, ...]:
        """The splits a fine-tuning run scores at each evaluation: dev, then the test sets."""
        return ("dev", *self.test_splits)

    def describe(self) -> str:
        sizes = ", ".join(f"{split} {len(self.splits[split]):,}" for split in split_names(self.splits))
        labels = self.kind_spec.describe_labels(self.labels)
        return f"{self.name} ({self.kind}, {labels}; {sizes}; selected by dev {self.metric}; {self.origin})"


def split_names(splits: Mapping[str, Any]) -> tuple[str, ...]:
    """The splits of a task in their order: train, dev, test, then the further test sets
    (`test_<name>`) by name. Other keys of `splits` are left out (`Task` refuses them)."""
    extra = sorted(s for s in splits if s.startswith(EXTRA_TEST_PREFIX) and len(s) > len(EXTRA_TEST_PREFIX))
    return (*SPLITS, *extra)


def fingerprint(labels: Sequence[str], splits: Mapping[str, Sequence[TaskExample]]) -> str:
    """A short hash of the label set and every example (a task without further test
    sets, or examples without answers, hashes as it did before they existed)."""
    digest = hashlib.sha256(json.dumps(list(labels)).encode())
    for split in split_names(splits):
        if split not in SPLITS:
            digest.update(split.encode())
        for example in splits.get(split, ()):
            digest.update(repr(example.hashed()).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:12]


def hash_position(text: str) -> float:
    """Where a text falls in [0, 1): the first 8 bytes of its sha256 (fixed splits)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0**64


def baseline_scores(task: Task) -> dict[str, float]:
    """The test scores of trivial predictors, by name (always the training split's
    majority class, all O for tags; and for accuracy, a uniform guess): what a row must
    beat to have learnt anything. Its kind says which there are (none for values)."""
    return task.kind_spec.baseline(task)


def label_subset(task: Task, fraction: float, seed: int = 0) -> Task:
    """The task with `fraction` of its training examples (dev and test unchanged):
    stratified (each class keeps round(fraction x its count) of its examples; a kind
    without one class per example is one stratum), nested (a smaller fraction's examples are among a
    larger one's, for the same seed) and deterministic (`seed` orders each stratum).
    A fraction that leaves a class without an example is refused, naming the class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction!r} must lie in (0, 1]")
    if fraction == 1:
        return task
    train = task.splits["train"]
    by_class: dict[Any, list[int]] = {}
    for index, example in enumerate(train):
        by_class.setdefault(task.kind_spec.stratum(example), []).append(index)
    kept = []
    for label, indices in sorted(by_class.items(), key=lambda item: str(item[0])):
        rng = np.random.default_rng([seed, len(indices), *hashlib.sha256(str(label).encode()).digest()[:4]])
        take = math.floor(fraction * len(indices) + 0.5)
        if take == 0:
            name = task.labels[int(label)] if label is not None and task.labels else "every example"
            raise ValueError(f"label fraction {fraction:g} of task {task.name!r} leaves class {name!r} ({len(indices)} "
                             f"training examples) without an example; use a fraction of at least "
                             f"{0.5 / len(indices):.3g}")
        kept.extend(np.asarray(indices)[rng.permutation(len(indices))[:take]].tolist())
    splits = {**task.splits, "train": tuple(train[i] for i in sorted(kept))}
    return dataclasses.replace(task, splits=splits, fingerprint="",
                               origin=f"{task.origin}; {fraction:g} of its training examples, stratified")


def load_task(config: Any, pretraining_data: Any = None) -> Task:
    """The task `config` names (a fine-tuning config's task fields). `pretraining_data`
    is the `data` section of the run whose body is fine-tuned: the built-in tasks take
    their test split from its held-out split, so no test text was pretrained on."""
    source = config.task
    if source in BUILTIN:
        from pretrain.transfer import pydocs_tasks  # the Python documentation: parsed only when asked for

        return pydocs_tasks.build(source, config, pretraining_data)
    if source == "files":
        return load_files(config.task_path, config.task_kind, config.task_metric or None,
                          dev_fraction=config.dev_fraction)
    if source == "tfds":
        return load_tfds(config.task_tfds_name, config.task_tfds_data_dir or None, config.task_metric or None,
                         dev_fraction=config.dev_fraction)
    raise ValueError(f"config.task={source!r} is not a task; choose one of {', '.join(SOURCES)} (files: set "
                     "config.task_path; tfds: set config.task_tfds_name, e.g. 'glue/sst2')")


# -- the user's files ------------------------------------------------------------------


def files_problems(path: str | os.PathLike) -> list[str]:
    """Why `config.task_path` is not a readable task directory (missing, not a directory,
    a split's file missing or unreadable), or nothing: a look at the directory, not a
    read of the examples, so a fine-tuning run checks it before anything else."""
    try:
        files = _split_files(Path(path))
    except FileNotFoundError as error:
        return [str(error)]
    problems = []
    for file in files.values():
        try:
            with open(file, "rb") as handle:
                handle.read(1)
        except OSError as error:
            problems.append(f"{file} (config.task_path={os.fspath(path)!r}) cannot be read ({error.strerror}); "
                            "make it readable (e.g. chmod u+r)")
    return problems


def _split_files(directory: Path) -> dict[str, Path]:
    """{'train': path, 'dev': path, 'test': path} of a task directory."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"config.task_path={str(directory)!r} {what}; give a directory holding "
                                "train.jsonl, dev.jsonl and test.jsonl (or .tsv files)")
    found = {}
    for split, names in (("train", ("train",)), ("dev", ("dev", "validation", "valid")), ("test", ("test",))):
        matches = [directory / f"{name}{suffix}" for name in names for suffix in (".jsonl", ".tsv")
                   if (directory / f"{name}{suffix}").is_file()]
        if not matches:
            raise FileNotFoundError(f"{directory} has no {split} file: add {names[0]}.jsonl or {names[0]}.tsv "
                                    f"(found: {', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'})")
        found[split] = matches[0]
    return found


def _read_jsonl(path: Path) -> list[Record]:
    """The JSON object of each non-empty line (what it must hold is its kind's rule)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not JSON ({error.msg}); write one JSON object per line") from None
            if not isinstance(fields, dict):
                raise ValueError(f"{where} is not a JSON object; write {{\"text\": ..., \"label\": ...}}")
            records.append(Record(where, fields))
    return records


def _read_tsv(path: Path) -> list[Record]:
    """A table's rows (`text`, `label`, optional `text_b`) or CoNLL sentences (`tokens`, `tags`)."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    header = lines[0].split("\t") if lines else []
    rows: list[Record] = []
    if "text" in header:  # a classification table
        if "label" not in header:
            raise ValueError(f"{path}:1 has columns {header} but no 'label'; name the label column 'label'")
        columns = {name: index for index, name in enumerate(header)}
        for number, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != len(header):
                raise ValueError(f"{path}:{number} has {len(cells)} cells but the header has {len(header)}")
            label = cells[columns["label"]].strip()
            if not label:
                raise ValueError(f"{path}:{number} has no label; fill the 'label' column of every row")
            text_b = cells[columns["text_b"]] if "text_b" in columns else None
            rows.append(Record(f"{path}:{number}", {"text": cells[columns["text"]], "text_b": text_b, "label": label}))
        return rows
    words: list[str] = []  # CoNLL-style token<TAB>tag lines
    tags: list[str] = []
    start = 1
    for number, line in enumerate([*lines, ""], 1):
        if not line.strip():
            if words:
                rows.append(Record(f"{path}:{start}", {"tokens": words, "tags": tags}))
            words, tags, start = [], [], number + 1
            continue
        cells = line.split("\t")
        if len(cells) != 2 or not cells[1].strip():
            raise ValueError(f"{path}:{number}: a tagging line is 'token<TAB>tag' (a header row 'text<TAB>label' "
                             "makes a classification file); this line has no tag")
        words.append(cells[0])
        tags.append(cells[1].strip())
    return rows


def _read_split(path: Path) -> list[Record]:
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_tsv(path)
    if not rows:
        raise ValueError(f"{path} holds no examples; put at least one row in it")
    return rows


def load_files(path: str | os.PathLike, kind: str = "auto", metric: str | None = None,
               dev_fraction: float = 0.1) -> Task:
    """A task from a directory of train / dev / test files (see module docstring).
    `kind` 'auto' lets the training rows tell (`kinds.detect`: tagging for token rows,
    pair when rows have `text_b`, else classification; regression must be asked for).
    Every row is checked by the kind before any is converted, so the first bad row is
    the one reported."""
    del dev_fraction  # the user's files name their dev split
    directory = Path(path)
    files = _split_files(directory)
    records = {split: _read_split(path) for split, path in files.items()}
    if kind == "auto":
        spec = kinds.detect(records["train"])
    else:
        spec = kinds.lookup(kind, "config.task_kind", choices=("auto",))
    for split_records in records.values():
        for record in split_records:
            spec.check(record)
    labels = spec.labels_of(records["train"])
    splits = {split: tuple(spec.example(record, labels) for record in split_records)
              for split, split_records in records.items()}
    return Task(directory.name, spec.name, labels, splits, metric or spec.default_metric,
                f"files {', '.join(str(files[s]) for s in SPLITS)}")


# -- TFDS (GLUE) -----------------------------------------------------------------------

# GLUE's text features, by the order they form (text, text_b).
_TEXT_FEATURES = (("sentence", None), ("sentence1", "sentence2"), ("question", "sentence"),
                  ("premise", "hypothesis"), ("question1", "question2"), ("text", None))


def tfds_test_splits(name: str, available: Sequence[str]) -> dict[str, str]:
    """{task split: TFDS split} of the test sets of TFDS dataset `name`, whose splits are
    `available` (its `DatasetInfo.splits`).

    GLUE hides the labels of its `test*` splits (-1), so a dataset's test sets are its
    validation splits, `validation` and every `validation_<name>`; only a dataset with
    none is scored on its `test` and `test_<name>` splits, which then need labels. Of
    these, the headline `test` is the one named `validation` (`test`), else the
    `_matched` one (MNLI: `validation_matched`), else the first by name; every other
    one is scored beside it as `test_<name>` (MNLI's `validation_mismatched`:
    `test_mismatched`). Dev is none of them: `load_tfds` draws it from `train`. A
    dataset without `train`, or with neither kind of split, is refused, naming its
    splits."""
    if "train" not in available:
        raise ValueError(f"TFDS dataset {name!r} has no 'train' split (its splits: {', '.join(sorted(available))}); "
                         "a fine-tuning task trains on 'train': prepare the dataset with one")
    for family in ("validation", "test"):
        found = sorted(s for s in available if s == family or s.startswith(f"{family}_") and len(s) > len(family) + 1)
        if found:
            break
    else:
        raise ValueError(f"TFDS dataset {name!r} has no validation or test split to score on (its splits: "
                         f"{', '.join(sorted(available))}); prepare it with a labelled 'validation' split, e.g. "
                         "by holding out part of its training data")
    headline = next(s for s in (family, f"{family}_matched", found[0]) if s in found)
    further = {EXTRA_TEST_PREFIX + s[len(family) + 1:]: s for s in found if s != headline}
    return {"test": headline, **further}


def load_tfds(name: str, data_dir: str | None, metric: str | None = None, dev_fraction: float = 0.1) -> Task:
    """A classification, pair or regression task from a TFDS dataset prepared as
    ArrayRecord in `data_dir` (GLUE's feature names): dev is `dev_fraction` of its
    `train` split by text hash, the test sets are those `tfds_test_splits` picks from
    the split names the dataset's info lists."""
    import tensorflow_datasets as tfds  # only the TFDS path needs it

    if not name:
        raise ValueError("config.task='tfds' needs config.task_tfds_name, e.g. 'glue/sst2'")
    how = (f"prepare it on a machine with network (`tfds.builder({name!r}, data_dir=DIR).download_and_prepare("
           f"file_format='array_record')`), then copy DIR here and pass it as config.task_tfds_data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"config.task_tfds_data_dir={data_dir!r} does not exist: {how}")
    try:  # split=None: every split the dataset's info lists, by name
        sources = tfds.data_source(name, split=None, data_dir=data_dir, download=False)
    except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError, ValueError) as error:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared as ArrayRecord in {data_dir!r} "
                                f"({type(error).__name__}): {how}") from error
    if not sources:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared as ArrayRecord in {data_dir!r} (it has no "
                                f"splits): {how}")
    tests = tfds_test_splits(name, list(sources))
    features = sources["train"].dataset_info.features
    pair = next(((a, b) for a, b in _TEXT_FEATURES if a in features.keys() and (b is None or b in features.keys())),
                None)
    if pair is None or "label" not in features.keys():
        raise ValueError(f"TFDS dataset {name!r} has features {sorted(features.keys())}: expected a text feature "
                         f"({', '.join(a for a, _ in _TEXT_FEATURES)}) and 'label'")
    label_feature = features["label"]
    real_valued = not isinstance(label_feature, tfds.features.ClassLabel)
    shape = Record(name, {"text": "", "label": 0, **({"text_b": ""} if pair[1] else {})})  # of the dataset's rows
    kind = kinds.detect([shape], real_valued)
    labels = () if real_valued else tuple(label_feature.names)
    text = lambda value: value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def examples(records: Any) -> list[TaskExample]:
        out = []
        for index in range(len(records)):
            record = records[index]
            label = float(record["label"]) if real_valued else int(record["label"])
            if not real_valued and label < 0:
                continue  # a hidden label
            out.append(TaskExample(text(record[pair[0]]), text(record[pair[1]]) if pair[1] else None, label))
        return out

    rest = examples(sources["train"])
    is_dev = [hash_position(e.text + "\x00" + (e.text_b or "")) < dev_fraction for e in rest]
    splits = {"train": tuple(e for e, d in zip(rest, is_dev) if not d),
              "dev": tuple(e for e, d in zip(rest, is_dev) if d)}
    for split, tfds_split in tests.items():
        splits[split] = tuple(examples(sources[tfds_split]))
        if not splits[split]:
            raise ValueError(f"TFDS dataset {name!r}: its {tfds_split!r} split, the {split} set, has no labelled "
                             f"example ({len(sources[tfds_split])} records, labels hidden as -1 as GLUE's test labels "
                             f"are; its splits: {', '.join(sorted(sources))}); prepare it with a labelled "
                             "'validation' split")
    short = name.rsplit("/", 1)[-1]
    scored = "; ".join(f"{split}: its {tfds_split} split" for split, tfds_split in tests.items())
    return Task(name, kind.name, labels, splits, metric or GLUE_METRICS.get(short, kind.default_metric),
                f"TFDS {name} in {data_dir} ({scored}; dev: {dev_fraction:.0%} of train by hash)")
