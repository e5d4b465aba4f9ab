"""AdamW with warmup and decay, global-norm clipping, and no decay on norms and biases.

`settings_problems` is the one home of the rules for `config.optimizer`; the
config checks report them before training and `make_optimizer` enforces them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import optax

from pretrain.errors import raise_problems

SCHEDULES = ("cosine", "linear", "constant")


def settings_problems(settings: Mapping[str, Any], total_steps: int) -> list[str]:
    """Every problem of the optimizer settings (`config.optimizer` fields; those
    absent are not checked) for a run of `total_steps`, naming field and fix."""
    problems, get = [], settings.get
    warmup = get("warmup_steps")
    if warmup is not None and isinstance(total_steps, int) and not 0 <= warmup <= total_steps:
        problems.append(f"config.optimizer.warmup_steps={warmup} must lie in 0..config.total_steps={total_steps}")
    if get("schedule") is not None and get("schedule") not in SCHEDULES:
        problems.append(f"config.optimizer.schedule={get('schedule')!r} must be one of {SCHEDULES}")
    rate = get("learning_rate")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        problems.append(f"config.optimizer.learning_rate={rate!r} must be a finite number > 0 (1e-4 .. 1e-3 is usual)")
    intervals = (("end_factor", lambda v: 0 <= v <= 1, "[0, 1]"), ("b1", lambda v: 0 <= v < 1, "[0, 1)"),
                 ("b2", lambda v: 0 <= v < 1, "[0, 1)"), ("eps", lambda v: v > 0, "(0, inf)"),
                 ("weight_decay", lambda v: v >= 0, "[0, inf)"),
                 ("clip_norm", lambda v: v >= 0, "[0, inf) (0 turns clipping off)"))
    problems += [f"config.optimizer.{name}={get(name)!r} must lie in {interval}"
                 for name, ok, interval in intervals if get(name) is not None and not ok(get(name))]
    return problems


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           decay: str = "cosine", end_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then `decay` to
    `end_factor * peak` at `total_steps` (or constant)."""
    raise_problems(settings_problems({"schedule": decay, "warmup_steps": warmup_steps}, total_steps))
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
    raise_problems(settings_problems(dict(learning_rate=learning_rate, warmup_steps=warmup_steps, schedule=schedule,
                                          end_factor=end_factor, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                          clip_norm=clip_norm), total_steps))
    lr = learning_rate_schedule(learning_rate, warmup_steps, total_steps, schedule, end_factor)
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw
