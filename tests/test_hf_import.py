"""A Hugging Face checkpoint's own tokenizer behind this project's interface: a WordPiece
(BERT) and a byte-level BPE (GPT-2) tokenizer trained here on pydocs sentences, saved
with `transformers`, read back with `pretrain.hf.imported_tokenizer` (nothing is
downloaded)."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

import objectives  # noqa: E402
from objectives.example import TextChunk  # noqa: E402
from pretrain.hf.imported_tokenizer import ImportedTokenizer  # noqa: E402
from pretrain.sources import make_source  # noqa: E402


def pydocs_sentences(count: int, split: str = "train") -> list[str]:
    documents = make_source("pydocs").split(split)
    found = []
    for index in range(len(documents)):
        found.extend(documents[index].sentences)
        if len(found) >= count:
            break
    return found[:count]


@pytest.fixture(scope="module")
def saved_tokenizers(tmp_path_factory):
    """{'bert': dir, 'gpt2': dir}: tokenizers trained here and saved by transformers."""
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("hf_tokenizers")
    text = pydocs_sentences(3000)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(text, vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    bert = transformers.BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]",
                                          sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                          mask_token="[MASK]")
    bert.save_pretrained(root / "bert")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=600, special_tokens=["<|endoftext|>"])
    gpt2 = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                          eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    gpt2.save_pretrained(root / "gpt2")
    return {"bert": root / "bert", "gpt2": root / "gpt2"}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_ids_are_the_transformers_tokenizers_own(saved_tokenizers, kind):
    ours = ImportedTokenizer(saved_tokenizers[kind] / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(saved_tokenizers[kind])
    assert ours.vocab_size == len(theirs)
    for text in pydocs_sentences(100, "heldout"):
        ids = ours.encode(text)
        assert ids.tolist() == theirs(text, add_special_tokens=False)["input_ids"], text
    batch = pydocs_sentences(5, "heldout")
    assert [ids.tolist() for ids in ours.encode_batch(batch)] == [ours.encode(t).tolist() for t in batch]


def test_bert_roles_follow_unilm_and_its_objectives_build(saved_tokenizers):
    tokenizer = ImportedTokenizer(saved_tokenizers["bert"] / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(saved_tokenizers["bert"])
    vocab = tokenizer.vocabulary()
    assert (vocab.cls, vocab.sep, vocab.mask, vocab.pad) == (theirs.cls_token_id, theirs.sep_token_id,
                                                             theirs.mask_token_id, theirs.pad_token_id)
    assert (vocab.bos, vocab.eos) == (vocab.cls, vocab.sep)  # UniLM's [SOS] / [EOS] on BERT
    assert vocab.word_start[theirs.convert_tokens_to_ids("the")] and not any(
        vocab.word_start[i] for i, piece in enumerate(tokenizer._pieces) if piece.startswith("##"))
    text = tokenizer.encode(pydocs_sentences(1, "heldout")[0])
    mixture = objectives.build_mixture("unilm", vocab)
    rng = np.random.default_rng(0)
    for leaf in mixture.objectives:
        example = leaf(TextChunk(text, [0, len(text) // 2], text[::-1].copy()), rng)
        assert example.inputs[0] == vocab.cls  # [SOS] is BERT's [CLS]
        assert not np.isin(example.inputs, [theirs.unk_token_id]).any() or np.isin(text, [theirs.unk_token_id]).any()


def test_a_gpt2_vocabulary_refuses_objectives_that_need_a_missing_token(saved_tokenizers):
    vocab = ImportedTokenizer(saved_tokenizers["gpt2"] / "tokenizer.json").vocabulary()
    end = transformers.AutoTokenizer.from_pretrained(saved_tokenizers["gpt2"]).eos_token_id
    assert vocab.bos == vocab.eos == vocab.pad == end
    objectives.build_mixture("clm", vocab)  # needs only [BOS] and [EOS]
    with pytest.raises(ValueError, match=r"the tokenizer has no \[CLS\] token and objective 'mlm' needs it"):
        objectives.build_mixture("mlm", vocab)
    with pytest.raises(ValueError, match=r"the tokenizer has no \[MASK\] token and objective 'unilm/"):
        objectives.build_mixture("unilm", vocab)


def test_continued_pretraining_from_an_imported_bert(saved_tokenizers, tmp_path):
    """UniLM's recipe on a tiny BERT built here: `--config.init.hf` takes the model's
    weights, shape and own WordPiece tokenizer, and grows its two token types to UniLM's six. Before any step, the MLM loss of this
    project on a masked batch equals `transformers`' loss on the same batch; 30 steps of
    UniLM lower the training loss; the run resumes, evaluates and exports as any other."""
    import jax
    import shutil
    import torch
    from flax import nnx

    from pretrain.loss import batch_loss
    from pretrain.packing import pack
    from pretrain.train import Trainer
    from train_helpers import read_metrics, tiny_config

    directory = tmp_path / "bert"
    shutil.copytree(saved_tokenizers["bert"], directory)
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=600, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=128, type_vocab_size=2)
    reference = transformers.BertForMaskedLM(hf_config).eval()
    reference.save_pretrained(directory)
    config = tiny_config("unilm", total_steps=30, log_every=10, checkpoint_every=30, peak_flops_per_device=1e12,
                         **{"init.hf": str(directory), "optimizer.warmup_steps": 5})
    given = config.to_dict()
    trainer = Trainer(config, str(tmp_path / "run"))
    assert config.to_dict() == given  # the run resolves a copy: the imported shape is the run's, not the caller's
    resolved = trainer.config
    assert resolved.model.model_dim == 64 and not resolved.model.pre_layer_norm
    model = nnx.merge(trainer.program.graphdef, jax.device_get(trainer.strategy.unreplicate(trainer.state["params"])), trainer.program.rest)
    # BERT's two token types grown to UniLM's six, as UniLM's code does: 2, 3, 4 from type 0; 5 from type 1
    types = np.asarray(model.type_embedding[...])
    bert_types = reference.bert.embeddings.token_type_embeddings.weight.detach().numpy()
    assert resolved.model.num_token_types == 6 and np.array_equal(types[:2], bert_types)
    assert all(np.array_equal(types[row], bert_types[source]) for row, source in ((2, 0), (3, 0), (4, 0), (5, 1)))

    vocab = trainer.program.pipeline.tokenizer.vocabulary()
    text = trainer.program.pipeline.tokenizer.encode(" ".join(pydocs_sentences(6, "heldout")))[:60]
    example = objectives.build_mixture("mlm", vocab).objectives[0](TextChunk(text), np.random.default_rng(3))
    row = pack([example], len(example))
    ours, _ = batch_loss(model, {k: jax.numpy.asarray(v) for k, v in row.items()}, 1)
    labels = np.where(example.weights > 0, example.targets, -100).astype(np.int64)
    with torch.no_grad():
        theirs = reference(torch.tensor(np.int64([example.inputs])),
                           token_type_ids=torch.tensor(np.int64([example.token_types])),
                           labels=torch.tensor([labels])).loss.item()
    print(f"step-0 MLM loss on {int(example.weights.sum())} masked tokens: ours {float(ours):.6f}, "
          f"transformers {theirs:.6f}")
    assert abs(float(ours) - theirs) <= 1e-5

    trainer.run()
    losses = [line["loss"] for line in read_metrics(tmp_path / "run") if "loss" in line]
    print(f"UniLM on the imported BERT, training loss at steps 10/20/30: {losses}")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "run" / "tokenizer.json").is_file() and not (tmp_path / "run" / "tokenizer.model").exists()
    again = Trainer(config, str(tmp_path / "run"))  # a resume keeps the run's own tokenizer and finds it complete
    assert again.run() == 30
    from pretrain import export
    from pretrain.inference import load_trained

    export.export_run(str(tmp_path / "run"), str(tmp_path / "out"))  # and back out, with its own tokenizer
    exported = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    tokens = tokenizer(pydocs_sentences(1, "heldout")[0])["input_ids"]
    trained = load_trained(tmp_path / "run")
    n = len(tokens)
    row = {"inputs": [tokens], "positions": [list(range(n))], "token_types": [[0] * n], "segment_ids": [[1] * n],
           "attention_kind": [[0] * n]}
    ours = np.asarray(trained.model.logits(trained.model({k: jax.numpy.asarray(v) for k, v in row.items()})))[0]
    with torch.no_grad():
        theirs = exported(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    # ... and fine-tunes as any pretraining run (its own tokenizer comes along)
    from pretrain.transfer import trainer as transfer
    from test_finetune import config_for

    summary = transfer.run_seeds(config_for(str(tmp_path / "run")), tmp_path / "finetune")
    assert np.isfinite(summary["test"]["loss"]["mean"])


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_hugging_face_directory_fine_tunes_directly(saved_tokenizers, tmp_path, kind):
    """`pretrain.finetune --config.init=<HF dir>`: the body is the model's own (weights
    bit for bit), its tokenizer comes along, and its class sets the layout (BERT:
    `[CLS] text [SEP]`; GPT-2: `<|endoftext|> text <|endoftext|>`, `<|endoftext|>`
    standing in for the [CLS]/[SEP] it lacks; both mean-pooled by default)."""
    import shutil
    import torch

    from pretrain.hf.models import flat_params
    from pretrain.transfer import trainer as transfer
    from test_finetune import config_for

    directory = tmp_path / kind
    shutil.copytree(saved_tokenizers[kind], directory)
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, type_vocab_size=2))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=600, n_embd=32, n_layer=2, n_head=2,
                                                                     n_positions=128))
    model.save_pretrained(directory)
    bodies, tokenizer = transfer.load_bodies(config_for(str(directory)))
    (body,) = bodies
    assert (body.layout, body.pooling, body.pretrained) == (("bidirectional", "mean") if kind == "bert"
                                                            else ("causal", "mean")) + (True,)
    from pretrain.hf import convert
    from safetensors.numpy import load_file
    saved = load_file(directory / "model.safetensors")
    assert all(np.array_equal(value, saved[key]) for key, value in
               convert.to_hf(flat_params(body.model), "gpt2" if kind == "gpt2" else "bert").items())
    summary = transfer.run_seeds(config_for(str(directory)), tmp_path / "finetune")
    assert np.isfinite(summary["test"]["loss"]["mean"])


def test_an_embedding_the_tokenizer_does_not_fill_is_refused(saved_tokenizers, tmp_path):
    import shutil

    from pretrain.hf.models import hf_directory_problems

    shutil.copytree(saved_tokenizers["gpt2"], tmp_path / "gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=640, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=32)).save_pretrained(tmp_path / "gpt2")
    assert hf_directory_problems(str(tmp_path / "gpt2")) == [
        f"config.init.hf={str(tmp_path / 'gpt2')!r}: its model embeds 640 tokens and its tokenizer.json has 600; "
        "this project sizes the embedding by the tokenizer, so give a directory where they agree"]
