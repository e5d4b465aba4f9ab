"""Config to batches on every source: pydocs, text files and a locally prepared TFDS set."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import tfds_fixture
from configs.pretrain import get_config
from pretrain import input_pipeline, sources
from pretrain.loss import batch_loss
from pretrain.model import TransformerConfig, create_model


def small_config(objective="mlm:1,clm:1,mass:1,unilm:1", **data):
    config = get_config(f"objective={objective},size=tiny")
    config.seq_len, config.batch_size = 64, 4
    config.tokenizer.vocab_size, config.tokenizer.sentinels = 400, 16
    for key, value in data.items():
        config.data[key] = value
    return config


def check_batches(pipeline, config, count=3):
    batches = input_pipeline.take(pipeline.train, count)
    for batch in batches:
        assert batch["inputs"].shape == (config.batch_size, config.seq_len)
        assert batch["inputs"].max() < config.tokenizer.vocab_size
        assert batch["weights"].sum() > 0
    evaluation = pipeline.eval_batches()
    assert evaluation and all(b["inputs"].shape == (config.batch_size, config.seq_len) for b in evaluation)
    return batches


def test_pydocs_end_to_end_and_tokenizer_reuse(tmp_path):
    config = small_config()
    pipeline = input_pipeline.build_input_pipeline(config, tmp_path)
    assert (tmp_path / "tokenizer.model").exists()
    assert pipeline.mixture.names[:3] == ("mlm", "clm", "mass")
    first = check_batches(pipeline, config)
    stamp = (tmp_path / "tokenizer.model").stat().st_mtime_ns
    again = input_pipeline.build_input_pipeline(config, tmp_path)  # a resumed run
    assert (tmp_path / "tokenizer.model").stat().st_mtime_ns == stamp
    for x, y in zip(first, input_pipeline.take(again.train, 3)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    # Decoding a CLM target row gives back real documentation text.
    text = pipeline.tokenizer.decode(first[0]["targets"][0][first[0]["segment_ids"][0] > 0])
    assert len(text) > 20


def test_text_files_end_to_end(tmp_path):
    documents = sources.PyDocsSource().split("train")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):
        texts = ["\n".join(documents[i].sentences) for i in range(part * 150, part * 150 + 150)]
        (corpus / f"part{part}.txt").write_text("\n\n".join(texts), encoding="utf-8")
    config = small_config("mlm", kind="files", path=str(corpus / "*.txt"))
    pipeline = input_pipeline.build_input_pipeline(config, tmp_path / "run")
    assert len(pipeline.source.split("train")) > 250
    check_batches(pipeline, config)


def test_tfds_end_to_end(tmp_path):
    documents = sources.PyDocsSource().split("train")
    texts = [" ".join(documents[i].sentences) for i in range(300)]
    name = tfds_fixture.prepare(tmp_path / "tfds", train_texts=texts[:280], validation_texts=texts[280:])
    config = small_config("clm", kind="tfds", tfds_name=name, tfds_data_dir=str(tmp_path / "tfds"))
    pipeline = input_pipeline.build_input_pipeline(config, tmp_path / "run")
    assert len(pipeline.source.split("train")) == 280
    assert len(pipeline.source.split("heldout")) == 20
    batches = check_batches(pipeline, config, count=4)
    # ... and a tiny model trains from it: the loss on these batches falls.
    model = create_model(TransformerConfig(**config.model, vocab_size=pipeline.tokenizer.vocab_size))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss_fn = lambda p: batch_loss(nnx.merge(graphdef, p, rest), batch, 1)[0]  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(10):
        for batch in batches:
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


@pytest.mark.parametrize("field, value, message", [
    ("kind", "s3", r"config.data.kind='s3' must be one of \('pydocs', 'files', 'tfds'\)"),
    ("path", "", "config.data.path is empty but config.data.kind='files'; set it to a .txt/.jsonl file"),
])
def test_config_errors_name_the_field(tmp_path, field, value, message):
    config = small_config(kind="files", path="x")
    config.data[field] = value
    with pytest.raises(ValueError, match=message):
        input_pipeline.build_input_pipeline(config, tmp_path)


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
    config = small_config(kind="tfds", tfds_name="lm1b", tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lm1b"):
        input_pipeline.build_input_pipeline(config, tmp_path / "run")
