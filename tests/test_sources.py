"""Text sources: sentence splitting, the pydocs corpus, text files and bad input, TFDS."""

from __future__ import annotations

import collections
import json
import logging
import pickle
import re
import sys
import time

import grain
import pytest

from pretrain import sources
from pretrain.sources import (Document, PyDocsSource, SourceStatistics, TextFileSource, TfdsSource,
                              heldout_position, make_source, split_heldout, split_sentences)
import tfds_fixture


def doc(*sentences: str) -> Document:
    return Document(sentences)


def all_documents(source) -> collections.Counter:
    return collections.Counter(list(source.split("train")) + list(source.split("heldout")))


# ------------------------------------------------------------------ split_sentences


@pytest.mark.parametrize("text, expected", [
    ("Hello world. This is it!  Is it? yes.", ["Hello world.", "This is it!", "Is it? yes."]),
    ("Use e.g. Python, i.e. CPython, etc. Then stop.", ["Use e.g. Python, i.e. CPython, etc. Then stop."]),
    ("Pi is 3.14. Version 2.0 ships.", ["Pi is 3.14.", "Version 2.0 ships."]),
    ('He said "Hi." Then left. (Really.) Yes.', ['He said "Hi."', "Then left.", "(Really.)", "Yes."]),
    ("Wait... What?! 'Quoted' start.", ["Wait...", "What?!", "'Quoted' start."]),
    ("J. Smith wrote it. Dr. Who too.", ["J. Smith wrote it.", "Dr. Who too."]),
    ("One line\nwraps here. Next\tone.\n\n\n  Second   paragraph\r\n", ["One line wraps here.", "Next one.",
                                                                  "Second paragraph"]),
    ("no capital. after this", ["no capital. after this"]),
    ("Ends with a period.", ["Ends with a period."]),
    ("  \n\n \t\n", []),
    ("", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize("unit", [".", ". ", "A. ", "e.g. ", " \t\n ", "\n \n", '."""', "a.B"])
def test_split_sentences_is_linear_on_degenerate_text(unit):
    start = time.perf_counter()
    split_sentences(unit * (4_000_000 // len(unit)))
    assert time.perf_counter() - start < 5


def test_document_rejects_empty_or_unstripped_sentences():
    assert doc("A.", "B.").text == "A. B."
    for bad in [("",), (" A.",), ("A. ",)]:
        with pytest.raises(ValueError, match="non-empty, stripped"):
            Document(bad)


# ------------------------------------------------------------------ held-out split


def test_split_heldout_keeps_both_splits_for_tiny_corpora():
    one, two = doc("Only one document here."), doc("And another one.")
    assert split_heldout([one], 0.02) == ((one,), ())
    train, heldout = split_heldout([one, two], 0.02)
    assert len(train) == len(heldout) == 1 and set(train + heldout) == {one, two}
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_heldout([one, two], 0.0)


# ------------------------------------------------------------------ pydocs


@pytest.fixture(scope="module")
def pydocs() -> PyDocsSource:
    return PyDocsSource()


def test_pydocs_corpus_is_large_with_disjoint_nonempty_splits(pydocs):
    train, heldout = pydocs.split("train"), pydocs.split("heldout")
    assert len(train) + len(heldout) > 500
    assert 0 < len(heldout) < len(train) / 10
    assert not {d.text for d in train} & {d.text for d in heldout}
    assert all(heldout_position(d) < 0.02 for d in heldout)
    assert all(heldout_position(d) >= 0.02 for d in train)
    assert pydocs.skipped["short"] > 0
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        pydocs.split("validation")


def test_pydocs_heldout_membership_depends_only_on_the_text(pydocs):
    documents = list(pydocs.split("train")) + list(pydocs.split("heldout"))
    heldout = set(pydocs.split("heldout"))
    for subset in (documents[::2], documents[1::3]):
        _, held = split_heldout(subset, 0.02)
        assert set(held) == heldout & set(subset)


def test_pydocs_is_deterministic_logged_once_and_imports_no_stdlib_module(pydocs, caplog):
    sources._pydocs_corpus.cache_clear()
    before = set(sys.modules)
    with caplog.at_level(logging.INFO, logger="pretrain.sources"):
        again, third = PyDocsSource(), PyDocsSource()
    assert set(sys.modules) - before <= {"pydoc_data", "pydoc_data.topics"}
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert again.split("train") == pydocs.split("train") == third.split("train")
    assert again.split("heldout") == pydocs.split("heldout")
    assert again.describe() == third.describe()
    assert len([r for r in caplog.records if "pydocs corpus" in r.getMessage()]) == 1
    assert again._corpus.seconds < 15


def test_pydocs_statistics_and_describe(pydocs):
    stats = pydocs.statistics("train", count_tokens=lambda s: len(s.split()))
    train = pydocs.split("train")
    assert stats == SourceStatistics(len(train), sum(len(d.sentences) for d in train),
                                     sum(len(s) for d in train for s in d.sentences),
                                     sum(len(s.split()) for d in train for s in d.sentences))
    assert pydocs.statistics("heldout", max_documents=3).documents == 3
    assert pydocs.statistics("train").tokens is None
    assert pydocs.describe().startswith(f"pydocs (Python {sys.version_info[0]}.{sys.version_info[1]} documentation")
    assert f"train {len(train):,} documents" in pydocs.describe()


# ------------------------------------------------------------------ text files


TXT = "First document. It has two sentences.\nA wrapped\nline ends it.\n\n\n\nSecond document! Short one?\n\nHi.\n"
TXT_DOCUMENTS = [doc("First document.", "It has two sentences.", "A wrapped line ends it."),
                 doc("Second document!", "Short one?")]


def test_txt_documents_are_separated_by_blank_lines(tmp_path, caplog):
    (tmp_path / "a.txt").write_text(TXT)
    with caplog.at_level(logging.WARNING):
        source = TextFileSource(tmp_path / "a.txt")
    assert all_documents(source) == collections.Counter(TXT_DOCUMENTS)
    assert source.skipped == {"short": 1}
    assert f"{tmp_path / 'a.txt'}:9: short" in caplog.text
    assert source.statistics("train").documents + source.statistics("heldout").documents == 2


def test_jsonl_with_a_custom_field(tmp_path):
    lines = [{"body": "Alpha document. Two sentences."}, {"body": "Beta\n\nparagraph two.", "text": "ignored"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    source = TextFileSource(tmp_path / "a.jsonl", text_field="body")
    assert all_documents(source) == collections.Counter([doc("Alpha document.", "Two sentences."),
                                                         doc("Beta", "paragraph two.")])
    assert source.skipped == {}


def test_glob_and_directory_read_sorted_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Document from b. It is long enough.\n")
    (tmp_path / "sub" / "a.txt").write_text("Document from sub a. Also long enough.\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "Document from c. Long enough too."}) + "\n")
    (tmp_path / "notes.md").write_text("Not read from a directory. It is markdown.\n")
    by_glob = TextFileSource(str(tmp_path / "*.txt"))
    assert by_glob.files == (tmp_path / "b.txt",)
    by_recursive_glob = TextFileSource(str(tmp_path / "**" / "*.txt"))
    assert by_recursive_glob.files == (tmp_path / "b.txt", tmp_path / "sub" / "a.txt")
    by_directory = TextFileSource(tmp_path, heldout_fraction=0.5)
    assert by_directory.files == (tmp_path / "b.txt", tmp_path / "c.jsonl", tmp_path / "sub" / "a.txt")
    assert sum(all_documents(by_directory).values()) == 3
    assert "3 files" in by_directory.describe()


def test_missing_paths_name_the_pattern(tmp_path):
    for pattern in [tmp_path / "missing.txt", str(tmp_path / "*.jsonl"), tmp_path]:
        with pytest.raises(FileNotFoundError, match=re.escape(f"no text files found for '{pattern}'")):
            TextFileSource(pattern)


def test_files_without_text_name_the_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match=f"no text in {tmp_path / 'blank.txt'}, {tmp_path / 'empty.txt'}"):
        TextFileSource(tmp_path)


def test_non_utf8_documents_are_skipped_with_file_line_and_offset(tmp_path, caplog):
    path = tmp_path / "mixed.txt"
    path.write_bytes("Good document. Stays in.\n\nBad document \xff here.\nSecond line.\n\nTail document. Also fine.\n"
                     .encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        source = TextFileSource(path)
    assert all_documents(source) == collections.Counter([doc("Good document.", "Stays in."),
                                                         doc("Tail document.", "Also fine.")])
    assert source.skipped == {"non_utf8": 1}
    assert f"{path}:3: non_utf8: document with bytes that are not UTF-8 at line 3, byte offset 39" in caplog.text


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfStarts with a mark. Then text.\n")
    assert all_documents(TextFileSource(tmp_path / "bom.txt")) == {doc("Starts with a mark.", "Then text."): 1}


def test_bad_jsonl_lines_are_skipped_counted_and_named(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps({"text": "Kept document. It is fine."}).encode(),
        b"{not json",
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps(["a list"]).encode(),
        b'{"text": "bad \xfe byte. Here."}',
        json.dumps({"text": "Tiny."}).encode(),
        b'{"text": "Unpaired \\ud800 surrogate. Not UTF-8."}',
    ]) + b"\n")
    with caplog.at_level(logging.WARNING):
        source = TextFileSource(path)
    assert all_documents(source) == {doc("Kept document.", "It is fine."): 1}
    assert source.skipped == {"not_json": 1, "missing_field": 2, "not_string": 1, "non_utf8": 2, "short": 1}
    for line, reason in [(2, "not_json"), (3, "missing_field"), (4, "not_string"), (5, "missing_field"),
                         (6, "non_utf8"), (7, "short"), (8, "non_utf8")]:
        assert f"{path}:{line}: {reason}" in caplog.text


def test_only_bad_lines_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"title": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=f"no usable documents in {path}: every document or line was skipped "
                                         r"\({'missing_field': 1, 'not_json': 1}\).*text_field='text'"):
        TextFileSource(path)


def test_warnings_stop_after_a_few_per_reason(tmp_path, caplog):
    (tmp_path / "bad.jsonl").write_text("not json\n" * 50 + '{"text": "One good line. Enough."}\n')
    with caplog.at_level(logging.WARNING):
        source = TextFileSource(tmp_path / "bad.jsonl")
    assert source.skipped == {"not_json": 50}
    assert len(caplog.records) == sources._WARNINGS_PER_REASON


def test_a_50mb_line_is_one_document(tmp_path):
    sentence = "This is sentence number one, e.g. with 3.14 in it. "
    count = 50_000_000 // len(sentence) + 1
    with open(tmp_path / "big.txt", "w") as f:
        f.write(sentence * count + "\n")
    start = time.perf_counter()
    source = TextFileSource(tmp_path / "big.txt")
    assert time.perf_counter() - start < 20
    (document,) = source.split("train")
    assert len(document.sentences) == count
    assert document.sentences[0] == document.sentences[-1] == sentence.strip()


# ------------------------------------------------------------------ TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return tfds_fixture.prepare(data_dir), data_dir


def test_tfds_reads_documents_back_exactly(tfds_dir):
    name, data_dir = tfds_dir
    source = TfdsSource(name, data_dir=data_dir)
    train = source.split("train")
    assert list(train) == [Document(tuple(split_sentences(t))) for t in tfds_fixture.TRAIN_TEXTS]
    assert train[1] == doc("Second document, e.g. with an abbreviation.", "Pi is 3.14 here!",
                           "A new paragraph follows.")
    assert train[-1] == doc("Ünïcödé text survives the round trip.", "Ça va?")
    assert list(source.split("heldout")) == [doc("A held-out document.", "Nothing else."), Document(())]
    with pytest.raises(IndexError):
        train[3]
    assert source.statistics("heldout") == SourceStatistics(2, 2, 33)
    assert source.describe() == (f"tfds '{name}' from '{data_dir}', feature 'text': train 'train' 3 documents, "
                                 f"heldout 'validation' 2 documents")
    assert pickle.loads(pickle.dumps(train))[0] == train[0]
    assert grain.MapDataset.source(train)[2] == train[2]
    assert "tensorflow" not in sys.modules


def test_tfds_split_slices(tfds_dir):
    name, data_dir = tfds_dir
    source = make_source("tfds", name=name, data_dir=str(data_dir),
                         splits={"train": "train[1:]", "heldout": "train[:1]"})
    assert list(source.split("heldout")) == [doc("The first training document.", "It has two sentences.")]
    assert len(source.split("train")) == 2


def test_tfds_errors_say_what_to_do(tfds_dir, tmp_path):
    name, data_dir = tfds_dir
    with pytest.raises(FileNotFoundError, match=f"'no_such_dataset' is not prepared as ArrayRecord in data_dir "
                                                f"'{tmp_path}'.*download_and_prepare.*copy DIR here"):
        TfdsSource("no_such_dataset", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"data_dir '{tmp_path / 'nowhere'}' for dataset 'lm1b' does "
                                                f"not exist.*tfds build lm1b --file_format=array_record"):
        TfdsSource("lm1b", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"'lm1b' is not prepared as ArrayRecord in data_dir '{tmp_path}'"):
        TfdsSource("lm1b", data_dir=tmp_path)  # registered with TFDS, but nothing prepared here
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"no feature 'body'; its features are \['text', 'title'\]"):
        TfdsSource(name, data_dir=data_dir, text_feature="body")
    with pytest.raises(ValueError, match="split 'validaton' cannot be read"):
        TfdsSource(name, data_dir=data_dir, splits={"heldout": "validaton"})
    with pytest.raises(ValueError, match="must map exactly"):
        TfdsSource(name, data_dir=data_dir, splits={"test": "validation"})
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------ factory


def test_make_source(tmp_path, pydocs):
    assert make_source().split("train") == pydocs.split("train")
    (tmp_path / "a.txt").write_text(TXT)
    assert all_documents(make_source("files", pattern=tmp_path / "a.txt")) == collections.Counter(TXT_DOCUMENTS)
    with pytest.raises(ValueError, match="unknown source kind 'web'; kinds are files, pydocs, tfds"):
        make_source("web")
    with pytest.raises(TypeError, match=r"source kind 'files' takes \(pattern: .*unexpected keyword argument 'path'"):
        make_source("files", pattern="x", path="x")
