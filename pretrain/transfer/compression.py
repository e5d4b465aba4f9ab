"""The comparison's compression columns: each fine-tuned member scored again compressed.

`pretrain.compare` with `config.compression.techniques` reports every pretrained row also
compressed, next to its uncompressed score on the same cells:

  distil        a row of its own: the run distilled into a student of half its layers
                (`pretrain.distill`, DistilBERT's loss) and fine-tuned like any row;
  int8_weights  the fine-tuned model's weights int8 (`pretrain.quantization`), scored;
  int8          weights and the blocks' matmul inputs int8, scored;
  prune         `prune_fraction` of the attention heads removed, `step_fraction` at a time by
                the importance of Michel et al. (`pretrain.pruning`) on the task's training
                batches, scored. The heads are gated off (their output-kernel rows zeroed),
                which computes what the physically pruned model computes (tests/test_pruning.py);
                the size and speed columns come from the physically pruned model.

Post-training techniques score each member's dev-selected parameters on test, so the
retained fraction (compressed / uncompressed test score) is per seed, then mean ± std.
`measure` gives a variant's parameters, bytes on disk (safetensors: float32, or int8
values with float32 scales) and inference tokens per second on this machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain.pruning import least_important, normalized, without_heads
from pretrain.quantization import quantized_model, save_quantized

TECHNIQUES = ("distil", "int8_weights", "int8", "prune")
POST_TRAINING = ("int8_weights", "int8", "prune")  # scored on each fine-tuned member; 'distil' is a row
DISTILLED = "{row}/distilled"  # the name of a row's distilled row


def techniques(spec: str) -> tuple[str, ...]:
    """The techniques of `config.compression.techniques` ('distil,int8_weights,...'), checked."""
    chosen = tuple(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    unknown = [t for t in chosen if t not in TECHNIQUES]
    if unknown:
        raise ValueError(f"config.compression.techniques={spec!r}: {', '.join(unknown)} unknown; choose among "
                         f"{', '.join(TECHNIQUES)}")
    return chosen


def _named(fn: Callable[[str, Any], Any]) -> Callable[[Any], Any]:
    """tree -> tree with `fn(dotted name, leaf)` on each leaf (an nnx Variable's `.value` left out of the name)."""
    def apply(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: fn(".".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path
                                           if not isinstance(k, jax.tree_util.GetAttrKey)), leaf), tree)
    return apply


def out_kernels(params: Any) -> dict[str, np.ndarray]:
    """{attention layer: its output kernel [members, H, K, D]} of stacked member parameters."""
    found = {}
    _named(lambda name, leaf: found.__setitem__(name[: -len(".out_kernel")], leaf)
           if name.endswith("attention.out_kernel") else None)(params)
    return found


def with_mask(params: Any, masks: Mapping[str, jax.Array]) -> Any:
    """Stacked member parameters with each attention layer's output-kernel rows times its
    mask [members, H] (0: a pruned head)."""
    return _named(lambda name, leaf: leaf * masks[name[: -len(".out_kernel")]][:, :, None, None]
                  if name.endswith("attention.out_kernel") else leaf)(params)


@dataclasses.dataclass
class PostTraining:
    """What the sweep needs to score its members compressed: the members' gradient of the
    task loss (for the importances) and an evaluation of the 'int8' models (their bodies
    quantize the matmul inputs)."""

    gradient: Callable[[Any, Any, Any], Any]  # (params, stacked batch, rest) -> gradients
    int8_evaluate: Callable[[Any, Any, Any], Any]  # (params, batch, rest) -> evaluation outputs


def post_training(graphdef: nnx.GraphDef, example: nnx.Module, task_functions: Callable) -> PostTraining:
    """The compiled functions of `PostTraining` for task models of `graphdef` (`example`: one
    of them); `task_functions(graphdef, rest, quantize=...)` gives a kind's functions."""
    quantized_graphdef = nnx.split(quantized_model(example, "int8"), nnx.Param, ...)[0]

    def gradient(params, batch, rest):
        loss_fn, totals_fn, _ = task_functions(graphdef, rest)
        totals = jax.tree.map(lambda total: jnp.maximum(total, 1.0), totals_fn(batch))
        return jax.grad(lambda p: loss_fn(p, batch, totals, 0)[0])(params)

    def int8_evaluate(params, batch, rest):
        return task_functions(quantized_graphdef, rest, quantize="int8")[2](params, batch)

    return PostTraining(jax.jit(jax.vmap(gradient)), jax.jit(jax.vmap(int8_evaluate, in_axes=(0, None, 0))))


def pruned_masks(functions: PostTraining, params: Any, rest: Any, batches: Sequence[Any], *, fraction: float,
                 step_fraction: float) -> dict[str, np.ndarray]:
    """Each member's head masks ({layer: [members, H]}) after pruning `fraction` of all heads,
    `step_fraction` at a time (`pretrain.pruning`'s iteration, with masks): the importances
    are recomputed at each step with the heads so far gated off, and a gated head is never
    chosen again."""
    kernels = {name: np.asarray(value) for name, value in out_kernels(params).items()}
    members = next(iter(kernels.values())).shape[0]
    masks = {name: np.ones(value.shape[:2], np.float32) for name, value in kernels.items()}
    total = sum(value.shape[1] for value in kernels.values())
    goal, per_step, removed = math.floor(fraction * total), max(1, round(step_fraction * total)), 0
    while removed < goal:
        masked = with_mask(params, {k: jnp.asarray(v) for k, v in masks.items()})
        importance = {name: np.zeros(mask.shape, np.float64) for name, mask in masks.items()}
        for batch in batches:
            grads = out_kernels(functions.gradient(masked, batch, rest))
            for name in importance:
                importance[name] += np.abs(np.einsum("mhkd,mhkd->mh", kernels[name].astype(np.float64),
                                                     np.asarray(grads[name], np.float64)))
        count = min(per_step, goal - removed)
        for member in range(members):
            mine = normalized({name: values[member] for name, values in importance.items()})
            mine = {name: np.where(masks[name][member] > 0, values, np.inf) for name, values in mine.items()}
            for name, heads in least_important(mine, count).items():
                masks[name][member, heads] = 0.0
        removed += count
    return masks


def measure(model: nnx.Module, technique: str, masks: Mapping[str, np.ndarray] | None, batch: Mapping[str, Any],
            repeats: int = 5) -> dict[str, float]:
    """Parameters, bytes on disk and inference tokens/s of one fine-tuned model compressed
    by `technique` ('none' or a POST_TRAINING one; `masks` of member 0 for 'prune').
    The pruned model is built physically smaller; the int8 models run as they are scored."""
    from pretrain.hf.models import flat_params

    flat = flat_params(model)
    if technique == "prune":
        removed = {name: [int(h) for h in np.flatnonzero(mask[0] == 0)] for name, mask in masks.items()}
        flat = without_heads(flat, removed)
        model = _pruned_model(model, flat)
    elif technique in ("int8_weights", "int8"):
        model = quantized_model(model, technique)
    with tempfile.TemporaryDirectory() as directory:
        stored = save_quantized(flat, os.path.join(directory, "model.safetensors"),
                                technique if technique in ("int8_weights", "int8") else None)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p, rest)(b)[0])
    jax.block_until_ready(forward(params, batch))  # compiled
    started = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(forward(params, batch))
    seconds = (time.perf_counter() - started) / repeats
    tokens = float(np.sum(np.asarray(batch["segment_ids"]) > 0))
    return {"parameters": int(sum(v.size for v in flat.values())), "bytes": int(stored),
            "tokens_per_second": tokens / seconds}


def _pruned_model(model: nnx.Module, flat: Mapping[str, np.ndarray]) -> nnx.Module:
    """A task model like `model` whose bodies keep the heads `flat` holds."""
    from pretrain.hf.models import set_flat_params
    from pretrain.model import create_model
    from pretrain.pruning import heads_kept

    copy = nnx.clone(model)
    for index, body in enumerate(copy.bodies):
        kept = heads_kept(flat, f"bodies.{index}.")
        copy.bodies[index] = create_model(dataclasses.replace(body.config, heads_per_layer=kept, scan_layers=False))
    set_flat_params(copy, flat)
    return copy
