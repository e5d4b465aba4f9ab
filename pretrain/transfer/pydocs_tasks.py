"""Built-in downstream tasks from the Python documentation inside the interpreter.

No download, and the same tasks on every machine with the same Python minor
version (each task's fingerprint covers its labels, its examples and the Python
version). Three kinds, like a small GLUE + NER suite:

  pydocs_topic        one docstring -> its standard-library package (topic
                      classification). The package's own name is masked in the text
                      ("PACKAGE"), and only packages with at least
                      `config.task_min_examples` docstrings are kept.
  pydocs_sentence_topic  one sentence of a docstring -> its package: short-text topic
                      classification (a sentence carries a few cues where a docstring
                      carries many), sentences of at least `config.task_min_words`
                      words, packages with at least 3 x `config.task_min_examples`
                      of them.
  pydocs_same_module  two docstrings -> whether they come from the same module
                      (pair classification; half the pairs are positive).
  pydocs_code_spans   the sentences of `pydoc_data.topics`, where the documentation
                      quotes code in "double quotes": the quotes are removed and the
                      quoted words become B-CODE / I-CODE, the rest O (the NER analogue).

Splits are fixed by hashes. The test split is the pydocs pretraining held-out
split: an example is a test example when the pydocs document holding its text is
held out from pretraining (at the pretraining run's `heldout_fraction`) and its
text occurs in no pretraining document (the standard library repeats some
docstrings; such a repeat is dropped), so no test text is ever pretrained on. Dev
is `config.dev_fraction` of the rest, by the hash of the example's text.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from pretrain import sources
from pretrain.transfer.tasks import Task, TaskExample, hash_position

MASKED_NAME = "PACKAGE"
CODE_TAGS = ("B-CODE", "I-CODE", "O")
_QUOTED = re.compile(r'"([^"\n]+)"')


def build(name: str, config: Any, pretraining_data: Any = None) -> Task:
    """The built-in task `name`, split against the pretraining run's held-out fraction
    (when it pretrained on pydocs), else against `config.test_fraction`."""
    if pretraining_data is not None and pretraining_data.kind == "pydocs":
        fraction = pretraining_data.heldout_fraction
    else:
        fraction = config.test_fraction
    source = sources.PyDocsSource(heldout_fraction=fraction)
    builder = {"pydocs_topic": _topic, "pydocs_sentence_topic": _sentence_topic, "pydocs_same_module": _same_module,
               "pydocs_code_spans": _code_spans}[name]
    labels, splits, metric = builder(source, config)
    if config.task_max_examples > 0:  # an evenly spaced subset of each split (quick experiments and tests)
        splits = {split: subset(examples, config.task_max_examples) for split, examples in splits.items()}
    version = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    key = hashlib.sha256(f"{version} {labels} {source.fingerprint} {sorted((s, len(e)) for s, e in splits.items())}"
                         .encode()).hexdigest()[:12]
    return Task(name, kind_of(name), labels, splits, config.task_metric or metric,
                f"built in from the {version} documentation (pydocs {source.fingerprint}), test split = the pydocs "
                f"held-out split at heldout_fraction={fraction}", fingerprint=key)


def subset(examples: tuple[TaskExample, ...], count: int) -> tuple[TaskExample, ...]:
    """At most `count` examples spread evenly over `examples` (every k-th), so a small
    subset keeps the labels of the whole."""
    step = max(1, -(-len(examples) // count))
    return examples[::step][:count]


def kind_of(name: str) -> str:
    return {"pydocs_topic": "classification", "pydocs_sentence_topic": "classification", "pydocs_same_module": "pair",
            "pydocs_code_spans": "tagging"}[name]


class _Splitter:
    """Which split an example goes to: test when its pydocs document is held out from
    pretraining and its text occurs in no training document (docstrings repeat across
    modules; a repeated one is dropped rather than tested on pretrained text), else
    dev by hash, else train."""

    def __init__(self, source: sources.PyDocsSource, dev_fraction: float):
        self.source, self.dev_fraction = source, dev_fraction
        self.train_text = "\n".join(" ".join(d.text.split()) for d in source.split("train"))

    def __call__(self, origin: str, origin_text: str, text: str) -> str | None:
        if self.source.is_heldout(origin, origin_text):
            return None if " ".join(text.split()) in self.train_text else "test"
        return "dev" if hash_position(text) < self.dev_fraction else "train"


def _docstrings(min_words: int) -> Iterator[tuple[str, str, str, str]]:
    """(origin, origin text, module, flattened docstring) of every stdlib docstring of at
    least `min_words` words."""
    for origin, parts in sources.pydocs_units():
        if origin.startswith("topic:"):
            continue
        origin_text = "\n\n".join(text for _, text in parts)
        module = origin.split(":", 1)[1]
        if origin.startswith("class:"):
            module = module.rsplit(".", 1)[0]
        for _, docstring in parts:
            flat = " ".join(docstring.split())
            if len(flat.split()) >= min_words:
                yield origin, origin_text, module, flat


def _mask(text: str, package: str) -> str:
    """The text with the package's name (and its name without a leading underscore)
    replaced by MASKED_NAME, as whole words, ignoring case."""
    names = {package, package.lstrip("_")} - {""}
    pattern = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
                         + r")(?![A-Za-z0-9_])", re.IGNORECASE)
    return pattern.sub(MASKED_NAME, text)


def _topic(source: sources.PyDocsSource, config: Any) -> tuple[tuple[str, ...], dict, str]:
    rows = [(origin, origin_text, module.split(".")[0], text)
            for origin, origin_text, module, text in _docstrings(config.task_min_words)]
    return _by_package(source, config, rows, config.task_min_examples)


def sentences_of(docstring: str, min_words: int) -> tuple[str, ...]:
    """The sentences (the corpus's sentence splitter) of at least `min_words` words of a
    flattened docstring (unmasked: the split checks them against the pretraining text)."""
    document = sources.document_of(docstring)
    return tuple(s for s in (document.sentences if document else ()) if len(s.split()) >= min_words)


def _sentence_topic(source: sources.PyDocsSource, config: Any) -> tuple[tuple[str, ...], dict, str]:
    rows = [(origin, origin_text, module.split(".")[0], sentence)
            for origin, origin_text, module, text in _docstrings(config.task_min_words)
            for sentence in sentences_of(text, config.task_min_words)]
    return _by_package(source, config, rows, 3 * config.task_min_examples)


def _by_package(source: sources.PyDocsSource, config: Any, rows: list[tuple[str, str, str, str]], least: int
                ) -> tuple[tuple[str, ...], dict, str]:
    """Classification of texts by package from (origin, origin text, package, text) rows:
    packages with at least `least` rows are the labels, each text masked and split by
    `_Splitter`."""
    counts = Counter(package for _, _, package, _ in rows)
    labels = tuple(sorted(p for p, n in counts.items() if n >= least))
    index = {label: i for i, label in enumerate(labels)}
    splits: dict[str, list[TaskExample]] = {"train": [], "dev": [], "test": []}
    split_of = _Splitter(source, config.dev_fraction)
    for origin, origin_text, package, text in rows:
        split = split_of(origin, origin_text, text) if package in index else None
        if split is not None:
            splits[split].append(TaskExample(_mask(text, package), label=index[package]))
    return labels, {s: tuple(e) for s, e in splits.items()}, "accuracy"


def _same_module(source: sources.PyDocsSource, config: Any) -> tuple[tuple[str, ...], dict, str]:
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    split_of = _Splitter(source, config.dev_fraction)
    for origin, origin_text, module, text in _docstrings(config.task_min_words):
        split = split_of(origin, origin_text, text)
        if split is not None:
            by_split[split].append((module, text))
    splits = {}
    for split, rows in by_split.items():
        modules: dict[str, list[int]] = {}
        for position, (module, _) in enumerate(rows):
            modules.setdefault(module, []).append(position)
        examples = []
        for position, (module, text) in enumerate(rows):
            rng = np.random.default_rng(int(hash_position(text) * 2**53))
            mates = [p for p in modules[module] if p != position]
            if mates and rng.random() < 0.5:
                other, label = rows[mates[int(rng.integers(len(mates)))]][1], 1
            else:
                others = [p for p in range(len(rows)) if rows[p][0] != module]
                if not others:
                    continue
                other, label = rows[others[int(rng.integers(len(others)))]][1], 0
            examples.append(TaskExample(text, other, label=label))
        splits[split] = tuple(examples)
    return ("different module", "same module"), splits, "accuracy"


def code_span_words(sentence: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(words, tag indices into CODE_TAGS) of a sentence whose code is in double quotes:
    the quotes go, each quoted span's first word is B-CODE and the rest I-CODE."""
    words: list[str] = []
    tags: list[int] = []
    position = 0
    for match in _QUOTED.finditer(sentence):
        for word in sentence[position : match.start()].split():
            words.append(word)
            tags.append(CODE_TAGS.index("O"))
        for number, word in enumerate(match.group(1).split()):
            words.append(word)
            tags.append(CODE_TAGS.index("B-CODE" if number == 0 else "I-CODE"))
        position = match.end()
    for word in sentence[position:].split():
        words.append(word)
        tags.append(CODE_TAGS.index("O"))
    return tuple(words), tuple(tags)


def _code_spans(source: sources.PyDocsSource, config: Any) -> tuple[tuple[str, ...], dict, str]:
    splits: dict[str, list[TaskExample]] = {"train": [], "dev": [], "test": []}
    split_of = _Splitter(source, config.dev_fraction)
    for origin, parts in sources.pydocs_units():
        if not origin.startswith("topic:"):
            continue
        text = parts[0][1]
        document = sources.document_of(text)
        for sentence in document.sentences if document else ():
            words, tags = code_span_words(sentence)
            split = split_of(origin, text, sentence) if len(words) >= config.task_min_words else None
            if split is not None:
                splits[split].append(TaskExample(words=words, tags=tags))
    return CODE_TAGS, {s: tuple(e) for s, e in splits.items()}, "span_f1"
