"""AdamW with warmup and decay, global-norm clipping, and no decay on norms and biases."""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           decay: str = "cosine", end_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then `decay` to
    `end_factor * peak` at `total_steps` (or constant)."""
    if decay not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={decay!r} is not one of {SCHEDULES}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"config.optimizer.warmup_steps={warmup_steps} must lie in 0..total_steps={total_steps}")
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    remaining = max(total_steps - warmup_steps, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak, remaining, alpha=end_factor)
    elif decay == "linear":
        after = optax.linear_schedule(peak, peak * end_factor, remaining)
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for matrices and embeddings (decayed), False for LayerNorm scales and
    biases (vectors), following BERT."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                   end_factor: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """The training optimizer: clip by global norm (if `clip_norm` > 0), then AdamW."""
    lr = learning_rate_schedule(learning_rate, warmup_steps, total_steps, schedule, end_factor)
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw
