"""Generation: the KV cache against repeated full forward passes, ragged batches, [EOS],
no source-to-target attention in seq2seq, [MASK] filling, sampling, and CLI errors."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from objectives import ENCODER_ONLY, L2R, PREFIX, Vocabulary, build_mixture
from objectives.vocab import EOS_ID, MASK_ID
from pretrain import generate as gen
from pretrain.model import create_model, preset
from pretrain.tokenizer import load_tokenizer
from train_helpers import tiny_config, tokenizer_file  # noqa: F401 (a fixture)
from trained_run import shared_run

VOCAB = Vocabulary(400)
PROMPTS = [np.arange(20, 22), np.arange(30, 35), np.arange(100, 109)]  # ragged: 2, 5 and 9 tokens
MAX_NEW = [4, 7, 5]
LEAVES = {leaf.name: leaf for leaf in build_mixture("clm:1,mass:1,mlm:1,unilm:1", VOCAB).objectives}
DECODING = [(name, mode) for name, leaf in LEAVES.items() for mode in leaf.generation_modes() if mode != "fill"]
ONE_PASS = [name for name, leaf in LEAVES.items() if leaf.fill_row(np.array([20, MASK_ID])) is not None]


@pytest.fixture(scope="module")
def model():
    """A tiny model with sharpened logits, so greedy choices are far from ties."""
    model = create_model(preset("tiny", vocab_size=VOCAB.size), seed=3)
    model.token_embedding[...] = model.token_embedding[...] * 10
    return model


def full_sequence(prompt: gen.Prompt, generated: list[int]) -> dict[str, np.ndarray]:
    """The row a prompt plus `generated` stands for: next-token layouts append the
    generated tokens; UniLM's cloze layout appends them before a trailing [MASK]."""
    keep = len(prompt) - 1 if prompt.cloze else len(prompt)
    tail = list(generated) + ([MASK_ID] if prompt.cloze else [])
    return {
        "inputs": np.concatenate([prompt.inputs[:keep], tail]),
        "positions": np.concatenate([prompt.positions[:keep], prompt.next_position + np.arange(len(tail))]),
        "attention_kind": np.concatenate([prompt.attention_kind[:keep], np.full(len(tail), L2R)]),
        "token_types": np.concatenate([prompt.token_types[:keep], np.full(len(tail), prompt.target_type)]),
        "segment_ids": np.ones(keep + len(tail), np.int32),
    }


WIDTH = 32  # reference rows are right-padded to one width (segment 0), so the forward compiles once


@pytest.fixture(scope="module")
def forward(model):
    """row -> (hidden [n, D], logits [n, V]): the full forward pass of one row."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        model = nnx.merge(graphdef, state)
        hidden = model(batch)
        return hidden, model.logits(hidden)

    def call(row: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = len(row["inputs"])
        batch = {name: np.zeros((1, WIDTH), np.int32) for name in row}
        for name, values in row.items():
            batch[name][0, :n] = values
        hidden, logits = run(state, batch)
        return np.asarray(hidden[0, :n]), np.asarray(logits[0, :n])

    return call


def greedy_without_cache(forward, prompt: gen.Prompt) -> list[int]:
    """Greedy decoding by a full forward pass over the whole row for every token."""
    allowed = gen.allowed_tokens(VOCAB, eos=True)
    generated: list[int] = []
    while len(generated) < prompt.max_new_tokens:
        _, logits = forward(full_sequence(prompt, generated))
        generated.append(int(np.argmax(np.where(allowed, logits[-1], -np.inf))))
        if generated[-1] == EOS_ID:
            break
    return generated


@pytest.mark.parametrize("name, mode", DECODING)
def test_cached_greedy_equals_full_forward_greedy_in_a_ragged_batch(model, forward, name, mode):
    prompts = [LEAVES[name].prompt(mode, tokens, n) for tokens, n in zip(PROMPTS, MAX_NEW)]
    outputs = gen.generate(model, prompts, vocab=VOCAB)
    for prompt, output in zip(prompts, outputs):
        expected = greedy_without_cache(forward, prompt)
        assert output.tolist() == expected
        assert len(expected) == prompt.max_new_tokens or expected[-1] == EOS_ID


def test_every_row_stops_at_eos(model):
    eager = create_model(preset("tiny", vocab_size=VOCAB.size, output_bias=True), seed=3)
    eager.output_bias[...] = eager.output_bias[...].at[EOS_ID].set(100.0)
    outputs = gen.generate(eager, [LEAVES["clm"].prompt("continue", tokens, 6) for tokens in PROMPTS], vocab=VOCAB)
    assert [o.tolist() for o in outputs] == [[EOS_ID]] * len(PROMPTS)


@pytest.mark.parametrize("name", [name for name, mode in DECODING if mode == "seq2seq"])
def test_seq2seq_source_never_sees_the_target(model, forward, name):
    """Changing every generated target token leaves each source token's hidden state
    bit-identical (and does change the target's own states)."""
    prompt = LEAVES[name].prompt("seq2seq", PROMPTS[1], 6)
    generated = gen.generate(model, [prompt], vocab=VOCAB)[0].tolist()
    row = full_sequence(prompt, generated)
    source = np.isin(row["attention_kind"], [PREFIX, ENCODER_ONLY])
    assert source.sum() >= len(PROMPTS[1]) and (row["attention_kind"][~source] == L2R).all()
    other = dict(row, inputs=np.where(source, row["inputs"], 7 + (row["inputs"] + 50) % 300))
    (hidden, _), (changed, _) = forward(row), forward(other)
    np.testing.assert_array_equal(hidden[source], changed[source])
    assert np.any(hidden[~source] != changed[~source])


@pytest.mark.parametrize("name", ONE_PASS)
@pytest.mark.parametrize("sampling", [gen.GREEDY, gen.Sampling(temperature=1.0, top_k=50)], ids=["greedy", "sampled"])
def test_fill_changes_the_mask_positions_only(model, name, sampling):
    texts = [np.array([20, MASK_ID, 22, 23, MASK_ID]), np.array([MASK_ID, 40, 41])]
    filled = gen.fill_masks(model, texts, LEAVES[name], sampling=sampling)
    for text, out in zip(texts, filled):
        masked = text == MASK_ID
        assert out.shape == text.shape
        np.testing.assert_array_equal(out[~masked], text[~masked])
        assert not VOCAB.is_special(out[masked]).any()
    with pytest.raises(ValueError, match=r"prompt 0 has no \[MASK\]"):
        gen.fill_masks(model, [np.array([20, 21])], LEAVES[name])


def test_sampling_rules():
    logits = jnp.asarray([[0.0, 3.0, 2.9, -1.0, 1.0]] * 64)
    keys = jax.random.split(jax.random.key(0), 2)
    assert set(np.asarray(gen.sample(logits, keys[0], gen.GREEDY)).tolist()) == {1}
    assert set(np.asarray(gen.sample(logits, keys[0], gen.Sampling(1.0, top_k=1))).tolist()) == {1}
    assert set(np.asarray(gen.sample(logits, keys[0], gen.Sampling(1.0, top_p=0.01))).tolist()) == {1}
    top2 = np.asarray(gen.sample(logits, keys[1], gen.Sampling(1.0, top_k=2)))
    assert set(top2.tolist()) == {1, 2}
    nucleus = np.asarray(gen.sample(logits, keys[1], gen.Sampling(1.0, top_p=0.6)))  # {1, 2} hold > 0.6
    assert set(nucleus.tolist()) == {1, 2}
    again = np.asarray(gen.sample(logits, keys[1], gen.Sampling(1.0, top_p=0.6)))
    np.testing.assert_array_equal(nucleus, again)
    with pytest.raises(ValueError, match="top_p=0 must lie in"):
        gen.Sampling(top_p=0)


def test_command_generates_from_a_trained_run(tmp_path_factory):
    workdir = str(shared_run(tmp_path_factory))
    lines = gen.run(workdir, ["Return the value", "A list of"], mode="continue", max_new_tokens=5)
    assert len(lines) == 2 and lines[0].startswith("'Return the value' -> ")
    filled = gen.run(workdir, ["Return the [MASK] of the [MASK]."])
    assert "(filled: " in filled[0] and filled[0].count(",") >= 1
    seq2seq = gen.run(workdir, ["Return the value", "x"], mode="seq2seq", layout="mass", max_new_tokens=3,
                      sampling=gen.Sampling(0.8, top_k=20, top_p=0.9), seed=1)
    assert len(seq2seq) == 2 and seq2seq[1].startswith("'x' -> ")


def test_bad_input_gets_one_clear_message(tmp_path):
    with pytest.raises(ValueError, match="--prompt number 2 is empty"):
        gen.run(str(tmp_path), ["fine", "  "])
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"--workdir={tmp_path / 'missing'} does not exist; pass a training run's directory, or train one first: "
            f"python -m pretrain.train --config=configs/pretrain.py:objective=<objective> "
            f"--workdir={tmp_path / 'missing'}")):
        gen.run(str(tmp_path / "missing"), ["text"])
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="has no checkpoints/ directory: the run has not saved"):
        gen.run(str(tmp_path), ["a [MASK] text"])
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoints holds no finished checkpoint; let the run reach"):
        gen.run(str(tmp_path), ["a [MASK] text"])
    with pytest.raises(ValueError, match="a model trained with mlm fills masks: put \\[MASK\\] in --prompt"):
        gen.resolve_mode("auto", "auto", [LEAVES["mlm"]], ["no mask here"])
    with pytest.raises(ValueError, match="--layout='mlm' cannot do --mode=continue; choose one of clm"):
        gen.resolve_mode("continue", "mlm", [LEAVES["mlm"]], ["text"])


def run_dir_trained_with(tmp_path, objective: str, tokenizer_file):
    """A workdir with the config.json and tokenizer of a run trained with `objective` but
    no checkpoint, so anything decided here is decided before loading."""
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(objective).to_dict()))
    shutil.copy(tokenizer_file, tmp_path / "tokenizer.model")
    return str(tmp_path)


@pytest.mark.parametrize("objective, mode, prompt, message", [
    ("clm", "seq2seq", "Return the sum.", r"--mode=seq2seq needs a model trained with bart, mass, prefix_lm, ul2 or unilm, "
                                          r"but this run was "
                                          r"trained with clm, which never learnt to generate a target from a source; "
                                          r"it can --mode=continue\. To force it anyway, name the layout: "
                                          r"--layout=bart"),
    ("clm", "auto", "Return the [MASK] of it.", r"--mode=fill needs a model trained with bart, mlm, span_corruption, spanbert, "
                                                r"ul2 or unilm, but this run "
                                                r"was trained with clm, which never learnt to fill \[MASK\]"),
    ("mlm", "continue", "Return the", r"--mode=continue needs a model trained with clm, prefix_lm or ul2, but this run "
                                      r"was trained "
                                      r"with mlm, which never learnt to continue text.*it can --mode=fill"),
], ids=["seq2seq on clm", "fill on clm", "continue on mlm"])
def test_a_mode_the_model_never_learnt_is_refused_before_loading(tmp_path, tokenizer_file, objective, mode, prompt,
                                                                 message):
    with pytest.raises(ValueError, match=message):
        gen.run(run_dir_trained_with(tmp_path, objective, tokenizer_file), [prompt], mode=mode)


def test_a_forced_layout_warns_and_the_help_lists_each_layout_once(capsys):
    mode, leaf, warning = gen.resolve_mode("seq2seq", "mass", [LEAVES["clm"]], ["x"])
    assert (mode, leaf.name, warning) == ("seq2seq", "mass", "warning: the model was trained with clm, never in "
                                          "the mass layout; expect text unrelated to the prompt")
    mode, leaf, warning = gen.resolve_mode("fill", "auto", [LEAVES["mlm"], LEAVES["clm"]], ["[MASK]"])
    assert (mode, leaf.name, warning) == ("fill", "mlm", None)
    assert gen.resolve_mode("seq2seq", "unilm", list(LEAVES.values()), ["x"])[1].name == "unilm/seq2seq"
    with pytest.raises(SystemExit):
        gen.main(["generate", "--help"])
    layout_help = capsys.readouterr().out.split("--layout:")[1].split("\n  --")[0]
    assert layout_help.count("unilm/seq2seq") == 1 and layout_help.count("mass") == 1, layout_help


def test_a_continuation_keeps_the_space_that_joins_it_to_the_prompt(tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    prompt, rest = tokenizer.encode("Return the"), tokenizer.encode("number of items")
    assert gen.decode_continuation(tokenizer, prompt, rest) == " number of items"
    assert gen.decode_continuation(tokenizer, prompt, np.append(rest, EOS_ID)) == " number of items"
    assert tokenizer.decode(rest) == "number of items"  # what the command used to print
    with pytest.raises(ValueError, match="exceeds the model's max_positions=256"):
        gen.generate(create_model(preset("tiny", vocab_size=VOCAB.size)), [LEAVES["clm"].prompt("continue", PROMPTS[0], 300)])
