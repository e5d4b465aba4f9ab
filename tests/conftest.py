"""Eight simulated CPU devices for the sharding tests, set before JAX starts its backend;
a cache directory of the session's own, so no test reads or writes the user's
(`pretrain.metrics.peak_cache_path`: the machine's measured MFU peak); and a tiny
word-level tokenizer for the task-encoding tests."""

import jax
import pytest
import sentencepiece as spm

from pretrain.metrics import CACHE_DIR_ENV
from pretrain.tokenizer import load_tokenizer

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="session")
def _session_cache_directory(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # os.environ: subprocesses of the tests inherit it
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A tiny SentencePiece model trained on a fixed text (independent of the Python version)."""
    directory = tmp_path_factory.mktemp("words")
    text = ["Call os.path.join on the parts, then open the file now.", "The join of two paths is a path.",
            "Every module has a name; some have docstrings, quick or verbose.", "Zip, map and filter take functions!",
            "Keys, values and items: 0123456789 (x) [y] {z} <w> - + * / = ~ ^ % $ # @ ` ' \" | \\ ?"] * 40
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(directory / "sp"), vocab_size=100,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]",
                                   bos_piece="[BOS]", eos_piece="[EOS]", control_symbols=["[CLS]", "[SEP]", "[MASK]"],
                                   minloglevel=2, num_threads=1)
    return load_tokenizer(directory / "sp.model")
