"""The Transformer: leakage for every attention kind, KV-cache decoding, NaN-free padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import objectives
from objectives.example import L2R, PREFIX, TextChunk
from pretrain.attention import attention_mask
from pretrain.model import (TransformerConfig, create_model, dense, non_embedding_parameter_count, parameter_count,
                            preset)
from pretrain import model as model_lib
from pretrain.packing import pack
from reach import reach_through_layers

VOCAB_SIZE = 64
VOCAB = objectives.Vocabulary(size=VOCAB_SIZE)
ALL_OBJECTIVES = "mlm:1,clm:1,mass:1,unilm:1"


def tiny(**overrides) -> TransformerConfig:
    return preset("tiny", vocab_size=VOCAB_SIZE, **overrides)


def leaf(name: str, settings=None) -> objectives.Objective:
    mixture = objectives.build_mixture(name.split("/")[0], VOCAB, settings)
    return {o.name: o for o in mixture.objectives}[name]


def example_of(name: str, length: int, seed: int = 0, settings=None) -> objectives.Example:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(7, VOCAB_SIZE, size=length)
    chunk = TextChunk(tokens, sentence_starts=[0, length // 2], other_document=tokens[::-1] + 0)
    return leaf(name, settings)(chunk, rng)


def as_batch(packed: dict) -> dict:
    return {name: jnp.asarray(values) for name, values in packed.items()}


def perturbed_copies(row: dict, seq_len: int) -> dict:
    """Row 0 is the original; row 1 + j has token j replaced by another id."""
    inputs = np.repeat(row["inputs"][:1], seq_len + 1, axis=0)
    for j in range(seq_len):
        inputs[1 + j, j] = 7 + (inputs[1 + j, j] - 7 + 13) % (VOCAB_SIZE - 7)
    batch = {name: np.repeat(values[:1], seq_len + 1, axis=0) for name, values in row.items()}
    batch["inputs"] = inputs
    return as_batch(batch)


def assert_no_leakage(model, packed: dict) -> None:
    """Changing token j changes the outputs of query i exactly when j reaches i through
    the model's layers (for every kind but ENCODER_ONLY, exactly when i may see j)."""
    seq_len = packed["inputs"].shape[1]
    batch = perturbed_copies(packed, seq_len)
    forward = jax.jit(lambda b: (lambda h: (h, model.logits(h)))(model(b)))
    hidden, logits = forward(batch)
    mask = np.asarray(attention_mask(batch["segment_ids"][:1], batch["attention_kind"][:1]))[0, 0]
    visible = reach_through_layers(mask, model.config.num_layers)
    real = packed["segment_ids"][0] > 0
    for output in (np.asarray(hidden), np.asarray(logits)):
        original = output[0]
        for j in range(seq_len):
            changed = np.any(output[1 + j] != original, axis=-1)
            for i in np.flatnonzero(real):
                assert changed[i] == visible[i, j], (
                    f"query {i}, key {j}: visible={visible[i, j]} but changed={changed[i]}")


LEAVES = ["mlm", "clm", "mass", "unilm/bidirectional", "unilm/seq2seq",
          "unilm/left_to_right", "unilm/right_to_left"]


@pytest.mark.parametrize("name", LEAVES)
def test_no_leakage_single_objective(name):
    example = example_of(name, 9)
    packed = pack([example], len(example) + 2)  # two pads at the end
    assert_no_leakage(create_model(tiny()), packed)


@pytest.mark.parametrize("config", [
    dict(),
    dict(pre_layer_norm=False, mlm_transform_head=True, heads=("pair_classifier",)),
], ids=["pre_ln", "post_ln_bert_heads"])
def test_no_leakage_packed_mixture(config):
    examples = [example_of(name, n, seed=k) for k, (name, n) in enumerate(
        [("mass", 6), ("unilm/right_to_left", 4), ("unilm/seq2seq", 5), ("clm", 4), ("mlm", 3)])]
    seq_len = sum(len(e) for e in examples) + 3
    packed = pack(examples, seq_len, strategy="first_fit")
    assert packed["inputs"].shape[0] == 1 and packed["segment_ids"][0].max() == 5
    assert set(packed["attention_kind"][0][packed["segment_ids"][0] > 0].tolist()) == {0, 1, 2, 3}  # 3: MASS's [MASK]ed source
    assert_no_leakage(create_model(tiny(**config)), packed)


def test_padding_rows_produce_no_nan():
    model = create_model(tiny())
    packed = pack([example_of("clm", 4)], 12)
    hidden = model(as_batch(packed))
    assert np.all(np.isfinite(np.asarray(hidden)))
    assert np.all(np.isfinite(np.asarray(model.logits(hidden))))
    # A row that is all padding, too.
    empty = {name: np.zeros_like(values) for name, values in packed.items()}
    assert np.all(np.isfinite(np.asarray(model(as_batch(empty)))))


def decode_inputs(tokens, positions, kinds, segments, types):
    return {
        "inputs": jnp.asarray(tokens, jnp.int32), "positions": jnp.asarray(positions, jnp.int32),
        "attention_kind": jnp.asarray(kinds, jnp.int32), "segment_ids": jnp.asarray(segments, jnp.int32),
        "token_types": jnp.asarray(types, jnp.int32),
    }


@pytest.mark.parametrize("config", [dict(), dict(pre_layer_norm=False)], ids=["pre_ln", "post_ln"])
def test_kv_cache_decoding_matches_full_forward(config):
    """Two rows with prompts of different lengths: a seq2seq source (PREFIX) plus the
    first target token, and a plain causal prompt; then 4 L2R tokens one at a time.
    Every decoded hidden state equals the full forward pass of that row's whole
    sequence to 1e-5 (float32; the sums are ordered differently, so not bit-exact)."""
    model = create_model(tiny(**config))
    rng = np.random.default_rng(0)
    steps = 4
    row_a = dict(tokens=rng.integers(7, 64, 6 + steps), kinds=[PREFIX] * 5 + [L2R] * (1 + steps),
                 types=[4] * 5 + [5] * (1 + steps))
    row_b = dict(tokens=rng.integers(7, 64, 3 + steps), kinds=[L2R] * (3 + steps), types=[0] * (3 + steps))
    prompt_lengths = [6, 3]
    rows = [row_a, row_b]

    # Full forward of each row on its own.
    expected = []
    for row in rows:
        n = len(row["tokens"])
        hidden = model(decode_inputs([row["tokens"]], [np.arange(n)], [row["kinds"]], [np.ones(n)], [row["types"]]))
        expected.append(np.asarray(hidden[0]))

    # Prefill: both prompts right-padded to 6 slots (row b's slots 3..5 are segment 0).
    width = max(prompt_lengths)
    def padded(key, row, n):
        values = np.zeros(width, np.int64)
        values[:n] = np.asarray(row[key])[:n]
        return values
    prefill = decode_inputs(
        [padded("tokens", r, n) for r, n in zip(rows, prompt_lengths)],
        [np.arange(width)] * 2,
        [padded("kinds", r, n) for r, n in zip(rows, prompt_lengths)],
        [np.arange(width) < n for n in prompt_lengths],
        [padded("types", r, n) for r, n in zip(rows, prompt_lengths)],
    )
    cache = model.init_cache(batch_size=2, capacity=width + steps)
    extend = jax.jit(model.extend)
    hidden, cache = extend(cache, prefill)
    for r, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(np.asarray(hidden[r, :n]), expected[r][:n], rtol=1e-5, atol=1e-5)
    for step in range(steps):
        index = [n + step for n in prompt_lengths]
        token = decode_inputs(
            [[rows[r]["tokens"][i]] for r, i in enumerate(index)], [[i] for i in index],
            [[L2R], [L2R]], [[1], [1]], [[rows[r]["types"][i]] for r, i in enumerate(index)])
        hidden, cache = extend(cache, token)
        for r, i in enumerate(index):
            np.testing.assert_allclose(np.asarray(hidden[r, 0]), expected[r][i], rtol=1e-5, atol=1e-5)
    assert int(cache.length) == width + steps


def test_presets_and_config_errors():
    assert parameter_count(create_model(tiny())) == (
        64 * 64 + 256 * 64 + 8 * 64  # embeddings (no output bias: off by default, as in GPT-2)
        + 2 * (64 * 3 * 64 + 3 * 64 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64 + 4 * 64)
        + 2 * 64)  # final LayerNorm
    assert preset("base").num_layers == 12 and preset("large").model_dim == 1024
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match=r"config.model.model_dim=100 is not divisible by config.model.num_heads=3; choose num_heads among \[1, 2, 4, 5, 10, 20, 25, 50\]"):
        TransformerConfig(model_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="model.dtype='float17'"):
        TransformerConfig(dtype="float17")
    with pytest.raises(ValueError, match=r"this model has no 'pair_classifier' head \(it has none\)"):
        create_model(tiny()).head("pair_classifier")
    with pytest.raises(ValueError, match=r"config.model.heads=\('pair_classifier', 'nope'\): each head once, among "
                                         r"\('generator', 'hidden_projection', 'pair_classifier', 'replaced_token'"):
        TransformerConfig(heads=("pair_classifier", "nope"))


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    model = create_model(tiny(dtype="bfloat16"))
    packed = pack([example_of("mlm", 6)], 10)
    hidden = model(as_batch(packed))
    assert hidden.dtype == jnp.bfloat16
    assert model.logits(hidden).dtype == jnp.float32
    assert model.token_embedding[...].dtype == jnp.float32


@pytest.mark.parametrize("kernel_shape", [(8, 12), (8, 3, 2, 5)], ids=["mlp", "qkv"])
def test_dense_equals_the_einsum_in_value_and_gradient(kernel_shape):
    """`dense` only rewrites the backward pass's layout; the numbers are the einsum's."""
    x = jax.random.normal(jax.random.key(0), (3, 7, 8))
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)
    cotangent = jax.random.normal(jax.random.key(2), (3, 7, *kernel_shape[1:]))
    einsum = lambda x, k: jnp.tensordot(x, k, axes=1)
    value, vjp = jax.vjp(dense, x, kernel)
    expected, expected_vjp = jax.vjp(einsum, x, kernel)
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(cotangent), expected_vjp(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_non_embedding_parameters_leave_out_the_three_embedding_tables():
    model = create_model(tiny())
    assert non_embedding_parameter_count(model) == parameter_count(model) - (64 + 256 + 8) * 64


def test_gelu_form_and_output_bias_are_model_options():
    """`gelu='exact'` is the erf GELU (BERT), 'tanh' the approximation (GPT-2; the
    default); `output_bias=False` (the default, as GPT-2) leaves the logits without a bias
    parameter, `True` adds BERT's."""
    x = jnp.linspace(-3, 3, 7)
    assert np.allclose(model_lib.gelu(tiny(gelu="exact"), x), jax.nn.gelu(x, approximate=False))
    assert np.allclose(model_lib.gelu(tiny(), x), jax.nn.gelu(x, approximate=True))
    assert not np.allclose(model_lib.gelu(tiny(gelu="exact"), x), model_lib.gelu(tiny(), x))
    with_bias, without = create_model(tiny(output_bias=True)), create_model(tiny())
    assert hasattr(with_bias, "output_bias") and not hasattr(without, "output_bias")
    assert parameter_count(with_bias) - parameter_count(without) == VOCAB_SIZE
    hidden = without(as_batch(pack([example_of("clm", 4)], 8)))
    expected = np.asarray(hidden) @ np.asarray(without.token_embedding[...]).T
    assert np.allclose(np.asarray(without.logits(hidden)), expected, atol=1e-5)


def test_factorised_embeddings_are_projected_up_and_the_vocabulary_head_maps_back_down():
    """`embedding_dim` below the model width: [V, E] tables, an [E, D] projection with a
    bias, a [D, E] transform head; the stack reads the projected embeddings, and the
    logits are the tied projection of the transform head's output."""
    from flax import nnx

    from pretrain.layers import gelu
    from pretrain.model import preset

    config = preset("tiny", vocab_size=50, embedding_dim=16, pre_layer_norm=False, mlm_transform_head=True,
                    output_bias=True)
    model = create_model(config)
    assert model.token_embedding.shape == (50, 16) and model.position_embedding.shape == (256, 16)
    assert model.embedding_projection_kernel.shape == (16, 64) and model.head_kernel.shape == (64, 16)
    batch = {"inputs": jnp.array([[5, 6, 7]]), "positions": jnp.array([[0, 1, 2]]),
             "token_types": jnp.zeros((1, 3), jnp.int32)}
    small = model.embed_tokens(batch["inputs"], batch["positions"], batch["token_types"], deterministic=True)
    projected = model.embed(batch["inputs"], batch["positions"], batch["token_types"], deterministic=True)
    assert small.shape == (1, 3, 16) and projected.shape == (1, 3, 64)
    np.testing.assert_allclose(projected, small @ model.embedding_projection_kernel[...]
                               + model.embedding_projection_bias[...], rtol=1e-6, atol=1e-6)
    hidden = jnp.ones((1, 3, 64))
    transformed = model.head_norm(gelu(config, hidden @ model.head_kernel[...] + model.head_bias[...]))
    np.testing.assert_allclose(model.logits(hidden), transformed @ model.token_embedding[...].T
                               + model.output_bias[...], rtol=1e-5, atol=1e-5)
    assert "embedding_projection_kernel" not in nnx.to_pure_dict(nnx.state(create_model(preset("tiny"))))
    with pytest.raises(ValueError, match=r"embedding_dim=16 differs from config.model.model_dim=64.*"
                                         r"mlm_transform_head=True"):
        preset("tiny", embedding_dim=16)
    with pytest.raises(ValueError, match=r"embedding_dim=-1 must be 0"):
        preset("tiny", embedding_dim=-1)
