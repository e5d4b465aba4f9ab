"""Export to Hugging Face `transformers`, verified numerically against `transformers`
itself: tiny runs trained here, exported, loaded with `from_pretrained` and compared
logit for logit on real sentences (float32). Needs the `hf` extra (torch CPU build,
transformers); CI installs it."""

from __future__ import annotations

import json
import os
import re
import stat

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (pip install -e '.[hf]') is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

from objectives.example import L2R, PREFIX  # noqa: E402
from pretrain import export  # noqa: E402
from pretrain.hf import convert  # noqa: E402
from pretrain.inference import load_trained  # noqa: E402
from pretrain.sources import make_source  # noqa: E402
from pretrain.train import Trainer  # noqa: E402
from train_helpers import tiny_config, tokenizer_file, workdir_with  # noqa: E402,F401 (tokenizer_file: a fixture)

# The logits of the same float32 model computed by two frameworks agree to rounding: the
# bound holds for every logit of every sentence (measured max: see the README, Interop).
LOGIT_TOLERANCE = 1e-4
SHAPES = {"tiny": {}, "wider": {"model.num_layers": 3, "model.model_dim": 96, "model.num_heads": 3,
                                "model.mlp_dim": 192}}
BERT = {"model.pre_layer_norm": False, "model.mlm_transform_head": True, "objectives.mlm.nsp": True,
        "model.num_token_types": 2, "model.gelu": "exact",
        "model.layer_norm_epsilon": 1e-12, "model.output_bias": True}


def sentences(count: int) -> list[str]:
    """Real held-out sentences of the built-in corpus (pydocs)."""
    held_out = make_source("pydocs").split("heldout")
    found = []
    for index in range(len(held_out)):
        found.extend(s for s in held_out[index].sentences if 3 < len(s) < 300)
        if len(found) >= count:
            return found[:count]
    return found


def trained_run(tmp_path, tokenizer_file, objective: str, overrides: dict, steps: int = 6):
    """A tiny run of `steps` steps with checkpoints half way and at the end."""
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    Trainer(tiny_config(objective, total_steps=steps, checkpoint_every=steps // 2, log_every=steps,
                        peak_flops_per_device=1e12, **overrides), str(workdir)).run()
    return workdir


def project_outputs(workdir, rows: list[dict], trained=None) -> list[np.ndarray]:
    """(logits, hidden states) of each row under the run's newest checkpoint."""
    trained = trained or load_trained(workdir)
    out = []
    for row in rows:
        batch = {name: jnp.asarray(np.asarray(values, np.int32)[None]) for name, values in row.items()}
        hidden = trained.model(batch)
        out.append((np.asarray(trained.model.logits(hidden))[0], np.asarray(hidden)[0]))
    return out, trained


@pytest.mark.parametrize("shape", ["tiny"])  # both shapes of both architectures: the import test below
def test_a_pre_ln_causal_run_is_gpt2_with_the_same_logits(tmp_path, tokenizer_file, shape):
    """The default model (the README's quick start) exports as it is; every file the
    export writes has the mode the umask gives (0644 under umask 022), like any file."""
    workdir = trained_run(tmp_path, tokenizer_file, "clm", SHAPES[shape])
    umask = os.umask(0o022)
    try:
        print(export.export_run(str(workdir), str(tmp_path / "hf")))
    finally:
        os.umask(umask)
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "hf").iterdir()} == {
        name: 0o644 for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "GPT2LMHeadModel"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = sentences(8)
    rows, encoded = [], []
    for text in texts:
        ids = tokenizer(text)["input_ids"]  # the export's template: [BOS] text
        n = len(ids)
        rows.append({"inputs": ids, "positions": range(n), "token_types": [0] * n, "segment_ids": [1] * n,
                     "attention_kind": [L2R] * n})
        encoded.append(ids)
    ours, trained = project_outputs(workdir, rows)
    assert all(ids[0] == trained.tokenizer.vocabulary().bos for ids in encoded)
    worst = 0.0
    with torch.no_grad():
        for ids, (logits, _) in zip(encoded, ours):
            theirs = model(torch.tensor([ids])).logits[0].numpy()
            worst = max(worst, float(np.abs(theirs - logits).max()))
    print(f"GPT-2 {shape}: max |logit difference| over {len(texts)} sentences: {worst:.2e}")
    assert worst <= LOGIT_TOLERANCE
    # --step: an earlier checkpoint exports its own weights; a step with no checkpoint is one line
    umask = os.umask(0o027)
    try:
        export.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'hf3'}", "--step=3"])
    finally:
        os.umask(umask)
    assert {stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "hf3").iterdir()} == {0o640}
    from safetensors.numpy import load_file
    newest, earlier = (load_file(tmp_path / name / "model.safetensors") for name in ("hf", "hf3"))
    assert newest.keys() == earlier.keys() and not np.array_equal(newest["transformer.wte.weight"],
                                                                  earlier["transformer.wte.weight"])
    with pytest.raises(SystemExit, match=r"error: there is no checkpoint of step 4 in .*; its checkpoints are at "
                                         r"steps \[3, 6\]"):
        export.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'hf4'}", "--step=4"])


@pytest.mark.parametrize("shape", ["wider"])
def test_a_post_ln_bert_run_is_bert_for_pretraining_with_the_same_logits(tmp_path, tokenizer_file, shape):
    workdir = trained_run(tmp_path, tokenizer_file, "mlm", {**BERT, **SHAPES[shape]})
    export.export_run(str(workdir), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-12 and config["type_vocab_size"] == 2
    model = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = sentences(8)
    worst_mlm = worst_nsp = 0.0
    trained = load_trained(workdir)
    for first, second in zip(texts[::2], texts[1::2]):
        encoding = tokenizer(first, second)  # [CLS] A [SEP] B [SEP], types 0 / 1
        ids, types = encoding["input_ids"], encoding["token_type_ids"]
        n = len(ids)
        row = {"inputs": ids, "positions": range(n), "token_types": types, "segment_ids": [1] * n,
               "attention_kind": [PREFIX] * n}
        [(logits, hidden)], _ = project_outputs(workdir, [row], trained)
        nsp = np.asarray(trained.model.head("pair_classifier")(jnp.asarray(hidden[:1])))[0]
        with torch.no_grad():
            output = model(torch.tensor([ids]), token_type_ids=torch.tensor([types]))
        worst_mlm = max(worst_mlm, float(np.abs(output.prediction_logits[0].numpy() - logits).max()))
        worst_nsp = max(worst_nsp, float(np.abs(output.seq_relationship_logits[0].numpy() - nsp).max()))
    print(f"BERT {shape}: max |logit difference|: MLM {worst_mlm:.2e}, NSP {worst_nsp:.2e}")
    assert worst_mlm <= LOGIT_TOLERANCE and worst_nsp <= LOGIT_TOLERANCE


def test_the_exported_tokenizer_encodes_200_sentences_to_the_same_ids(tmp_path, tokenizer_file):
    from pretrain.hf.hf_tokenizer import write_tokenizer
    from pretrain.tokenizer import load_tokenizer

    ours = load_tokenizer(tokenizer_file)
    for template in ("bert", "gpt2"):
        directory = tmp_path / template
        directory.mkdir()
        write_tokenizer(ours, directory, template, 256)
        theirs = transformers.AutoTokenizer.from_pretrained(directory)
        texts = sentences(200) + ["  two leading spaces", "tabs\tand\nnewlines", "ünïcödé → ∑ 𝔘", "a  b   c "]
        for text in texts:
            assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text).tolist(), text
        vocab = ours.vocabulary()
        assert (theirs.mask_token_id, theirs.pad_token_id, theirs.cls_token_id) == (vocab.mask, vocab.pad, vocab.cls)
    bert = transformers.AutoTokenizer.from_pretrained(tmp_path / "bert")
    ids = ours.encode("x = 1").tolist()
    assert bert("x = 1")["input_ids"] == [vocab.cls, *ids, vocab.sep]
    assert bert.decode(ids) == "x = 1"


REFUSALS = {
    "GPT-2 has no output bias": ("clm", {"model.output_bias": True},
                                 r"config.model.output_bias=True: GPT-2's output layer has no bias; train with "
                                 r"config.model.output_bias=False"),
    "GPT-2 embeds no token types": ("unilm", {},
                                    r"objectives \['unilm/bidirectional', 'unilm/left_to_right', 'unilm/right_to_left', "
                                    r"'unilm/seq2seq'\] use token types beyond 0, which GPT-2 does not embed"),
    "BERT needs the transform head": ("mlm", {"model.pre_layer_norm": False},
                                      r"config.model.mlm_transform_head=False: BertForMaskedLM reads logits through "
                                      r"BERT's MLM transform head; train with config.model.mlm_transform_head=True"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_run_without_an_exact_counterpart_is_refused_naming_the_option(tmp_path, tokenizer_file, name):
    objective, overrides, message = REFUSALS[name]
    workdir = workdir_with(tokenizer_file, tmp_path / "run")  # a run's config and tokenizer: refused before loading
    (workdir / "config.json").write_text(tiny_config(objective, **overrides).to_json())
    with pytest.raises(SystemExit) as stopped:
        export.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"])
    text = str(stopped.value.code)
    assert text.startswith("error: ") and "Traceback" not in text, text
    assert re.search(message, text), text
    assert not (tmp_path / "hf").exists()


def assert_same_logits(model, reference, batch: dict) -> float:
    """Asserts this project's `model` and the `transformers` `reference` give the same
    vocabulary logits (and NSP logits, for BERT) on `batch` within LOGIT_TOLERANCE;
    returns the largest vocabulary-logit difference."""
    hidden = model({key: jnp.asarray(value, jnp.int32) for key, value in batch.items()})
    ours = np.asarray(model.logits(hidden))
    ids = torch.tensor(np.int64(batch["inputs"]))
    with torch.no_grad():
        if isinstance(reference, transformers.BertForPreTraining):
            output = reference(ids, token_type_ids=torch.tensor(np.int64(batch["token_types"])))
            theirs = output.prediction_logits.numpy()
            nsp = np.asarray(model.head("pair_classifier")(hidden[:, :1]))[:, 0]
            assert np.abs(output.seq_relationship_logits.numpy() - nsp).max() <= LOGIT_TOLERANCE
        else:
            theirs = reference(ids).logits.numpy()
    worst = float(np.abs(theirs - ours).max())
    assert worst <= LOGIT_TOLERANCE
    return worst


HF_SHAPES = {"small": dict(layers=2, width=24, heads=3, mlp=40), "deeper": dict(layers=4, width=32, heads=2, mlp=64)}


def random_hf_model(architecture: str, shape: str, directory) -> None:
    """A random tiny `transformers` model built here and saved (nothing is downloaded)."""
    torch.manual_seed(0)
    size = HF_SHAPES[shape]
    if architecture == "bert":
        config = transformers.BertConfig(vocab_size=90, hidden_size=size["width"], num_hidden_layers=size["layers"],
                                         num_attention_heads=size["heads"], intermediate_size=size["mlp"],
                                         max_position_embeddings=32, type_vocab_size=2)
        model = transformers.BertForPreTraining(config)
    else:
        config = transformers.GPT2Config(vocab_size=90, n_embd=size["width"], n_layer=size["layers"],
                                         n_head=size["heads"], n_inner=size["mlp"], n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # non-zero biases and norms, so a swapped or dropped one shows
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval().save_pretrained(directory)
    return model


@pytest.mark.parametrize("architecture", convert.ARCHITECTURES)
@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_an_imported_hf_model_has_transformers_logits_and_exports_back_bit_identical(tmp_path, architecture, shape):
    from safetensors.numpy import load_file

    from pretrain.hf.models import flat_params, load_hf_model

    reference = random_hf_model(architecture, shape, tmp_path / "hf")
    kind, model = load_hf_model(tmp_path / "hf")
    assert kind == architecture
    ids = np.random.default_rng(0).integers(0, 90, size=(3, 17))
    n = ids.shape[1]
    types = np.repeat([[0] * 9 + [1] * 8], 3, axis=0) if architecture == "bert" else np.zeros_like(ids)
    batch = {"inputs": ids, "positions": np.tile(np.arange(n), (3, 1)), "token_types": types,
             "segment_ids": np.ones_like(ids), "attention_kind": np.full_like(ids, PREFIX if architecture == "bert"
                                                                              else L2R)}
    worst = assert_same_logits(model, reference, batch)
    print(f"{architecture} {shape} imported: max |logit difference| {worst:.2e}")
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    back = convert.to_hf(flat_params(model), architecture)
    assert back.keys() == saved.keys()
    for key in saved:
        assert back[key].dtype == saved[key].dtype and np.array_equal(back[key], saved[key]), key


@pytest.mark.parametrize("architecture", convert.ARCHITECTURES)
def test_a_project_model_of_another_size_converts_to_transformers_logits(tmp_path, architecture):
    """The project -> HF direction at a second size (4 layers, width 32) without a run:
    a model of this project with random weights and non-zero biases and norms, written
    with `to_hf` and `hf_config`, loaded by `transformers`."""
    import json as json_lib

    from safetensors.numpy import save_file

    from pretrain.hf.models import flat_params, hf_config, set_flat_params
    from pretrain.model import TransformerConfig, create_model

    bert = architecture == "bert"
    config = TransformerConfig(vocab_size=90, num_layers=4, model_dim=32, num_heads=2, mlp_dim=64, max_positions=32,
                               num_token_types=2 if bert else 1, pre_layer_norm=not bert, mlm_transform_head=bert,
                               heads=("pair_classifier",) if bert else (), output_bias=bert, gelu="exact" if bert else "tanh",
                               layer_norm_epsilon=1e-12 if bert else 1e-5)
    model = create_model(config, seed=3)
    params = flat_params(model)
    draw = np.random.default_rng(0)
    set_flat_params(model, {key: value + 0.1 * draw.standard_normal(value.shape).astype(np.float32)
                            if value.ndim == 1 else value for key, value in params.items()})
    (tmp_path / "hf").mkdir()
    save_file(convert.to_hf(flat_params(model), architecture), str(tmp_path / "hf" / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json_lib.dumps(hf_config(config, {"[PAD]": 0, "[BOS]": 1,
                                                                                   "[EOS]": 2})))
    reference = (transformers.BertForPreTraining if bert else transformers.GPT2LMHeadModel).from_pretrained(
        tmp_path / "hf").eval()
    ids = draw.integers(0, 90, size=(2, 20))
    types = np.repeat([[0] * 12 + [1] * 8], 2, axis=0) if bert else np.zeros_like(ids)
    batch = {"inputs": ids, "positions": np.tile(np.arange(20), (2, 1)), "token_types": types,
             "segment_ids": np.ones_like(ids), "attention_kind": np.full_like(ids, PREFIX if bert else L2R)}
    worst = assert_same_logits(model, reference, batch)
    print(f"{architecture} 4x32 exported: max |logit difference| {worst:.2e}")
