"""Fine-tuning methods: optimizer, schedule and update-mask choices, all inside the
compiled step (nothing recompiles when a layer group unfreezes).

`config.method` names one method or several joined by '+', which compose because
each changes one thing (ULMFiT is 'discriminative+stlr+gradual_unfreezing'):

  full                BERT's recipe: AdamW, linear warmup over `warmup_fraction` of
                      the steps then linear decay to 0, weight decay 0.01 (not on
                      norms and biases), gradient clipping at 1.0.
  probe               the bodies frozen, only the task parameters train (a linear
                      probe); `scalar_mix=True` adds ELMo's learned mix of all layers.
  discriminative      a learning rate per layer group: lr * decay**depth, depth
                      counted from the top (`pretrain.transfer.heads`); ULMFiT's
                      factor is decay = 1/2.6, ELECTRA's 0.8. ELECTRA's code also
                      skips one depth between the head and the top layer (its
                      pooler): `head_gap=1` reproduces that.
  stlr                ULMFiT's slanted triangular learning rate: a linear rise over
                      the first `cut_frac` of the steps, then a linear fall, from
                      lr/ratio to lr and back (fastai's CircularLR form).
  gradual_unfreezing  the top group (the task parameters) trains first, one more
                      group every `every_steps` steps (0: the steps split evenly over
                      the groups); frozen groups get zero gradients and zero updates.
  aux_lm              a pretraining objective (`objective`; empty: the body's own) as
                      an auxiliary loss on the task's own text, its coefficient
                      decaying log-linearly from `start` to `end` over the run
                      (SiATL: 0.2 to 0.1).

Fusion (several bodies) trains like one body: `probe` freezes every body and trains
the gate and head; `full` fine-tunes the bodies, the gate and the head jointly (the
second stage of model stitching: each body pretrained alone, then the fused model
fine-tuned as one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pretrain.optimizer import decay_mask
from pretrain.transfer.heads import parameter_paths, path_of

METHODS = ("full", "probe", "discriminative", "stlr", "gradual_unfreezing", "aux_lm")
ULMFIT_DECAY = 1 / 2.6
ELECTRA_DECAY = 0.8


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the chosen methods change: which parameters train, at what relative rate
    and from which step, the schedule, and the auxiliary loss."""

    methods: tuple[str, ...]
    frozen_bodies: bool
    depth_factors: Mapping[tuple, float] | None  # discriminative: learning-rate factor per parameter
    unfreeze_steps: Mapping[tuple, int] | None  # gradual unfreezing: the step each parameter starts training
    schedule: str  # 'warmup_linear' or 'stlr'
    aux: Mapping[str, Any] | None  # aux_lm settings


def parse_methods(spec: str) -> tuple[str, ...]:
    """'discriminative+stlr' -> ('discriminative', 'stlr'); unknown or clashing methods
    are an error naming them."""
    methods = tuple(dict.fromkeys(m.strip() for m in spec.split("+") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"config.method={spec!r}: {'unknown method ' + repr(unknown[0]) if unknown else 'empty'}; "
                         f"choose from {', '.join(METHODS)}, or join several with '+' (e.g. "
                         "'discriminative+stlr+gradual_unfreezing', ULMFiT)")
    if "probe" in methods and {"discriminative", "gradual_unfreezing"} & set(methods):
        raise ValueError(f"config.method={spec!r}: 'probe' freezes the bodies, so it cannot be combined with "
                         "'discriminative' or 'gradual_unfreezing', which train them")
    return methods


def plan(spec: str, settings: Mapping[str, Mapping[str, Any]], depths: Mapping[tuple, int], total_steps: int
         ) -> Plan:
    """The plan of method spec `spec` with `settings` (config.methods) for parameters at
    `depths` (heads.parameter_depths)."""
    methods = parse_methods(spec)
    frozen = "probe" in methods
    factors = None
    if "discriminative" in methods:
        s = settings["discriminative"]
        if not 0 < s["decay"] <= 1:
            raise ValueError(f"config.methods.discriminative.decay={s['decay']} must lie in (0, 1] "
                             f"(ULMFiT {ULMFIT_DECAY:.4f}, ELECTRA {ELECTRA_DECAY})")
        factors = {path: s["decay"] ** (depth + (s["head_gap"] if depth > 0 else 0)) for path, depth in depths.items()}
    unfreeze = None
    if "gradual_unfreezing" in methods:
        groups = max(depths.values()) + 1
        every = settings["gradual_unfreezing"]["every_steps"] or max(1, total_steps // groups)
        unfreeze = {path: depth * every for path, depth in depths.items()}
    aux = dict(settings["aux_lm"]) if "aux_lm" in methods else None
    if aux is not None and not (aux["start"] > 0 and aux["end"] > 0):
        raise ValueError(f"config.methods.aux_lm start={aux['start']} and end={aux['end']} must be > 0 (SiATL: 0.2 "
                         "and 0.1)")
    return Plan(methods, frozen, factors, unfreeze, "stlr" if "stlr" in methods else "warmup_linear", aux)


def stlr_schedule(peak: float, total_steps: int, cut_frac: float = 0.1, ratio: float = 32.0) -> optax.Schedule:
    """ULMFiT's slanted triangular rate at update t (from 0): p = t / cut below the cut,
    else 1 - (t - cut) / (T - cut); lr = peak * (1 + p (ratio - 1)) / ratio, with
    cut = floor(T cut_frac) (the paper's cut (1/cut_frac - 1) is T - cut when T cut_frac
    is whole)."""
    return _stlr(peak, max(1, math.floor(total_steps * cut_frac)), total_steps, ratio)


def _stlr(peak: Any, cut: Any, total: Any, ratio: float) -> optax.Schedule:
    """STLR from its integer breakpoints, which may be traced (a sweep's hyperparameters)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        p = jnp.where(step < cut, step / cut, 1.0 - (step - cut) / jnp.maximum(total - cut, 1))
        return peak * (1.0 + jnp.clip(p, 0.0, 1.0) * (ratio - 1.0)) / ratio

    return schedule


def warmup_linear_schedule(peak: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
    """BERT's schedule: linear warmup over `warmup_fraction` of the steps, then linear decay to 0."""
    return _warmup_linear(peak, max(1, round(total_steps * warmup_fraction)), total_steps)


def _warmup_linear(peak: Any, warmup: Any, total: Any) -> optax.Schedule:
    """BERT's schedule from its integer breakpoints, which may be traced; the arithmetic
    of optax's linear schedules joined at `warmup`."""

    def schedule(step):
        step = jnp.asarray(step)
        rising = (0.0 - peak) * (1 - jnp.clip(step, 0, warmup) / warmup) + peak
        decay_steps = jnp.maximum(total - warmup, 1)
        falling = peak * (1 - jnp.clip(step - warmup, 0, decay_steps) / decay_steps)
        return jnp.where(step < warmup, rising, falling)

    return schedule


def schedule_points(plan_: Plan, optimizer: Mapping[str, Any], settings: Mapping[str, Any],
                    total_steps: int) -> dict[str, int]:
    """The integer breakpoints of a plan's schedule for a run of `total_steps` (STLR's
    cut, or the warmup, and the total): a sweep passes them as hyperparameters, so one
    compiled program trains runs of any length."""
    if plan_.schedule == "stlr":
        return {"cut": max(1, math.floor(total_steps * settings["stlr"]["cut_frac"])), "total": total_steps}
    return {"warmup": max(1, round(total_steps * optimizer["warmup_fraction"])), "total": total_steps}


def learning_rate(plan_: Plan, optimizer: Mapping[str, Any], settings: Mapping[str, Any],
                  total_steps: int, points: Mapping[str, Any] | None = None) -> optax.Schedule:
    """The base learning-rate schedule of a plan (per-layer factors scale it), at
    `points` (schedule_points; traced in a sweep) or those of `total_steps`."""
    points = points or schedule_points(plan_, optimizer, settings, total_steps)
    if plan_.schedule == "stlr":
        return _stlr(optimizer["learning_rate"], points["cut"], points["total"], settings["stlr"]["ratio"])
    return _warmup_linear(optimizer["learning_rate"], points["warmup"], points["total"])


def _is_trainable(path: tuple, frozen_bodies: bool) -> bool:
    return not (frozen_bodies and path[0] == "bodies")


def make_optimizer(plan_: Plan, params: nnx.State, optimizer: Mapping[str, Any], settings: Mapping[str, Any],
                   total_steps: int, points: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """clip -> AdamW at the plan's schedule -> per-layer factors -> unfreezing masks,
    with the frozen parameters given no optimizer state and exactly zero updates."""
    schedule = learning_rate(plan_, optimizer, settings, total_steps, points)
    chain = [optax.clip_by_global_norm(optimizer["clip_norm"])] if optimizer["clip_norm"] > 0 else []
    if plan_.unfreeze_steps is not None:
        chain.insert(0, _unfrozen_only(_tree_of(params, plan_.unfreeze_steps)))  # frozen groups: no gradient
    chain.append(optax.adamw(schedule, b1=optimizer["b1"], b2=optimizer["b2"], eps=optimizer["eps"],
                             weight_decay=optimizer["weight_decay"], mask=decay_mask))
    if plan_.depth_factors is not None:
        factors = _tree_of(params, plan_.depth_factors)
        chain.append(optax.GradientTransformation(
            lambda _: optax.EmptyState(),
            lambda updates, state, params=None: (jax.tree.map(lambda u, f: u * f, updates, factors), state)))
    if plan_.unfreeze_steps is not None:
        chain.append(_unfrozen_only(_tree_of(params, plan_.unfreeze_steps)))  # and no update (weight decay too)
    labels = _tree_of(params, {path: "train" if _is_trainable(path, plan_.frozen_bodies) else "frozen"
                               for path in parameter_paths(params)})
    return optax.multi_transform({"train": optax.chain(*chain), "frozen": optax.set_to_zero()}, labels)


def _tree_of(params: nnx.State, values: Mapping[tuple, Any]) -> Any:
    """A tree shaped like `params` holding `values[path]` at each leaf."""
    return jax.tree_util.tree_map_with_path(lambda keys, _: values[path_of(keys)], params)


def _unfrozen_only(start_steps: Any) -> optax.GradientTransformation:
    """Zeroes the values of parameters whose start step is not yet reached (its own count)."""

    def init(params):
        return {"count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        count = state["count"]
        masked = jax.tree.map(lambda u, start: jnp.where(count >= start, u, jnp.zeros_like(u)), updates, start_steps)
        return masked, {"count": count + 1}

    return optax.GradientTransformation(init, update)


def aux_coefficient(aux: Mapping[str, Any], step: jax.Array, total_steps: int) -> jax.Array:
    """The auxiliary loss's weight at `step`: log-linear from `start` to `end` over
    `decay_steps` (0: the whole run), then constant."""
    span = aux["decay_steps"] or total_steps
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(span, 1), 0.0, 1.0)
    return jnp.exp(math.log(aux["start"]) + progress * (math.log(aux["end"]) - math.log(aux["start"])))
