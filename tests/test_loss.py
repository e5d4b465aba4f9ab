"""The training loss path (logits only at weighted positions, gradient in one pass)
equals the full-logits loss: same statistics, same loss and same gradients, for
every objective, both model forms, any chunk size, sharded rows and empty batches.

Tolerances: the sums are taken in another order, so float32 losses agree to rtol
1e-6, and each gradient leaf to rtol 1e-5 plus 1e-6 of its largest element
(elements near zero are differences of larger terms); counts (correct
predictions, weights) are exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import objectives
from objectives.example import TextChunk
from pretrain.loss import full_logits_statistics, batch_loss, token_statistics, weighted_token_statistics
from pretrain.model import create_model, preset
from pretrain.packing import pack

VOCAB_SIZE, SEQ_LEN, ROWS = 96, 48, 6
BERT_FORM = dict(pre_layer_norm=False, mlm_transform_head=True)


def packed_batch(spec: str, seed: int = 0, settings=None) -> tuple[dict, int]:
    mixture = objectives.build_mixture(spec, objectives.Vocabulary(VOCAB_SIZE), settings)
    rng = np.random.default_rng(seed)
    examples = []
    while len(examples) < 4 * ROWS:
        tokens = rng.integers(7, VOCAB_SIZE, size=int(rng.integers(6, 30)))
        examples.append(mixture(TextChunk(tokens, [0, len(tokens) // 2], tokens[::-1].copy()), rng))
    packed = pack(examples, SEQ_LEN, term_fields=mixture.term_fields)
    return {name: jnp.asarray(values[:ROWS]) for name, values in packed.items()}, len(mixture.names)


def both_losses(batch: dict, num_objectives: int, chunk_tokens: int, every_position: bool = False,
                **model_overrides):
    """((loss sum, stats), grads) of the full-logits reference and of the fast path."""
    model = create_model(preset("tiny", vocab_size=VOCAB_SIZE, **model_overrides))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = (batch["targets"], batch["weights"], batch["objective_id"], num_objectives)

    def reference(params):
        model = nnx.merge(graphdef, params, rest)
        return full_logits_statistics(model, model(batch), *args)

    def fast(params):
        model = nnx.merge(graphdef, params, rest)
        return weighted_token_statistics(model, model(batch), *args, chunk_tokens=chunk_tokens,
                                         every_position=every_position)

    grad = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return grad(reference), grad(fast)


def assert_same(reference, fast) -> None:
    (ref_total, ref_stats), ref_grads = reference
    (total, stats), grads = fast
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    np.testing.assert_allclose(stats["loss_sum"], ref_stats["loss_sum"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stats["correct_sum"], ref_stats["correct_sum"])
    np.testing.assert_array_equal(stats["weight_sum"], ref_stats["weight_sum"])
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for ref, got in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("spec", ["mlm", "clm", "mass", "unilm", "mlm:1,clm:1,mass:1,unilm:1"])
@pytest.mark.parametrize("form", [{}, BERT_FORM], ids=["pre_ln", "bert"])
def test_fast_loss_equals_full_logits_loss(spec, form):
    batch, num_objectives = packed_batch(spec)
    assert_same(*both_losses(batch, num_objectives, chunk_tokens=32, **form))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 256, 10_000])
def test_any_chunk_size_gives_the_same_loss(chunk_tokens):
    batch, num_objectives = packed_batch("mlm:1,clm:1,mass:1,unilm:1", seed=1)
    assert_same(*both_losses(batch, num_objectives, chunk_tokens))


@pytest.mark.parametrize("spec", ["mlm", "mlm:1,clm:1,mass:1,unilm:1"])
def test_logits_at_every_position_give_the_same_loss(spec):
    """The like-for-like head of benchmarks/peer.py: vocabulary logits at every
    position, the loss and gradients still the weighted positions' only."""
    batch, num_objectives = packed_batch(spec, seed=4)
    assert float((batch["weights"] == 0).mean()) > 0.3  # positions without a loss are computed for nothing
    assert_same(*both_losses(batch, num_objectives, chunk_tokens=64, every_position=True, **BERT_FORM))


def test_rows_without_loss_and_an_empty_batch():
    batch, num_objectives = packed_batch("mass", seed=2)
    batch = dict(batch, weights=batch["weights"].at[1:4].set(0.0))
    assert_same(*both_losses(batch, num_objectives, chunk_tokens=16))
    empty = dict(batch, weights=jnp.zeros_like(batch["weights"]))
    reference, fast = both_losses(empty, num_objectives, chunk_tokens=16)
    assert_same(reference, fast)
    assert float(fast[0][0]) == 0.0
    assert all(not np.any(g) for g in jax.tree.leaves(fast[1])), "no weighted token, no gradient"


def test_ties_count_as_correct_only_for_the_first_maximal_token():
    """Accuracy follows jnp.argmax: with tied logits only the lowest id is the prediction."""
    batch, num_objectives = packed_batch("clm", seed=3)
    model = create_model(preset("tiny", vocab_size=VOCAB_SIZE, output_bias=True))
    model.token_embedding[...] = jnp.zeros_like(model.token_embedding[...])  # every logit = the bias
    model.output_bias[...] = jnp.zeros(VOCAB_SIZE).at[jnp.array([9, 11])].set(1.0)  # ids 9 and 11 tie
    hidden = model(batch)
    args = (batch["targets"], batch["weights"], batch["objective_id"], num_objectives)
    _, stats = weighted_token_statistics(model, hidden, *args)
    reference = token_statistics(model.logits(hidden), *args)
    np.testing.assert_array_equal(stats["correct_sum"], reference["correct_sum"])
    weighted = np.asarray(batch["weights"]) > 0
    assert float(stats["correct_sum"].sum()) == float((np.asarray(batch["targets"])[weighted] == 9).sum())


def test_rows_compacted_in_device_groups_agree():
    """On the 8 simulated devices 6 rows form gcd(6, 8) = 2 groups, as a batch sharded
    over devices would; the result is the same."""
    assert jax.device_count() == 8
    batch, num_objectives = packed_batch("mlm:1,clm:1,mass:1,unilm:1", seed=4)
    assert_same(*both_losses(batch, num_objectives, chunk_tokens=64))


def test_batch_loss_is_the_mean_over_weighted_tokens_plus_each_term_over_its_own_positions():
    settings = {"unilm": {"nsp": True}}
    batch, num_objectives = packed_batch("unilm", seed=5, settings=settings)
    terms = objectives.build_mixture("unilm", objectives.Vocabulary(VOCAB_SIZE), settings).loss_terms
    assert [term.name for term in terms] == ["nsp"]
    model = create_model(preset("tiny", vocab_size=VOCAB_SIZE, **BERT_FORM, heads=("pair_classifier",)))
    loss, stats = jax.jit(lambda b: batch_loss(model, b, num_objectives, terms=terms))(batch)
    hidden = model(batch)
    reference = token_statistics(model.logits(hidden), batch["targets"], batch["weights"],
                                 batch["objective_id"], num_objectives)
    # NSP by hand: the pair classifier's 2-way cross-entropy at each labelled position (the
    # pair's first token), averaged over those positions alone.
    labels = np.asarray(batch["nsp_labels"])
    where = np.nonzero(labels >= 0)
    assert 0 < len(where[0]) < (np.asarray(batch["segment_ids"]) > 0).sum() / 4
    logits = np.asarray(model.head("pair_classifier")(hidden), np.float64)[where]
    log_softmax = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nsp = -log_softmax[np.arange(len(logits)), labels[where]].mean()
    expected = reference["loss_sum"].sum() / reference["weight_sum"].sum() + nsp
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(stats["terms"]["nsp"]["weight_sum"]) == len(where[0])
    np.testing.assert_allclose(stats["terms"]["nsp"]["loss_sum"] / len(where[0]), nsp, rtol=1e-6)


def test_samples_are_the_inverse_cdf_of_the_heads_softmax_at_the_drawn_positions_only():
    """`vocabulary_samples` against a NumPy reference on fixed hidden states: at every
    drawn position the token whose cumulative probability first reaches the draw's
    uniform, 0 elsewhere; any chunk size gives the same samples."""
    from objectives.terms import DRAW_LEVELS, as_uniform
    from pretrain.loss import vocabulary_samples

    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(VOCAB_SIZE, 16)).astype(np.float32)
    bias = rng.normal(size=VOCAB_SIZE).astype(np.float32)
    hidden = rng.normal(size=(4, 10, 16)).astype(np.float32)
    draws = np.where(rng.random((4, 10)) < 0.4, rng.integers(1, DRAW_LEVELS + 1, size=(4, 10)), 0).astype(np.int32)
    logits = hidden @ embedding.T + bias
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    cumulative = np.cumsum(probabilities / probabilities.sum(-1, keepdims=True), axis=-1)
    expected = np.where(draws != 0, (cumulative < as_uniform(draws)[..., None]).sum(-1), 0)
    for chunk_tokens in (1, 7, 512):
        samples = vocabulary_samples(None, {}, jnp.asarray(embedding), jnp.asarray(bias), jnp.asarray(hidden),
                                     jnp.asarray(draws), jnp.float32, chunk_tokens)
        np.testing.assert_array_equal(np.asarray(samples), expected)
    assert (expected[draws != 0] > 0).any()  # the reference is not trivially all zeros


def test_samples_follow_the_softmax():
    """20,000 samples at one position (fixed seed) match its softmax: each token's count
    within 4 binomial standard deviations."""
    from objectives.terms import uniform_draws
    from pretrain.loss import vocabulary_samples

    count, vocab = 20_000, 8
    embedding = jnp.eye(vocab, dtype=jnp.float32)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 0.3, 1.5, -2.0], np.float32)
    hidden = jnp.tile(jnp.asarray(logits), (1, count, 1))
    draws = jnp.asarray(uniform_draws(np.random.default_rng(0), count)[None])
    samples = np.asarray(vocabulary_samples(None, {}, embedding, jnp.zeros(vocab), hidden, draws, jnp.float32))
    probabilities = np.exp(logits) / np.exp(logits).sum()
    counts = np.bincount(samples.ravel(), minlength=vocab)
    spread = 4 * np.sqrt(count * probabilities * (1 - probabilities))
    assert np.all(np.abs(counts - count * probabilities) <= spread), (counts, count * probabilities)
