"""The pretraining loss: weighted token cross-entropy, plus the objectives' loss terms.

The model owns the loss; objectives only say where it is taken (`weights`) and
which objective made each token (`objective_id`), so per-objective loss and
accuracy come out of one pass for any mixture. `batch_loss` is the one loss
function; it takes the token loss through `weighted_token_statistics`, which
computes vocabulary logits at the weighted positions only; `token_statistics` is
the same quantity from full logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from objectives.terms import LossTerm, as_uniform
from pretrain.model import Transformer, tied_logits

Batch = Mapping[str, jax.Array]


def token_statistics(
    logits: jax.Array,  # float [B, L, V]
    targets: jax.Array,  # int [B, L]
    weights: jax.Array,  # float [B, L]
    objective_id: jax.Array,  # int [B, L]
    num_objectives: int,
) -> dict[str, jax.Array]:
    """Per-objective sums [num_objectives]: `loss_sum`, `correct_sum`, `weight_sum`."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    one_hot = jax.nn.one_hot(objective_id, num_objectives, dtype=jnp.float32) * weights[..., None]
    return {
        "loss_sum": jnp.einsum("bl,blo->o", losses, one_hot),
        "correct_sum": jnp.einsum("bl,blo->o", correct, one_hot),
        "weight_sum": one_hot.sum(axis=(0, 1)),
    }


def full_logits_statistics(model: Transformer, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                           objective_id: jax.Array, num_objectives: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`weighted_token_statistics` computed from the full [B, L, V] logits with
    plain autodiff: the reference it is tested against, and the baseline the
    benchmarks compare it with."""
    stats = token_statistics(model.logits(hidden), targets, weights, objective_id, num_objectives)
    return stats["loss_sum"].sum(), stats


def step_token_statistics(model: Transformer, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                          objective_id: jax.Array, num_objectives: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The token loss a training step takes on this backend (decided when traced):
    on CPU `weighted_token_statistics`, whose hand-derived head gradient was
    measured to help there (README, Performance); on accelerators the plain
    formulation, `full_logits_statistics`, until a benchmark on that backend
    shows otherwise (`benchmarks/throughput.py --loss_head` times both)."""
    if jax.default_backend() == "cpu":
        return weighted_token_statistics(model, hidden, targets, weights, objective_id, num_objectives)
    return full_logits_statistics(model, hidden, targets, weights, objective_id, num_objectives)


def _chunk_statistics(logits: jax.Array, targets: jax.Array, weights: jax.Array, objective_id: jax.Array,
                      num_objectives: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """Statistics sums of one chunk of logits [..., V], and d(sum of weighted
    cross-entropies)/d logits. Written for few passes over the logits: the
    exponentials are taken once and kept for the gradient (a chunk fits in the
    cache; recomputing them was slower for CLM), and argmax (which
    XLA CPU runs as a slow value-and-index reduction) becomes two fused
    comparisons."""
    maximum = jnp.max(logits, axis=-1, keepdims=True)
    exponentials = jnp.exp(logits - maximum)
    normalizer = jnp.sum(exponentials, axis=-1, keepdims=True)
    log_normalizer = maximum + jnp.log(normalizer)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    losses = (log_normalizer - target_logit)[..., 0]
    vocabulary = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    # jnp.argmax(logits) == target: the target is maximal and no lower id is.
    earlier_maximum = jnp.any((logits == maximum) & (vocabulary < targets[..., None]), axis=-1)
    correct = ((target_logit == maximum)[..., 0] & ~earlier_maximum).astype(jnp.float32)
    one_hot = jax.nn.one_hot(objective_id, num_objectives, dtype=jnp.float32) * weights[..., None]
    stats = {
        "loss_sum": jnp.einsum("...,...o->o", losses, one_hot),
        "correct_sum": jnp.einsum("...,...o->o", correct, one_hot),
        "weight_sum": one_hot.reshape(-1, num_objectives).sum(axis=0),
    }
    is_target = (vocabulary == targets[..., None]).astype(logits.dtype)
    d_logits = exponentials * (weights[..., None] / normalizer) - is_target * weights[..., None]
    return stats, d_logits


def weighted_token_statistics(
    model: Transformer,
    hidden: jax.Array,  # [B, L, D]
    targets: jax.Array,  # int [B, L]
    weights: jax.Array,  # float [B, L]
    objective_id: jax.Array,  # int [B, L]
    num_objectives: int,
    chunk_tokens: int = 512,
    every_position: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum of weighted token cross-entropies, statistics sums), with vocabulary
    logits computed only where `weights` is non-zero (`every_position`: at every
    position, as a dense head does, with the same result; the benchmarks' like-for-like
    step against a peer that computes them all).

    Equal to `token_statistics(model.logits(hidden), ...)` (its `loss_sum` summed
    for the first element) up to float rounding, and so is the gradient. Only
    the weighted positions carry a loss (about 15% of the tokens for MLM and
    UniLM, a third for MASS), so the output projection, the softmax and their
    gradients run on those alone: the weighted positions are moved to the front
    and the head runs over `chunk_tokens` of them at a time, for as many chunks
    as there are weighted tokens. The gradient with respect to the head and
    `hidden` is computed in that same pass (a custom VJP), so no [B, L, V] array
    is kept for the backward pass. The statistics are not differentiated.
    512-token chunks: smaller ones add the [D, V] embedding-gradient sum once
    more per chunk (`benchmarks/profile_step.py --objective=clm
    --chunk_tokens=128` times the alternative; README, Performance).

    The rows are compacted in `gcd(B, device count)` groups, so that a batch
    sharded over devices compacts each device's rows where they are (one group
    on a single device).
    """
    head = model.output_head()
    if head.transform is None:
        transform, transform_state = None, {}
    else:
        graphdef, transform_state = nnx.split(head.transform)
        transform = lambda state, h: nnx.merge(graphdef, state)(h)
    return vocabulary_statistics(transform, transform_state, head.token_embedding[...], head.bias(), hidden, targets,
                                 weights, objective_id, num_objectives, model.config.compute_dtype, chunk_tokens,
                                 every_position)


def vocabulary_statistics(
    transform: Callable | None,
    transform_state: nnx.State | dict,
    embedding: jax.Array,  # [V, D], the tied output projection
    bias: jax.Array,  # [V]
    hidden: jax.Array,  # [B, L, D]
    targets: jax.Array,  # int [B, L]
    weights: jax.Array,  # float [B, L]
    objective_id: jax.Array,  # int [B, L]
    num_objectives: int,
    dtype: jnp.dtype,
    chunk_tokens: int = 512,
    every_position: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`weighted_token_statistics` for any vocabulary head: `transform(transform_state,
    h)` (or none) then the tied projection `embedding` plus `bias`. A loss term that
    predicts tokens from its own representations (SpanBERT's span boundary head) takes
    its loss through this too, with the same chunked head and hand-written gradient."""
    grouped, chunk = _grouping(*weights.shape, chunk_tokens)
    head_loss = _head_loss(transform, dtype, num_objectives, chunk, every_position)
    total, stats = head_loss(transform_state, embedding, bias, grouped(hidden), grouped(targets), grouped(weights),
                             grouped(objective_id))
    return total, jax.lax.stop_gradient(stats)


def _computed_first(computed: jax.Array, chunk: int) -> tuple[jax.Array, int, jax.Array]:
    """(order, padded, chunks) for a head run over the `computed` positions of each
    group [G, N] only: `order` [G, padded] lists each group's computed positions first
    (in order) then the rest, padded with 0s to a whole number of `chunk`s; `chunks`
    is how many chunks hold every group's computed positions."""
    length = computed.shape[1]
    padded = -(-length // chunk) * chunk
    order = jnp.pad(jnp.argsort(~computed, axis=1, stable=True), ((0, 0), (0, padded - length)))
    return order, padded, -(-jnp.max(jnp.sum(computed, axis=1)) // chunk)


def _grouping(rows: int, length: int, chunk_tokens: int) -> tuple[Callable[[jax.Array], jax.Array], int]:
    """(x [B, L, ...] -> [G, B/G * L, ...], chunk): rows compacted in gcd(B, device
    count) groups, so a batch sharded over devices compacts each device's rows where
    they are, and the chunk each group's head runs over."""
    groups = math.gcd(rows, jax.device_count())
    grouped = lambda x: x.reshape(groups, rows // groups * length, *x.shape[2:])  # noqa: E731
    return grouped, min(rows // groups * length, max(1, chunk_tokens // groups))


def vocabulary_samples(
    transform: Callable | None,
    transform_state: nnx.State | dict,
    embedding: jax.Array,  # [V, E]
    bias: jax.Array,  # [V]
    hidden: jax.Array,  # [B, L, D]
    draws: jax.Array,  # int [B, L], 0: no sample here
    dtype: jnp.dtype,
    chunk_tokens: int = 512,
) -> jax.Array:
    """int32 [B, L]: at each position with a draw (`objectives.terms.uniform_draws`), a
    token sampled from the softmax of the vocabulary head of `vocabulary_statistics`,
    by the inverse of its cumulative distribution at `as_uniform(draw)`; 0 elsewhere.
    Forward only (no gradient flows through a sample), and like the loss the head runs
    over chunks of the drawn positions alone."""
    rows, length = draws.shape
    grouped, chunk = _grouping(rows, length, chunk_tokens)
    hidden, draws = grouped(hidden), grouped(draws)
    order, padded, chunks = _computed_first(draws != 0, chunk)
    sorted_uniforms = as_uniform(jnp.take_along_axis(draws, order, axis=1).astype(jnp.float32))

    def body(index, samples):
        start = index * chunk
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # noqa: E731
        h = jnp.take_along_axis(hidden, take(order)[..., None], axis=1)
        t = h if transform is None else transform(transform_state, h)
        cumulative = jnp.cumsum(jax.nn.softmax(tied_logits(t, embedding, bias, dtype), axis=-1), axis=-1)
        chosen = jnp.sum(cumulative < take(sorted_uniforms)[..., None], axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(samples, jnp.minimum(chosen, embedding.shape[0] - 1), start, 1)

    samples = jax.lax.fori_loop(0, chunks, body, jnp.zeros(order.shape, jnp.int32))
    inverse = jnp.argsort(order[:, :draws.shape[1]], axis=1)
    samples = jnp.where(draws != 0, jnp.take_along_axis(samples, inverse, axis=1), 0)
    return jax.lax.stop_gradient(samples.reshape(rows, length))


def _head_pass(transform: Callable | None, dtype: jnp.dtype, transform_state: nnx.State, embedding: jax.Array,
               bias: jax.Array, hidden: jax.Array, targets: jax.Array, weights: jax.Array, objective_id: jax.Array,
               num_objectives: int, chunk: int, every_position: bool, with_gradients: bool):
    """The chunked head over the weighted positions of each group [G, N], or over
    all of them with `every_position` (see weighted_token_statistics): statistics,
    and with `with_gradients` d(loss sum)/d(transform state, embedding, bias, hidden).

    The projection's gradients are written out: the embedding's is summed
    transposed, [D, V], and transposed once at the end, so no chunk's [C, V]
    logit gradient is ever transposed (XLA CPU copies an operand for that)."""
    groups, length = weights.shape
    order, padded, chunks = _computed_first(jnp.ones_like(weights, bool) if every_position else weights != 0, chunk)
    sorted_weights = jnp.where(jnp.arange(padded) < length,  # padding slots weigh 0
                               jnp.take_along_axis(weights, order, axis=1), 0.0)
    sorted_targets = jnp.take_along_axis(targets, order, axis=1)
    sorted_objectives = jnp.take_along_axis(objective_id, order, axis=1)
    tokens = ((0, 1), (0, 1))

    def body(index, carry):
        stats, gradients = carry
        start = index * chunk
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
        h = jnp.take_along_axis(hidden, take(order)[..., None], axis=1)
        if transform is None:
            t = h
        elif with_gradients:
            t, transform_vjp = jax.vjp(transform, transform_state, h)
        else:
            t = transform(transform_state, h)
        logits = tied_logits(t, embedding, bias, dtype)
        chunk_stats, d_logits = _chunk_statistics(logits, take(sorted_targets), take(sorted_weights),
                                                  take(sorted_objectives), num_objectives)
        stats = jax.tree.map(jnp.add, stats, chunk_stats)
        if not with_gradients:
            return stats, gradients
        d_state, d_embedding_t, d_bias, d_sorted = gradients
        d_compute = d_logits.astype(dtype)
        d_t = d_compute @ embedding.astype(dtype)
        d_embedding_t = d_embedding_t + jax.lax.dot_general(t, d_compute, (tokens, ((), ()))).astype(jnp.float32)
        d_bias = d_bias + d_logits.sum(axis=(0, 1))
        if transform is None:
            d_h = d_t
        else:
            d_state_chunk, d_h = transform_vjp(d_t)
            d_state = jax.tree.map(jnp.add, d_state, d_state_chunk)
        d_sorted = jax.lax.dynamic_update_slice_in_dim(d_sorted, d_h.astype(d_sorted.dtype), start, axis=1)
        return stats, (d_state, d_embedding_t, d_bias, d_sorted)

    zeros = jnp.zeros((num_objectives,), jnp.float32)
    stats = {"loss_sum": zeros, "correct_sum": zeros, "weight_sum": zeros}
    gradients = None
    if with_gradients:
        gradients = (jax.tree.map(jnp.zeros_like, transform_state), jnp.zeros(embedding.shape[::-1], jnp.float32),
                     jnp.zeros_like(bias), jnp.zeros((groups, padded, hidden.shape[-1]), hidden.dtype))
    stats, gradients = jax.lax.fori_loop(0, chunks, body, (stats, gradients))
    if not with_gradients:
        return stats, None
    d_state, d_embedding_t, d_bias, d_sorted = gradients
    inverse = jnp.argsort(order[:, :length], axis=1)  # slot of each position; unweighted ones got 0
    d_hidden = jnp.take_along_axis(d_sorted, inverse[..., None], axis=1)
    return stats, (d_state, d_embedding_t.T.astype(embedding.dtype), d_bias, d_hidden)


def _head_loss(transform: Callable | None, dtype: jnp.dtype, num_objectives: int, chunk: int,
               every_position: bool = False) -> Callable:
    """f(transform state, embedding, bias, hidden, targets, weights, objective_id),
    over groups [G, N] -> (loss sum, statistics), differentiable in the first four."""
    run = functools.partial(_head_pass, transform, dtype, num_objectives=num_objectives, chunk=chunk,
                            every_position=every_position)

    @jax.custom_vjp
    def head_loss(transform_state, embedding, bias, hidden, targets, weights, objective_id):
        stats, _ = run(transform_state, embedding, bias, hidden, targets, weights, objective_id,
                       with_gradients=False)
        return stats["loss_sum"].sum(), stats

    def forward(transform_state, embedding, bias, hidden, targets, weights, objective_id):
        stats, gradients = run(transform_state, embedding, bias, hidden, targets, weights, objective_id,
                               with_gradients=True)
        return (stats["loss_sum"].sum(), stats), gradients

    def backward(gradients, cotangents):
        scale = cotangents[0]  # the statistics are outputs without gradients
        return (*jax.tree.map(lambda g: g * scale.astype(g.dtype), gradients), None, None, None)

    head_loss.defvjp(forward, backward)
    return head_loss


def prepares_input(model: Transformer, term: LossTerm) -> bool:
    """Whether `term`'s head runs before the body and rewrites what it reads (a head
    with a `prepare` method, `pretrain.heads`), rather than reading its hidden states."""
    return hasattr(model.head(term.head), "prepare")


def prepared_batch(model: Transformer, batch: Batch, terms: Sequence[LossTerm], *, deterministic: bool = True
                   ) -> tuple[Batch, dict[str, dict[str, jax.Array]]]:
    """(the batch the body reads, {term: statistics sums}) after the heads that run
    before the body, in declared order: each may rewrite fields of the batch (ELECTRA's
    generator puts its samples into `inputs`) and takes its own term's statistics."""
    prepared = {}
    for term in terms:
        if prepares_input(model, term):
            batch, prepared[term.name] = model.head(term.head).prepare(model, batch, term,
                                                                       deterministic=deterministic)
    return batch, prepared


def term_statistics(model: Transformer, hidden: jax.Array, batch: Batch, terms: Sequence[LossTerm]
                    ) -> dict[str, dict[str, jax.Array]]:
    """{term name: scalar sums `loss_sum`, `correct_sum`, `weight_sum`} of each declared
    loss term whose head reads the body's hidden states (`pretrain.heads`)."""
    return {term.name: model.head(term.head).statistics(model, hidden, batch, term) for term in terms
            if not prepares_input(model, term)}


def counts(batch: Batch, terms: Sequence[LossTerm] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total token weight, {term name: positions where it is taken}) of a batch: the
    sums a step adds across devices before it divides by them."""
    taken = {term.name: (batch[term.marker[0]] != term.marker[1]).sum().astype(jnp.float32) for term in terms}
    return batch["weights"].sum(), taken


def denominators(batch: Batch, terms: Sequence[LossTerm] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`counts` of a batch, each at least 1: the loss's denominators for this batch alone."""
    return jax.tree.map(lambda total: jnp.maximum(total, 1.0), counts(batch, terms))


def batch_loss(
    model: Transformer,
    batch: Batch,
    num_objectives: int,
    totals: tuple[jax.Array, dict[str, jax.Array]] | None = None,
    *,
    terms: Sequence[LossTerm] = (),
    deterministic: bool = True,
    statistics: Callable = weighted_token_statistics,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, statistics sums) of a packed batch: the one loss of the project, which
    training, evaluation and the tests all take.

    loss = sum of weighted token cross-entropies / token_total, plus for each of the
    objectives' loss `terms` (`objectives.terms`) its weight x its summed loss / its
    own total (under `stats['terms'][name]`). Heads that run before the body (a
    generator that rewrites the inputs, `prepared_batch`) run first, and the body
    reads the batch they leave. `totals` are the global denominators
    (`denominators` of the whole global batch) when this batch is one micro-batch or
    one device's share, so the shares add up to the loss of the global batch; by
    default they are this batch's own. `statistics` computes the token loss from the
    hidden states: vocabulary logits at the weighted positions only
    (`weighted_token_statistics`), or `full_logits_statistics`, the reference. The
    statistics are sums, so they add up across devices and accumulation steps.
    """
    totals = denominators(batch, terms) if totals is None else totals
    batch, prepared = prepared_batch(model, batch, terms, deterministic=deterministic)
    hidden = model(batch, deterministic=deterministic)
    return loss_of_hidden(model, hidden, batch, prepared, num_objectives, totals, terms=terms, statistics=statistics)


def loss_of_hidden(
    model: Transformer,
    hidden: jax.Array,
    batch: Batch,
    prepared: Mapping[str, dict[str, jax.Array]],
    num_objectives: int,
    totals: tuple[jax.Array, dict[str, jax.Array]],
    *,
    terms: Sequence[LossTerm] = (),
    statistics: Callable = weighted_token_statistics,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`batch_loss` from the body's hidden states [B, L, D] of the `prepared_batch`
    `batch` (with the prepared heads' statistics `prepared`): for a caller that runs
    the body itself and reads more of it than the last layer (distillation)."""
    token_total, term_totals = totals
    loss_sum, stats = statistics(model, hidden, batch["targets"], batch["weights"], batch["objective_id"],
                                 num_objectives)
    loss = loss_sum / token_total
    if terms:
        taken = {**prepared, **term_statistics(model, hidden, batch, terms)}
        stats["terms"] = {term.name: taken[term.name] for term in terms}
        for term in terms:
            loss = loss + term.weight * stats["terms"][term.name]["loss_sum"] / term_totals[term.name]
    return loss, stats
