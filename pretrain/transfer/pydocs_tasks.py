"""Built-in downstream tasks from the Python documentation inside the interpreter.

No download, and the same tasks on every machine with the same Python minor
version (each task's fingerprint covers its labels, its examples and the Python
version). Four kinds, like a small GLUE + NER + SQuAD suite:

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
  pydocs_qa           extractive question answering on the definition lists of stdlib
                      docstrings ("name -- description", ":param name: description",
                      "name (type): description" under Args:, Parameters:,
                      Attributes:, ...): the question "What is <name> of <function>?",
                      the answer the entry's description (1 to MAX_ANSWER_WORDS words)
                      within the passage: the whole docstring when it has at most
                      MAX_PASSAGE_WORDS words, else the list alone (of two entries or
                      more, at most that long), whitespace collapsed. The passage's
                      other entries are the distractors.

Splits are fixed by hashes. The test split is the pydocs pretraining held-out
split: an example is a test example when the pydocs document holding its text is
held out from pretraining (at the pretraining run's `heldout_fraction`) and its
text occurs in no pretraining document (the standard library repeats some
docstrings; such a repeat is dropped), so no test text is ever pretrained on. Dev
is `config.dev_fraction` of the rest, by the hash of the example's text (a QA
example's text is its passage, so all the questions on one passage share a split).
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
MAX_PASSAGE_WORDS = 150  # pydocs_qa: a longer docstring's passage is its definition list alone
MAX_ANSWER_WORDS = 20  # pydocs_qa: longer descriptions are left out (span QA decodes at most 30 pieces)
_QUOTED = re.compile(r'"([^"\n]+)"')
# pydocs_qa: a section header (indent, title), and the forms of an entry, each up to its description.
_SECTION = re.compile(r"^(\s*)(Args|Arguments?|Parameters|Optional arguments?|Keyword [Aa]rguments|Attributes|"
                      r"Instance attributes|Raises|Returns?):\s*$")
_DASH_ENTRY = re.compile(r"^(\s*)(?:[-*]\s+)?\*?(\w+(?:\([\w, ]*\))?)\s+--\s+(?=\S)")  # [- ]name[(args)] -- ...
_FIELD_ENTRY = re.compile(r"^(\s*):(param|raises|returns?)(?:\s+(?:\w+\s+)?(\w+))?:\s*(?=\S)")  # :param x: ...
_SECTION_ENTRY = re.compile(r"^(\s*)\*{0,2}(\w+)(?:\s*\([^)]*\))?\s*:\s+(?=\S)")  # name (type): ..., in a section
# The question of an entry, by what its section or field says of its name.
QUESTIONS = {"is": "What is {term} of {name}?", "raises": "When does {name} raise {term}?",
             "returns": "What does {name} return?"}
_ASKS = {"param": "is", "raises": "raises", "return": "returns", "returns": "returns", "Raises": "raises",
         "Return": "returns", "Returns": "returns"}


def build(name: str, config: Any, pretraining_data: Any = None) -> Task:
    """The built-in task `name`, split against the pretraining run's held-out fraction
    (when it pretrained on pydocs), else against `config.test_fraction`."""
    if pretraining_data is not None and pretraining_data.kind == "pydocs":
        fraction = pretraining_data.heldout_fraction
    else:
        fraction = config.test_fraction
    source = sources.PyDocsSource(heldout_fraction=fraction)
    builder = {"pydocs_topic": _topic, "pydocs_sentence_topic": _sentence_topic, "pydocs_same_module": _same_module,
               "pydocs_code_spans": _code_spans, "pydocs_qa": _qa}[name]
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
            "pydocs_code_spans": "tagging", "pydocs_qa": "span_qa"}[name]


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


def definition_lists(docstring: str) -> list[list[tuple[str, str, int, int]]]:
    """The definition lists of a docstring, each a list of entries (what the question
    asks, QUESTIONS' key; the entry's name; the first character of its description; the
    end of its description) in the docstring. A description runs on over the lines
    indented deeper than its entry; a Returns: section is one entry, its body; a line
    that is none of these ends a list."""
    lines = docstring.splitlines(keepends=True)
    starts = [sum(len(line) for line in lines[:number]) for number in range(len(lines) + 1)]
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    lists: list[list[tuple[str, str, int, int]]] = []
    current: list[tuple[str, str, int, int]] = []
    section: tuple[int, str] | None = None  # (indent, what its entries ask) of an open Args:-like section
    number = 0
    while number < len(lines):
        line = lines[number].rstrip("\n")
        header = _SECTION.match(line)
        if header or (section is not None and line.strip() and indent(line) <= section[0]):
            section = (len(header.group(1)), _ASKS.get(header.group(2), "is")) if header else None
        body = header is not None and section[1] == "returns"  # the section's body is the entry
        entry = None if header else _DASH_ENTRY.match(line) or _FIELD_ENTRY.match(line) or (
            _SECTION_ENTRY.match(line) if section is not None else None)
        if body and number + 1 < len(lines) and lines[number + 1].strip() and indent(lines[number + 1]) > section[0]:
            asks, term, level, first = "returns", "", section[0], starts[number + 1] + indent(lines[number + 1])
            number += 1
        elif entry is not None:
            field = entry.re is _FIELD_ENTRY
            asks = _ASKS[entry.group(2)] if field else section[1] if entry.re is _SECTION_ENTRY else "is"
            term, level, first = (entry.group(3) or "") if field else entry.group(2), len(entry.group(1)), \
                starts[number] + entry.end()
        else:
            if current:
                lists.append(current)
            current, number = [], number + 1
            continue
        end = number + 1
        while (end < len(lines) and lines[end].strip() and indent(lines[end]) > level
               and not (_DASH_ENTRY.match(lines[end]) or _FIELD_ENTRY.match(lines[end]))):
            end += 1
        current.append((asks, term, first, starts[end - 1] + len(lines[end - 1].rstrip())))
        number = end
    if current:
        lists.append(current)
    return lists


def _flat_offset(text: str, position: int) -> int:
    """Where `position` of `text` falls once its whitespace is collapsed (`position` on a
    non-space character)."""
    before = " ".join(text[:position].split())
    return len(before) + (1 if before and text[position - 1].isspace() else 0)


def qa_examples(owner: str, docstring: str) -> list[TaskExample]:
    """The questions on the definition lists of one docstring (see the module
    docstring); `owner` is the documented object's qualified name."""
    parts = owner.split(".")
    name = ".".join(parts[-2:]) if parts[-1].startswith("__") and len(parts) > 1 else parts[-1]
    whole = len(docstring.split()) <= MAX_PASSAGE_WORDS
    examples = []
    for entries in definition_lists(docstring):
        if whole:
            first, last = 0, len(docstring)
        else:  # the list alone, from its first entry's line: when it is a list and short enough
            first, last = docstring.rfind("\n", 0, entries[0][2]) + 1, entries[-1][3]
            if len(entries) < 2 or len(docstring[first:last].split()) > MAX_PASSAGE_WORDS:
                continue
        region = docstring[first:last]
        passage = " ".join(region.split())
        for asks, term, start, end in entries:
            answer = " ".join(docstring[start:end].split())
            offset = _flat_offset(region, start - first)
            if 1 <= len(answer.split()) <= MAX_ANSWER_WORDS and passage[offset : offset + len(answer)] == answer:
                examples.append(TaskExample(QUESTIONS[asks].format(term=term, name=name), passage,
                                            answers=((offset, offset + len(answer)),)))
    return examples


def _qa(source: sources.PyDocsSource, config: Any) -> tuple[tuple[str, ...], dict, str]:
    splits: dict[str, list[TaskExample]] = {"train": [], "dev": [], "test": []}
    split_of = _Splitter(source, config.dev_fraction)
    seen = set()
    for origin, parts in sources.pydocs_units():
        if origin.startswith("topic:"):
            continue
        origin_text = "\n\n".join(text for _, text in parts)
        for owner, docstring in parts:
            for example in qa_examples(owner, docstring):
                split = split_of(origin, origin_text, example.text_b) if (example.text, example.text_b) not in seen \
                    else None
                seen.add((example.text, example.text_b))
                if split is not None:
                    splits[split].append(example)
    return (), {s: tuple(e) for s, e in splits.items()}, "exact_match"
