"""A tiny model memorises one fixed batch of every objective: gradients reach every path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import objectives
from objectives.example import TextChunk
from pretrain.loss import batch_loss
from pretrain.model import create_model, preset
from pretrain.packing import pack

VOCAB_SIZE = 64
SEQ_LEN = 32
ROWS = 4
STEPS = 200


def fixed_batch(spec: str, settings=None) -> tuple[dict, objectives.Mixture]:
    """ROWS rows of SEQ_LEN, filled with examples of `spec` from fixed random text."""
    mixture = objectives.build_mixture(spec, objectives.Vocabulary(VOCAB_SIZE), settings)
    rng = np.random.default_rng(1234)
    examples = []
    for index in range(64):
        objective = mixture.objectives[index % len(mixture.objectives)]
        n = min(objective.text_budget(SEQ_LEN // 2), 12)
        tokens = rng.integers(7, VOCAB_SIZE, size=n)
        other = rng.integers(7, VOCAB_SIZE, size=n)
        examples.append(objective(TextChunk(tokens, [0, n // 2], other), rng))
    packed = pack(examples, SEQ_LEN, strategy="first_fit", term_fields=mixture.term_fields)
    return {name: jnp.asarray(values[:ROWS]) for name, values in packed.items()}, mixture


def train_on(batch: dict, num_objectives: int, terms=(), **model_overrides) -> list[dict]:
    model = create_model(preset("tiny", vocab_size=VOCAB_SIZE, heads=tuple(term.head for term in terms),
                                **model_overrides))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        return batch_loss(nnx.merge(graphdef, params, rest), batch, num_objectives, terms=terms)

    @jax.jit
    def step(params, opt_state):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        grad_leaves = jax.tree.leaves(grads)
        zero_grads = sum(jnp.all(g == 0) for g in grad_leaves)
        return optax.apply_updates(params, updates), opt_state, dict(stats, loss=loss, zero_grads=zero_grads)

    history = []
    for _ in range(STEPS):
        params, opt_state, stats = step(params, opt_state)
        history.append(jax.device_get(stats))
    return history


def per_objective_loss(stats: dict) -> np.ndarray:
    return stats["loss_sum"] / np.maximum(stats["weight_sum"], 1)


@pytest.mark.parametrize("spec", ["mlm", "clm", "mass", "unilm"])
def test_each_objective_overfits_a_fixed_batch(spec):
    batch, mixture = fixed_batch(spec)
    history = train_on(batch, len(mixture.objectives))
    first, last = history[0], history[-1]
    assert first["zero_grads"] == 0, "some parameter got an all-zero gradient"
    assert last["loss"] < 0.1 * first["loss"], (first["loss"], last["loss"])
    present = first["weight_sum"] > 0
    assert present.all(), f"every leaf of {spec} must be in the batch: {mixture.names}"
    start, end = per_objective_loss(first), per_objective_loss(last)
    for name, a, b in zip(mixture.names, start, end):
        assert b < 0.1 * a, f"{name}: loss {a:.3f} -> {b:.3f}"


def test_bert_with_nsp_and_post_ln_overfits_both_heads():
    batch, mixture = fixed_batch("mlm", {"mlm": {"nsp": True}})
    assert int((batch["nsp_labels"] == 1).sum()) > 0 and int((batch["nsp_labels"] == 0).sum()) > 0
    history = train_on(batch, 1, mixture.loss_terms, pre_layer_norm=False, mlm_transform_head=True)
    first, last = history[0]["terms"]["nsp"], history[-1]["terms"]["nsp"]
    assert history[0]["zero_grads"] == 0
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    assert last["correct_sum"] == last["weight_sum"]
    assert last["loss_sum"] < 0.1 * first["loss_sum"]
