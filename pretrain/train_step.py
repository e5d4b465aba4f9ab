"""One optimisation step, for `jax.jit` over a mesh (pjit) or for `jax.pmap`, and the
evaluation step that takes the same loss without gradients.

The loss of a batch is a ratio of sums (weighted token cross-entropy over the total
weight, plus each loss term's sum over the positions where it is taken), so the step computes the
global denominators first and then differentiates sums divided by them. That makes
gradient accumulation over k micro-batches, sharding over any mesh, and pmap's
cross-device sum all give the gradient of the one loss of the whole global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from objectives.terms import LossTerm
from pretrain.loss import batch_loss, counts, denominators, step_token_statistics

Batch = Mapping[str, jax.Array]
TrainState = dict[str, Any]  # {'params', 'opt_state', 'step'}


def initial_state(optimizer: optax.GradientTransformation, params: nnx.State) -> TrainState:
    """The training state a run starts from: `params`, the optimizer's fresh state, step 0."""
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def make_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State, num_objectives: int,
                 statistics: Callable = step_token_statistics, terms: Sequence[LossTerm] = ()) -> LossFn:
    """loss(params, batch, totals, step) -> (this batch's share of the global loss,
    statistics sums): `pretrain.loss.batch_loss` over parameters, with the objectives'
    loss `terms`; `totals` are the global `pretrain.loss.counts`."""

    def loss_fn(params, batch, totals, step):
        del step  # the pretraining loss does not change over the run
        return batch_loss(nnx.merge(graphdef, params, rest), batch, num_objectives, totals, terms=terms,
                          statistics=statistics)

    return loss_fn


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, num_objectives: int, terms: Sequence[LossTerm] = ()
                   ) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
    """eval_step(params, batch) -> statistics sums (per objective, and per loss term):
    the same loss as training, forward only, vocabulary logits at the weighted
    positions only. The trainer's held-out evaluation and `pretrain.evaluate` both use it."""
    loss_fn = make_loss_fn(graphdef, rest, num_objectives, terms=terms)

    def eval_step(params, batch):
        return loss_fn(params, batch, denominators(batch, terms), step=0)[1]

    return eval_step


# loss(params, batch, totals, step) -> (loss, statistics sums); totals are global
# denominators, so shares of a batch (micro-batches, devices) add up to its loss.
LossFn = Callable[[nnx.State, Batch, Any, jax.Array], tuple[jax.Array, dict]]


def accumulated_gradients(loss_fn: LossFn, params, batch: Batch, totals, step, accumulation_steps: int):
    """(loss, grads, stats) summed over `accumulation_steps` equal micro-batches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accumulation_steps == 1:
        (loss, stats), grads = grad_fn(params, batch, totals, step)
        return loss, grads, stats
    micro = jax.tree.map(lambda x: x.reshape(accumulation_steps, -1, *x.shape[1:]), dict(batch))

    def body(carry, microbatch):
        (loss, stats), grads = grad_fn(params, microbatch, totals, step)
        return jax.tree.map(jnp.add, carry, (loss, grads, stats)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: (lambda out: (out[0][0], out[1], out[0][1]))(
            grad_fn(params, jax.tree.map(lambda x: x[0], micro), totals, step))))
    (loss, grads, stats), _ = jax.lax.scan(body, zero, micro)
    return loss, grads, stats


def make_step(loss_fn: LossFn, totals_fn: Callable[[Batch], Any], optimizer: optax.GradientTransformation,
              accumulation_steps: int = 1, axis_name: str | None = None):
    """step(state, batch) -> (state, metrics) for any loss: the denominators
    `totals_fn(batch)` are summed over the whole global batch (across devices under
    pmap's `axis_name`) and floored at 1 before the loss divides by them, then the
    gradients of the micro-batches (and devices) are added and applied."""

    def step(state: TrainState, batch: Batch):
        totals = totals_fn(batch)
        if axis_name is not None:
            totals = jax.lax.psum(totals, axis_name)
        totals = jax.tree.map(lambda total: jnp.maximum(total, 1.0), totals)
        loss, grads, stats = accumulated_gradients(loss_fn, state["params"], batch, totals, state["step"],
                                                   accumulation_steps)
        if axis_name is not None:
            loss, grads, stats = jax.lax.psum((loss, grads, stats), axis_name)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(stats, loss=loss, grad_norm=optax.tree.norm(grads))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, optimizer: optax.GradientTransformation,
                    num_objectives: int, accumulation_steps: int = 1, axis_name: str | None = None,
                    statistics: Callable = step_token_statistics, terms: Sequence[LossTerm] = ()):
    """The pretraining step: `make_step` over the pretraining loss with the objectives'
    loss `terms`. With `axis_name` (pmap), each device holds a slice of the batch and
    the sums are added across the axis. `statistics`: see make_loss_fn."""
    return make_step(make_loss_fn(graphdef, rest, num_objectives, statistics, terms),
                     functools.partial(counts, terms=terms), optimizer, accumulation_steps, axis_name)
