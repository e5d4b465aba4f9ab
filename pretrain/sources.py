"""Text sources behind one interface: documents split into sentences, train and held-out.

    source = make_source(kind="pydocs")   # or "files" / "tfds", with their arguments
    train = source.split("train")         # len() and [i] -> Document, e.g. for grain.MapDataset.source
    logging.info(source.describe())

  pydocs  the default, needs no download: `pydoc_data.topics` and stdlib docstrings (read with `ast`).
  files   UTF-8 `.txt` (a blank line ends a document) or `.jsonl` (one object per line).
  tfds    a TFDS dataset with a text feature, prepared as ArrayRecord in a `data_dir`,
          read lazily through `tfds.data_source` (no TensorFlow needed).

The pydocs and files held-out split is a function of each document's text alone (its
sha256), so every machine with the same data draws the same split. Bad input is one
clear error naming the files and what to do, or skipped, counted in `Source.skipped`
and warned about (file and line) for the first few of each kind.
"""

from __future__ import annotations

import abc
import ast
import collections
import dataclasses
import functools
import glob
import hashlib
import inspect
import itertools
import json
import logging
import operator
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
ABBREVIATIONS = frozenset(
    "e.g. i.e. etc. cf. vs. viz. al. approx. resp. mr. mrs. ms. dr. prof. st. jr. sr. fig. figs. eq. "
    "ch. vol. pp. eds. inc. ltd. co. corp. jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. nov. dec.".split())
# A candidate sentence end: a run of . ! ? not preceded by another one (so a long run is
# scanned once, keeping the search linear), optional closing quotes/brackets, a space.
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++[\"'\u201d\u2019)\]]*+ ")
_SENTENCE_OPENERS = "\"'([{\u201c\u2018"
_WHITESPACE = re.compile(r"(?: \s|[^\S ])\s*")  # any whitespace but a lone space (fast on prose)
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+\"'`])\1{2,}\s*$")
_WARNINGS_PER_REASON = 5


@dataclasses.dataclass(frozen=True)
class Document:
    """A document as its sentences: each non-empty, stripped, with single spaces inside.

    Only a TFDS record with no text gives an empty tuple; the other sources skip
    documents that are too short, and the data pipeline counts an empty one as dropped.
    """

    sentences: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "sentences", tuple(self.sentences))
        if not all(isinstance(s, str) and s and s == s.strip() for s in self.sentences):
            raise ValueError("Document sentences must be non-empty, stripped strings")

    @property
    def text(self) -> str:
        """The sentences joined by single spaces (what hashing and dedup look at)."""
        return " ".join(self.sentences)

    @property
    def characters(self) -> int:
        return sum(len(s) for s in self.sentences)


def split_sentences(text: str) -> list[str]:
    """Paragraphs (at blank lines), then sentences, in time linear in `len(text)`.

    A sentence ends at `.`, `!` or `?` (plus closing quotes/brackets) followed by
    whitespace and an uppercase letter, opening quote or bracket, except after a
    common abbreviation ('e.g.', 'etc.', ...) or a single-letter initial. A period
    inside a number ('3.14') is never followed by whitespace, so never splits.
    Whitespace inside a sentence collapses to one space; empty pieces are dropped.
    """
    sentences: list[str] = []
    paragraph: list[str] = []
    for line in text.splitlines() + [""]:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            sentences.extend(_paragraph_sentences(_WHITESPACE.sub(" ", " ".join(paragraph)).strip()))
            paragraph = []
    return sentences


def _paragraph_sentences(paragraph: str) -> Iterator[str]:
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        end = match.end()
        if end >= len(paragraph) or not (paragraph[end].isupper() or paragraph[end] in _SENTENCE_OPENERS):
            continue
        word_start = max(start, paragraph.rfind(" ", start, match.start()) + 1)
        word = paragraph[word_start : match.end() - 1].lstrip(_SENTENCE_OPENERS)
        if word.lower() in ABBREVIATIONS or (len(word) == 2 and word[0].isupper() and word[1] == "."):
            continue
        yield paragraph[start : end - 1]
        start = end
    if start < len(paragraph):
        yield paragraph[start:]


def heldout_position(document: Document) -> float:
    """Where a document's text falls in [0, 1): the first 8 bytes of its sha256."""
    digest = hashlib.sha256(document.text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_heldout(documents: Sequence[Document], heldout_fraction: float
                  ) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """(train, heldout): held out when `heldout_position < heldout_fraction`.

    Membership depends on the text alone, except that a corpus of at least two
    documents always holds out at least one (the lowest position) and trains on at
    least one (the highest), so tiny corpora still have both splits.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    positions = [heldout_position(d) for d in documents]
    held = [p < heldout_fraction for p in positions]
    if len(documents) >= 2 and not any(held):
        held[min(range(len(positions)), key=positions.__getitem__)] = True
    if len(documents) >= 2 and all(held):
        held[max(range(len(positions)), key=positions.__getitem__)] = False
    return (tuple(d for d, h in zip(documents, held) if not h),
            tuple(d for d, h in zip(documents, held) if h))


class DocumentSequence(Protocol):
    """Random access to the documents of one split (what `grain.MapDataset.source` needs)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Document: ...


@dataclasses.dataclass(frozen=True)
class SourceStatistics:
    """Sizes of one split; `tokens` only when a token counter was given."""

    documents: int
    sentences: int
    characters: int
    tokens: int | None = None


class Source(abc.ABC):
    """Documents of a corpus, split into 'train' and 'heldout'."""

    name: str
    skipped: Mapping[str, int]  # input left out while reading, by reason

    @abc.abstractmethod
    def split(self, name: str) -> DocumentSequence:
        """The documents of split `name` ('train' or 'heldout')."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the run log: what was read and how much."""

    def statistics(self, split: str, count_tokens: Callable[[str], int] | None = None,
                   max_documents: int | None = None) -> SourceStatistics:
        """Documents, sentences and characters of a split (its first `max_documents`).

        Tokens are counted only when `count_tokens` (e.g. a tokenizer's length of
        encoding) is given, since the tokenizer is trained after the source exists.
        """
        documents = self.split(split)
        count = len(documents) if max_documents is None else min(max_documents, len(documents))
        sentences = [documents[i].sentences for i in range(count)]
        tokens = None if count_tokens is None else sum(count_tokens(s) for d in sentences for s in d)
        return SourceStatistics(count, sum(map(len, sentences)), sum(len(s) for d in sentences for s in d), tokens)

    def _check_split(self, name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} of source {self.name!r}; splits are {SPLITS}")


class _InMemorySource(Source):
    """A corpus parsed into memory, with the text-hash held-out split."""

    def __init__(self, documents: Sequence[Document], heldout_fraction: float):
        self.heldout_fraction = heldout_fraction
        train, heldout = split_heldout(documents, heldout_fraction)
        self._splits = {"train": train, "heldout": heldout}

    def split(self, name: str) -> tuple[Document, ...]:
        self._check_split(name)
        return self._splits[name]

    def _sizes(self) -> str:
        train, heldout = self.statistics("train"), self.statistics("heldout")
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"train {train.documents:,} documents / {train.sentences:,} sentences / "
                f"{train.characters:,} characters, heldout {heldout.documents:,} documents "
                f"(heldout_fraction={self.heldout_fraction}); skipped: {skipped}")


class _Skips(collections.Counter):
    """Input left out, counted by reason, with a warning for the first few of each reason."""

    def add(self, reason: str, where: str, detail: str) -> None:
        self[reason] += 1
        if self[reason] <= _WARNINGS_PER_REASON:
            more = " (further ones are only counted)" if self[reason] == _WARNINGS_PER_REASON else ""
            log.warning("skipped %s: %s: %s%s", where, reason, detail, more)


def _usable(sentences: list[str], min_sentences: int, min_characters: int) -> bool:
    return len(sentences) >= min_sentences and sum(len(s) for s in sentences) >= min_characters


_STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload",
    "idlelib", "turtledemo", "ensurepip", "lib2to3", "distutils", "tkinter", "__phello__"})
# Tests, tools, and packages some distributions ship apart (Debian: python3-tk, python3-distutils):
# keeping them, or the per-platform `_sysconfigdata_*`, would make the corpus differ between machines.


@dataclasses.dataclass(frozen=True)
class _PyDocsCorpus:
    documents: tuple[Document, ...]
    skipped: Mapping[str, int]
    seconds: float
    fingerprint: str
    origins: Mapping[str, Document]  # origin -> the corpus document that holds its text (kept or its duplicate)


def _docstring_units(node: ast.AST, prefix: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a node and of the functions directly in its body."""
    children = [n for n in getattr(node, "body", []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    units = [(prefix, ast.get_docstring(node))]
    units += [(f"{prefix}.{child.name}", ast.get_docstring(child)) for child in children]
    return [(name, doc) for name, doc in units if doc]


def _stdlib_docstrings(root: Path, skips: _Skips) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(origin, [(qualified name, docstring), ...]) per stdlib source file (module and
    function docstrings) and per class in it (class and method docstrings), in sorted
    file order. A pydocs document is the origin's docstrings joined as paragraphs."""
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        paths += [Path(directory, f) for f in files
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        try:
            tree = _parse(path)
        except (SyntaxError, ValueError) as error:
            skips.add("unparsable", str(path), str(error))
            continue
        yield f"module:{module}", _docstring_units(tree, module)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                yield f"class:{module}.{node.name}", _docstring_units(node, f"{module}.{node.name}")


def _parse(path: Path) -> ast.Module:
    """`ast.parse` of a file, once more on CPython's spurious SystemError ("AST
    constructor recursion depth mismatch", gh-106905, fixed in 3.11.8 and 3.12.1): its
    recursion bookkeeping is per interpreter, so another thread's AST work can upset
    it; seen once in the slow suite on 3.11.7. Parsing is deterministic, so the second
    try gives the same tree."""
    source = path.read_bytes()
    try:
        return ast.parse(source, filename=str(path))
    except SystemError:
        return ast.parse(source, filename=str(path))


@functools.lru_cache(maxsize=None)
def pydocs_units() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """Every pydocs origin with its units, parsed once per process: ('topic:<key>',
    ((key, text),)) per `pydoc_data.topics` entry, then ('module:<m>' or 'class:<m>.<C>',
    ((qualified name, docstring), ...)) per stdlib file and class. The pydocs corpus
    and the built-in downstream tasks (`pretrain.transfer`) both read it."""
    from pydoc_data.topics import topics  # data only: importing runs nothing else

    skips = _Skips()
    units = [(f"topic:{key}", ((key, topics[key]),)) for key in sorted(topics)]
    units += [(origin, tuple(parts)) for origin, parts in _stdlib_docstrings(Path(sysconfig.get_paths()["stdlib"]),
                                                                             skips)]
    return tuple(units)


def document_of(text: str) -> Document | None:
    """The pydocs document of a text (reST underlines dropped, split into sentences), or
    None when it has no sentence."""
    text = "\n".join(line for line in text.splitlines() if not _UNDERLINE.match(line))
    sentences = split_sentences(text)
    return Document(tuple(sentences)) if sentences else None


@functools.lru_cache(maxsize=None)
def _pydocs_corpus(min_sentences: int, min_characters: int) -> _PyDocsCorpus:
    """Parses the interpreter's documentation once per process and logs its sizes."""
    start = time.perf_counter()
    skips = _Skips()
    documents, kept, origins = [], {}, {}
    for origin, parts in pydocs_units():
        document = document_of("\n\n".join(text for _, text in parts))
        if document is None or not _usable(list(document.sentences), min_sentences, min_characters):
            skips["short"] += 1  # expected for many small modules: counted, not warned
            continue
        key = hashlib.sha256(document.text.casefold().encode("utf-8", "surrogatepass")).digest()
        if key in kept:
            skips["duplicate"] += 1
            origins[origin] = kept[key]
            continue
        kept[key] = origins[origin] = document
        documents.append(document)
    fingerprint = hashlib.sha256("\n\n".join(d.text for d in documents).encode("utf-8", "surrogatepass"))
    corpus = _PyDocsCorpus(tuple(documents), dict(skips), time.perf_counter() - start,
                           fingerprint.hexdigest()[:12], origins)
    log.info("pydocs corpus (Python %d.%d): %d documents, %d sentences, %d characters; skipped %s; "
             "fingerprint %s; built in %.2f s", *sys.version_info[:2], len(documents),
             sum(len(d.sentences) for d in documents), sum(d.characters for d in documents),
             corpus.skipped, corpus.fingerprint, corpus.seconds)
    return corpus


class PyDocsSource(_InMemorySource):
    """The documentation inside this Python, needing no download: every `pydoc_data`
    topic; per stdlib module its module and function docstrings; per class its class
    and method docstrings.

    Modules are read with `ast`, never imported (`antigravity` opens a browser). The
    corpus is deduplicated, ordered by topic then module name, and identical on every
    machine with the same Python minor version (`describe()` shows a fingerprint to
    compare). It is parsed once per process.
    """

    def __init__(self, heldout_fraction: float = 0.02, min_sentences: int = 2, min_characters: int = 100):
        self.name = "pydocs"
        self._corpus = _pydocs_corpus(min_sentences, min_characters)
        self.skipped = self._corpus.skipped
        super().__init__(self._corpus.documents, heldout_fraction)

    def describe(self) -> str:
        return (f"pydocs (Python {sys.version_info[0]}.{sys.version_info[1]} documentation, fingerprint "
                f"{self._corpus.fingerprint}, parsed in {self._corpus.seconds:.2f} s): {self._sizes()}")

    def is_heldout(self, origin: str, text: str) -> bool:
        """Whether the text of pydocs origin `origin` (e.g. 'module:json.decoder') is in
        the held-out split: by the corpus document that holds it, or, for an origin too
        short to be a document, by its own text's hash, as a document's would be."""
        document = self._corpus.origins.get(origin)
        if document is not None:
            return document in self._heldout_set
        own = document_of(text)
        return own is not None and heldout_position(own) < self.heldout_fraction

    @functools.cached_property
    def _heldout_set(self) -> frozenset[Document]:
        return frozenset(self.split("heldout"))

    @property
    def fingerprint(self) -> str:
        """A hash of the corpus text: equal on machines with the same Python minor version."""
        return self._corpus.fingerprint



def _resolve_files(pattern: str | os.PathLike) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not files:
        raise FileNotFoundError(
            f"no text files found for {str(pattern)!r}: give an existing .txt/.jsonl file, a "
            f"directory containing such files, or a glob that matches files (e.g. 'corpus/*.txt')")
    return sorted(files, key=str)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _name_files(files: Sequence[Path], limit: int = 5) -> str:
    named = ", ".join(str(f) for f in files[:limit])
    return named + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) streamed from a file; a long line stays one piece."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            yield number, offset, (raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw)
            offset += len(raw)


class TextFileSource(_InMemorySource):
    """UTF-8 `.txt` files (a blank line ends a document; also any other suffix) or
    `.jsonl` (one JSON object per line, text under `text_field`).

    `pattern` is a file, a directory (its `.txt`/`.jsonl` files, recursively) or a glob.
    Files are streamed line by line in sorted order into memory (TFDS suits corpora
    that do not fit). Skipped, counted in `skipped` and warned about with file and
    line: a `.txt` document or `.jsonl` line that is not UTF-8 ('non_utf8'), a line
    that is not JSON ('not_json'), lacks `text_field` ('missing_field') or holds a
    non-string ('not_string'), and documents under the minimum size ('short').
    """

    def __init__(self, pattern: str | os.PathLike, text_field: str = "text", heldout_fraction: float = 0.02,
                 min_sentences: int = 1, min_characters: int = 10):
        self.name = f"files:{pattern}"
        self.files = tuple(_resolve_files(pattern))
        self.text_field = text_field
        self._limits = (min_sentences, min_characters)
        skips, documents = _Skips(), []
        for path in self.files:
            texts = self._jsonl(path, skips) if path.suffix == ".jsonl" else self._txt(path, skips)
            for where, text in texts:
                sentences = split_sentences(text)
                if not _usable(sentences, *self._limits):
                    skips.add("short", where, f"{len(sentences)} sentences, {sum(map(len, sentences))} characters")
                else:
                    documents.append(Document(tuple(sentences)))
        self.skipped = dict(skips)
        if not documents:
            if not self.skipped:
                raise ValueError(f"no text in {_name_files(self.files)} (matched by {str(pattern)!r}): "
                                 f"the files are empty; point the source at files that contain UTF-8 text")
            raise ValueError(f"no usable documents in {_name_files(self.files)}: every document or line was "
                             f"skipped ({self.skipped}); see the warnings above for files and lines, fix the "
                             f"input or its text_field={text_field!r}")
        super().__init__(documents, heldout_fraction)

    @staticmethod
    def _txt(path: Path, skips: _Skips) -> Iterator[tuple[str, str]]:
        lines: list[str] = []
        first, bad = 0, ""
        for number, offset, raw in itertools.chain(_lines(path), [(0, 0, b"")]):  # a blank line ends the file
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                line, bad = "?", bad or f"bytes that are not UTF-8 at line {number}, byte offset {offset + error.start}"
            if line.strip():
                first = first or number
                lines.append(line.rstrip("\r\n"))
            elif lines:
                if bad:
                    skips.add("non_utf8", f"{path}:{first}", f"document with {bad}")
                else:
                    yield f"{path}:{first}", "\n".join(lines)
                lines, first, bad = [], 0, ""

    def _jsonl(self, path: Path, skips: _Skips) -> Iterator[tuple[str, str]]:
        for number, offset, raw in _lines(path):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                skips.add("non_utf8", where, f"bytes that are not UTF-8 at byte offset {offset + error.start}")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                skips.add("not_json", where, str(error))
                continue
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if text is None:
                skips.add("missing_field", where, f"no {self.text_field!r} field")
            elif not isinstance(text, str):
                skips.add("not_string", where, f"{self.text_field!r} is {type(text).__name__}")
            elif not _encodable(text):
                skips.add("non_utf8", where, f"{self.text_field!r} has an unpaired surrogate escape")
            else:
                yield where, text

    def describe(self) -> str:
        return f"files {_name_files(self.files)} ({len(self.files)} files): {self._sizes()}"



class _TfdsDocuments:
    """A TFDS split as documents, decoded (bytes -> str -> sentences) when indexed."""

    def __init__(self, records: Any, feature: str):
        self._records, self._feature = records, feature

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Document:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range [0, {len(self)})")
        value = self._records[index][self._feature]
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        return Document(tuple(split_sentences(text)))


class TfdsSource(Source):
    """A TFDS dataset with a text feature, read lazily through `tfds.data_source`.

    The dataset must already be prepared as ArrayRecord in `data_dir` (this code never
    downloads); `splits` maps 'train' and 'heldout' to TFDS split specs, e.g.
    {'train': 'train[1%:]', 'heldout': 'train[:1%]'} for a dataset without validation.
    Text is stored UTF-8 by TFDS; undecodable bytes would become U+FFFD.
    """

    def __init__(self, name: str, data_dir: str | os.PathLike | None = None, text_feature: str = "text",
                 splits: Mapping[str, str] | None = None):
        self.name = f"tfds:{name}"
        self.dataset, self.data_dir, self.text_feature = name, data_dir, text_feature
        self.splits = {"train": "train", "heldout": "validation", **(splits or {})}
        if sorted(self.splits) != sorted(SPLITS):
            raise ValueError(f"TFDS splits must map exactly {SPLITS} to TFDS split specs, got {self.splits}")
        self.skipped: Mapping[str, int] = {}
        self._documents = {split: self._open(spec) for split, spec in self.splits.items()}

    def _open(self, spec: str) -> _TfdsDocuments:
        import tensorflow_datasets as tfds  # imported here: the other sources do not need it

        how = (f"prepare it on a machine with network (`tfds.builder({self.dataset!r}, data_dir=DIR)"
               f".download_and_prepare(file_format='array_record')`, or `tfds build {self.dataset} "
               f"--file_format=array_record --data_dir=DIR`), then copy DIR here and pass it as data_dir")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"TFDS data_dir {str(self.data_dir)!r} for dataset {self.dataset!r} "
                                    f"does not exist: {how}")
        try:
            records = tfds.data_source(self.dataset, split=spec, data_dir=self.data_dir, download=False)
        except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError) as error:
            raise FileNotFoundError(f"TFDS dataset {self.dataset!r} is not prepared as ArrayRecord in "
                                    f"data_dir {str(self.data_dir)!r}: {how}") from error
        except ValueError as error:
            raise ValueError(f"TFDS dataset {self.dataset!r} in {str(self.data_dir)!r}: split {spec!r} "
                             f"cannot be read: {error}") from error
        features = records.dataset_info.features
        if self.text_feature not in features.keys():
            raise ValueError(f"TFDS dataset {self.dataset!r} has no feature {self.text_feature!r}; its "
                             f"features are {sorted(features.keys())}: pass one of them as text_feature")
        if not isinstance(features[self.text_feature], tfds.features.Text):
            raise ValueError(f"TFDS feature {self.text_feature!r} of {self.dataset!r} is "
                             f"{type(features[self.text_feature]).__name__}, not Text")
        return _TfdsDocuments(records, self.text_feature)

    def split(self, name: str) -> DocumentSequence:
        self._check_split(name)
        return self._documents[name]

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {self.splits[s]!r} {len(self._documents[s]):,} documents" for s in SPLITS)
        return f"tfds {self.dataset!r} from {str(self.data_dir)!r}, feature {self.text_feature!r}: {sizes}"


SOURCE_KINDS: Mapping[str, type[Source]] = {"pydocs": PyDocsSource, "files": TextFileSource, "tfds": TfdsSource}


def make_source(kind: str = "pydocs", **kwargs: Any) -> Source:
    """The source of `kind` ('pydocs', 'files' or 'tfds') built from its arguments,
    e.g. `make_source(**config.data.source)`; wrong kinds or arguments fail here."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; kinds are {', '.join(sorted(SOURCE_KINDS))}")
    cls = SOURCE_KINDS[kind]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise TypeError(f"source kind {kind!r} takes {inspect.signature(cls)}: {error}") from None
    return cls(**kwargs)
