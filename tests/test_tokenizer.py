"""SentencePiece tokenizer: fixed special ids, lossless round trips, determinism, reuse
on resume, and one clear message for each kind of bad model or bad training request."""

from __future__ import annotations

import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from objectives.vocab import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS
from pretrain.tokenizer import (MODEL_FILENAME, WORD_BOUNDARY, Tokenizer, ensure_tokenizer,
                                load_tokenizer, train_tokenizer)

NOUNS = ("model tokenizer corpus engineer batch layer optimizer researcher dataset program "
         "sentence document gradient vocabulary machine network teacher student library "
         "garden river mountain window kitchen market village harbor station museum "
         "letter story answer question picture number weather morning evening journey").split()
VERBS = ("reads writes trains predicts masks packs encodes decodes shuffles measures "
         "compares learns builds carries follows watches opens closes finds keeps").split()
ADJECTIVES = ("long short rare common small large quiet bright careful sudden "
              "ancient modern gentle heavy simple strange useful early").split()
ENDINGS = ("quickly|slowly|carefully|again|today|in parallel|without errors|"
           "on one machine|before lunch|twice|after the storm|near the river").split("|")
VOCAB_SIZE = 400  # the corpus below supports up to 544 (unigram)


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    """English-like sentences, the same on every machine."""
    rng = random.Random(seed)
    return [
        " ".join([rng.choice(("The", "A", "Every", "Our", "This")), rng.choice(ADJECTIVES),
                  rng.choice(NOUNS), rng.choice(VERBS), rng.choice(("the", "a", "some")),
                  rng.choice(ADJECTIVES), rng.choice(NOUNS)])
        + f" {rng.choice(ENDINGS)}, {rng.randint(1, 999)} times."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(corpus(), tmp_path_factory.mktemp("tok") / "sp", VOCAB_SIZE)


def spm_model(path, **flags) -> str:
    """A model trained by plain SentencePiece with `flags` (no project defaults)."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(path),
                                   vocab_size=120, minloglevel=2, **flags)
    return f"{path}.model"


def trainer_spec(model_path) -> sentencepiece_model_pb2.TrainerSpec:
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto.trainer_spec


def test_special_tokens_have_the_fixed_ids(tokenizer):
    assert [tokenizer.piece(i) for i in range(7)] == [
        "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]
    assert {tokenizer.piece(i): i for i in range(7)} == SPECIAL_TOKENS
    assert tokenizer.vocab_size == VOCAB_SIZE
    # control symbols: raw text naming them is spelled out, never encoded to them
    ids = tokenizer.encode("[PAD] [UNK] [BOS] [EOS] [CLS] [SEP] [MASK]")
    assert ids.min() >= 7
    assert tokenizer.decode(ids) == "[PAD] [UNK] [BOS] [EOS] [CLS] [SEP] [MASK]"


@pytest.mark.parametrize("text", [
    "The modern model reads the rare corpus quickly, 7 times.",
    "  leading, double  and trailing spaces  ",
    "café, naïve, Øre, straße",
    "日本語のテキスト",
    "emoji 🙂 and 🚀🚀",
    "tab\tand\nnewline",
    "fullwidth ＡＢＣ and ligature ﬁ stay as written",
    "",
])
def test_decode_of_encode_is_the_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert not np.isin(ids, list(SPECIAL_TOKENS.values())).any()  # byte fallback: no [UNK]
    assert tokenizer.decode(ids) == text


def test_rare_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("日")
    assert [tokenizer.piece(i) for i in ids if tokenizer.piece(i) != WORD_BOUNDARY] == [
        "<0xE6>", "<0x97>", "<0xA5>"]


def test_encode_batch_matches_encode(tokenizer):
    texts = ["The quiet river", "", "🙂 twice"]
    batch = tokenizer.encode_batch(texts)
    assert len(batch) == 3
    for ids, text in zip(batch, texts):
        np.testing.assert_array_equal(ids, tokenizer.encode(text))
        assert ids.dtype == np.int32
    assert tokenizer.encode_batch([]) == []


def test_decode_drops_special_ids(tokenizer):
    ids = tokenizer.encode("the river")
    framed = [BOS_ID, *ids[:1], MASK_ID, *ids[1:], EOS_ID, PAD_ID, PAD_ID]
    assert tokenizer.decode(np.array(framed)) == "the river"
    with pytest.raises(ValueError, match=f"token id {VOCAB_SIZE} is out of range"):
        tokenizer.decode([5, VOCAB_SIZE])


def test_word_start_table_matches_pieces(tokenizer):
    vocab = tokenizer.vocabulary()
    pieces = [tokenizer.piece(i) for i in range(tokenizer.vocab_size)]
    expected = [i >= 7 and p.startswith(WORD_BOUNDARY) for i, p in enumerate(pieces)]
    assert vocab.size == VOCAB_SIZE
    np.testing.assert_array_equal(vocab.word_start, expected)
    assert vocab.word_start[tokenizer.encode(" river")[0]]  # this corpus has '▁river'
    assert "▁river" in pieces and not vocab.word_start[pieces.index("<0xE6>")]
    assert vocab.extra_special_ids == ()


def test_tokenizer_pickles(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.path == tokenizer.path
    np.testing.assert_array_equal(copy.encode("Our museum"), tokenizer.encode("Our museum"))


def test_training_is_deterministic_and_writes_only_the_two_files(tmp_path):
    first = train_tokenizer(corpus(), tmp_path / "a" / "sp", VOCAB_SIZE)
    train_tokenizer(corpus(), tmp_path / "b" / "other_name", VOCAB_SIZE)
    assert first.path == str(tmp_path / "a" / "sp.model")
    for a, b in [("a/sp.model", "b/other_name.model"), ("a/sp.vocab", "b/other_name.vocab")]:
        assert (tmp_path / a).read_bytes() == (tmp_path / b).read_bytes()
    assert sorted(os.listdir(tmp_path / "a")) == ["sp.model", "sp.vocab"]
    vocab_lines = (tmp_path / "a" / "sp.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == VOCAB_SIZE and vocab_lines[6] == "[MASK]\t0"


def test_training_in_another_process_gives_the_same_bytes(tmp_path):
    # SentencePiece's own sampler reseeds per process; ours must not.
    script = ("import sys; sys.path[:0] = sys.argv[1:3]; from test_tokenizer import corpus; "
              "from pretrain.tokenizer import train_tokenizer; "
              "train_tokenizer(corpus(), sys.argv[3], 340, max_sentences=300, seed=3)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script, os.path.join(root, "tests"), root,
                    str(tmp_path / "child")], check=True)
    here = train_tokenizer(corpus(), tmp_path / "here", 340, max_sentences=300, seed=3)
    assert (tmp_path / "child.model").read_bytes() == open(here.path, "rb").read()


def test_sampling_is_a_function_of_the_seed(tmp_path):
    def model(name, seed):
        train_tokenizer(corpus(), tmp_path / name, 340, max_sentences=200, seed=seed)
        return (tmp_path / f"{name}.model").read_bytes()

    assert model("s1", seed=1) == model("s1_again", seed=1)
    assert model("s1", seed=1) != model("s2", seed=2)


def test_bpe(tmp_path):
    bpe = train_tokenizer(corpus(), tmp_path / "bpe", VOCAB_SIZE, model_type="bpe")
    assert trainer_spec(bpe.path).model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert trainer_spec(bpe.path).num_threads == 1
    assert [bpe.piece(i) for i in range(7)] == list(SPECIAL_TOKENS)
    text = "A bright harbor opens 🚀 near the river, 12 times."
    assert bpe.decode(bpe.encode(text)) == text
    with pytest.raises(ValueError, match=r"config.tokenizer.model_type='wordpiece' must be one of \('unigram', 'bpe'\)"):
        train_tokenizer(corpus(), tmp_path / "wp", VOCAB_SIZE, model_type="wordpiece")


def test_a_long_line_is_split_not_dropped(tmp_path):
    # SentencePiece alone drops a line over max_sentence_length, so '▁zyxwv' would be unseen.
    tokenizer = train_tokenizer(corpus() + ["zyxwv " * 30_000], tmp_path / "sp", VOCAB_SIZE)
    assert "▁zyxwv" in {tokenizer.piece(i) for i in range(VOCAB_SIZE)}


def test_ensure_tokenizer_trains_once_then_reuses(tmp_path):
    calls = []

    def sentences():
        calls.append(1)
        return corpus()

    def no_training():
        raise AssertionError("the tokenizer was retrained")

    first = ensure_tokenizer(tmp_path / "run", sentences, VOCAB_SIZE, "unigram")
    model = tmp_path / "run" / MODEL_FILENAME
    assert first.path == str(model) and calls == [1]
    assert sorted(os.listdir(tmp_path / "run")) == ["tokenizer.model", "tokenizer.vocab"]
    before = os.stat(model)
    second = ensure_tokenizer(tmp_path / "run", no_training, VOCAB_SIZE, "unigram")
    after = os.stat(model)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    np.testing.assert_array_equal(second.encode("Our museum"), first.encode("Our museum"))
    with pytest.raises(ValueError, match=r"has 400 tokens but tokenizer\.vocab_size is 500"):
        ensure_tokenizer(tmp_path / "run", no_training, 500, "unigram")


def test_ensure_tokenizer_copies_a_user_model_into_the_workdir(tmp_path):
    user = train_tokenizer(corpus(), tmp_path / "user" / "mine", VOCAB_SIZE)

    def no_training():
        raise AssertionError("a user model must not be retrained")

    got = ensure_tokenizer(tmp_path / "run", no_training, 1000, "bpe", user_model_path=user.path)
    model = tmp_path / "run" / MODEL_FILENAME
    assert got.path == str(model)
    assert model.read_bytes() == (tmp_path / "user" / "mine.model").read_bytes()
    before = os.stat(model)
    ensure_tokenizer(tmp_path / "run", no_training, 1000, "bpe", user_model_path=user.path)
    assert os.stat(model).st_mtime_ns == before.st_mtime_ns
    other = train_tokenizer(corpus(seed=1), tmp_path / "user" / "other", VOCAB_SIZE)
    with pytest.raises(ValueError, match=r"differs from the given tokenizer .*other\.model"):
        ensure_tokenizer(tmp_path / "run", no_training, 1000, "bpe", user_model_path=other.path)


def test_default_sentencepiece_model_is_rejected_naming_the_tokens(tmp_path):
    path = spm_model(tmp_path / "default")  # <unk>=0, <s>=1, </s>=2, no pad
    with pytest.raises(ValueError, match=re.escape(
            "[PAD] is missing: not found at any id (expected at id 0, which holds '<unk>')")) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert path in message
    for name in ["[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]:
        assert f"{name} is missing" in message
    assert "train_tokenizer" in message
    assert "--pad_id=0 --unk_id=1" in message and "--control_symbols=[CLS],[SEP],[MASK]" in message


def test_special_token_at_the_wrong_id_is_rejected(tmp_path):
    path = spm_model(tmp_path / "order", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                     pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[BOS]",
                     eos_piece="[EOS]", control_symbols=["[MASK]", "[CLS]", "[SEP]"])
    with pytest.raises(ValueError, match=r"\[MASK\] is at id 4, expected id 6") as e:
        load_tokenizer(path)
    assert r"[CLS] is at id 5, expected id 4" in str(e.value)
    assert "[PAD]" not in str(e.value).split("\n")[1]  # only the misplaced tokens listed


def test_user_defined_special_tokens_are_rejected(tmp_path):
    path = spm_model(tmp_path / "user_defined", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                     pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[BOS]",
                     eos_piece="[EOS]", user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"])
    with pytest.raises(ValueError, match=r"\[CLS\] is at id 4 but is not a control symbol"):
        load_tokenizer(path)


def test_a_file_that_is_not_a_model_is_rejected_naming_it(tmp_path, tokenizer):
    text = tmp_path / "notes.model"
    text.write_text("this is not a model\n")
    with pytest.raises(ValueError, match=re.escape(f"{text} is not a SentencePiece model")):
        load_tokenizer(text)
    vocab_file = tokenizer.path.replace(".model", ".vocab")
    with pytest.raises(ValueError, match=re.escape(f"{vocab_file} is not a SentencePiece model")):
        load_tokenizer(vocab_file)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{empty} is not a SentencePiece model")):
        load_tokenizer(empty)


def test_a_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} does not exist")):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} does not exist")):
        ensure_tokenizer(tmp_path / "run", corpus, VOCAB_SIZE, user_model_path=missing)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_a_vocab_size_the_corpus_cannot_support(tmp_path, model_type):
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=50000 is more than the "
                       r"training text supports \(at most (\d+) pieces\): lower "
                       r"tokenizer\.vocab_size or train on more text") as e:
        train_tokenizer(corpus(), tmp_path / "sp", 50_000, model_type)
    assert os.listdir(tmp_path) == []  # nothing half-written
    limit = int(re.search(r"at most (\d+)", str(e.value))[1])
    assert train_tokenizer(corpus(), tmp_path / "sp", limit, model_type).vocab_size == limit


def test_vocab_sizes_too_small(tmp_path):
    for size in [0, 7]:
        with pytest.raises(ValueError, match=rf"config.tokenizer.vocab_size={size} is too small: it must exceed "
                           r"266 \(10 special tokens and 256 byte pieces\); raise it"):
            train_tokenizer(corpus(), tmp_path / "sp", size)
    with pytest.raises(ValueError, match=r"vocab_size=7 is too small: it must exceed 10 \(10 special tokens\)"):
        train_tokenizer(corpus(), tmp_path / "sp", 7, byte_fallback=False)
    with pytest.raises(ValueError, match=r"vocab_size=270 is too small for the training text: "
                       r"its characters .* need at least (\d+) ids"):
        train_tokenizer(corpus(), tmp_path / "sp", 270)
    assert os.listdir(tmp_path) == []


def test_without_byte_fallback_unknown_characters_are_unk(tmp_path):
    tokenizer = train_tokenizer(corpus(), tmp_path / "sp", 120, byte_fallback=False)
    assert 1 in tokenizer.encode("日本").tolist()


@pytest.mark.parametrize("sentences", [[], ["", "   ", "\n"]])
def test_an_empty_corpus_is_named(tmp_path, sentences):
    with pytest.raises(ValueError, match="no text to train the tokenizer on"):
        train_tokenizer(iter(sentences), tmp_path / "sp", VOCAB_SIZE)
    with pytest.raises(ValueError, match="no text to train the tokenizer on"):
        ensure_tokenizer(tmp_path / "run", lambda: iter(sentences), VOCAB_SIZE)
    assert os.listdir(tmp_path / "run") == []

