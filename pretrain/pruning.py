"""Attention-head pruning of a fine-tuned model (Michel et al. 2019, "Are Sixteen Heads
Really Better than One?"; the procedure of their code and of Hugging Face's bertology).

    python -m pretrain.pruning --finetuned=runs/mlm-topic --out=runs/mlm-topic-pruned \
        [--target=0.5] [--step_fraction=0.1] [--importance_batches=16]

Importance. A head's importance is |dL/d xi_h| for a gate xi_h on its output, at xi = 1,
summed over batches of the task's training split (the loss's expectation in the paper).
Scaling head h's output by xi_h scales its rows of the attention output kernel (not the
bias), so dL/d xi_h = sum(W_out[h] * dL/dW_out[h]): the gradient the step computes
anyway, with no gate in the model. As the paper and both codes do, each layer's
importances are divided by their L2 norm (`normalize_by_layer`).

Iteration (the codes' `mask_heads`): compute the importances of the heads still there,
remove the `step_fraction` of all heads (at least one) of lowest importance, score dev
and test, repeat until `target` of the heads are gone. Removed heads leave the parameters:
their slices of the QKV kernel and bias and of the attention output kernel are cut out,
and the layer keeps fewer heads (`model.heads_per_layer`), so the stored model is smaller
(not a mask). `pruning.json` records each step: the heads each layer kept, the
parameters, and the dev and test scores; the last step's parameters are written as
safetensors.

Deviation: the importances are taken on the training split (bertology takes them on the
evaluation data it then scores), so the heads are chosen without looking at dev or test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from pretrain import cli

ATTENTION = "attention"


def attention_layers(flat: Mapping[str, np.ndarray]) -> list[str]:
    """The prefixes (`bodies.0.blocks.3.attention`, `blocks.3.attention`) of every
    attention layer in flat parameters, in order."""
    return [name[: -len(".out_kernel")] for name in flat if name.endswith(f"{ATTENTION}.out_kernel")]


def head_importance(params: Mapping[str, np.ndarray], gradients: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{attention layer: |dL/d xi| per head} of one batch's gradient: sum(W_out[h] * grad[h])."""
    out = {}
    for layer in attention_layers(params):
        kernel, gradient = params[f"{layer}.out_kernel"], gradients[f"{layer}.out_kernel"]
        out[layer] = np.abs(np.einsum("hkd,hkd->h", kernel.astype(np.float64), gradient.astype(np.float64)))
    return out


def normalized(importance: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's importances divided by their L2 norm (Michel et al.; bertology's default)."""
    return {layer: values / (np.sqrt((values ** 2).sum()) + 1e-20) for layer, values in importance.items()}


def least_important(importance: Mapping[str, np.ndarray], count: int) -> dict[str, list[int]]:
    """{layer: heads (current indices)} of the `count` lowest importances over all layers
    (ties: earlier layer, then lower head first)."""
    order = {layer: position for position, layer in enumerate(importance)}
    ranked = sorted((float(value), order[layer], index, layer) for layer, values in importance.items()
                    for index, value in enumerate(values))
    chosen: dict[str, list[int]] = {}
    for _, _, index, layer in ranked[:count]:
        chosen.setdefault(layer, []).append(index)
    return chosen


def without_heads(flat: Mapping[str, np.ndarray], removed: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Flat parameters with the heads `removed` ({attention layer: head indices}) cut out
    of the QKV kernel [D, 3, H, K] and bias [3, H, K] and the output kernel [H, K, D]."""
    out = dict(flat)
    for layer, heads in removed.items():
        heads_now = flat[f"{layer}.out_kernel"].shape[0]
        keep = [h for h in range(heads_now) if h not in set(heads)]
        out[f"{layer}.qkv_kernel"] = flat[f"{layer}.qkv_kernel"][:, :, keep]
        out[f"{layer}.qkv_bias"] = flat[f"{layer}.qkv_bias"][:, keep]
        out[f"{layer}.out_kernel"] = flat[f"{layer}.out_kernel"][keep]
    return out


def masked(flat: Mapping[str, np.ndarray], removed: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Flat parameters with the heads `removed` gated off (their output kernel rows zero):
    the model `without_heads` computes, at full size."""
    out = dict(flat)
    for layer, heads in removed.items():
        kernel = np.array(flat[f"{layer}.out_kernel"])
        kernel[list(heads)] = 0
        out[f"{layer}.out_kernel"] = kernel
    return out


def heads_kept(flat: Mapping[str, np.ndarray], prefix: str) -> tuple[int, ...]:
    """The heads of each layer of the body whose blocks are under `prefix` (`bodies.0.`)."""
    layers = [layer for layer in attention_layers(flat) if layer.startswith(f"{prefix}blocks.")]
    return tuple(flat[f"{layer}.out_kernel"].shape[0] for layer in layers)


# -- the procedure on a fine-tuned run ---------------------------------------------------------

@dataclasses.dataclass
class Pruned:
    """One step of the iteration: the heads kept, the model's size and its scores."""

    step: int
    removed_fraction: float
    heads_per_layer: list[list[int]]  # per body
    parameters: int
    dev: dict[str, float]
    test: dict[str, float]


def _rebuilt(run: Any, flat: Mapping[str, np.ndarray]) -> Any:
    """The run's task model with its bodies' layers cut to the heads `flat` keeps."""
    from pretrain.hf.models import set_flat_params
    from pretrain.model import create_model
    from pretrain.transfer.trainer import task_model

    bodies = []
    for index, body in enumerate(run.bodies):
        kept = heads_kept(flat, f"bodies.{index}.")
        config = body.model.config
        if any(k != config.num_heads for k in kept):
            config = dataclasses.replace(config, heads_per_layer=kept, scan_layers=False)
        bodies.append(dataclasses.replace(body, model=create_model(config)))
    model = task_model(run.config, bodies, run.task, run.config.seed)
    set_flat_params(model, flat)
    return model


def _functions(run: Any, model: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(graphdef, params, rest, jitted loss gradient, jitted evaluation) of a task model."""
    from pretrain.transfer import methods
    from pretrain.transfer.trainer import task_functions

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    plan = methods.plan("full", run.config.methods, {}, 1)
    loss_fn, totals_fn, eval_fn = task_functions(graphdef, rest, run.task.kind, 1, plan, 1,
                                                 quantize=run.config.get("quantize", "none"))

    def gradient(params, batch):
        totals = jax.tree.map(lambda total: jnp.maximum(total, 1.0), totals_fn(batch))
        return jax.grad(lambda p: loss_fn(p, batch, totals, 0)[0])(params)

    return graphdef, params, rest, jax.jit(gradient), jax.jit(eval_fn)


def _scores(run: Any, evaluate: Any, params: Any, batches: Mapping[str, list]) -> dict[str, dict[str, float]]:
    """The task's metrics and loss on each split of `batches`."""
    from pretrain.transfer.trainer import collect_predictions

    out = {}
    for split, split_batches in batches.items():
        results = [jax.device_get(evaluate(params, batch)) for batch in split_batches]
        gold, predicted, loss, count = collect_predictions(run.task, split, split_batches, results, run.tokenizer)
        out[split] = {**run.task.score(gold, predicted), "loss": loss / max(count, 1.0)}
    return out


def prune_run(directory: str, out: str, *, target: float = 0.5, step_fraction: float = 0.1,
              importance_batches: int = 16, normalize_by_layer: bool = True) -> dict[str, Any]:
    """Prunes the fine-tuned run in `directory` to `target` of its heads removed, `step_fraction`
    of them at a time (see module docstring); writes `out/pruning.json` and the last
    step's parameters (`out/model.safetensors`); returns what pruning.json holds."""
    from safetensors.numpy import save_file

    from pretrain.hf.models import flat_params
    from pretrain.transfer import encoding
    from pretrain.transfer.trainer import load_finetuned, teacher_directory

    if not 0 < target < 1 or not 0 < step_fraction <= target:
        raise ValueError(f"--target={target} must lie in (0, 1) and --step_fraction={step_fraction} in (0, target]")
    run = load_finetuned(teacher_directory(directory))
    config = run.config
    common = dict(seq_len=config.seq_len, batch_size=config.batch_size, packed=config.packed)
    batches = {split: encoding.evaluation_batches(run.task, split, run.tokenizer, **common)
               for split in ("dev", "test")}
    stream = iter(encoding.training_stream(run.task, run.tokenizer, seed=config.seed, **common))
    train = [next(stream) for _ in range(importance_batches)]
    flat = flat_params(run.model)
    total = sum(len(v) for v in head_importance(flat, {k: np.zeros_like(v) for k, v in flat.items()}).values())
    per_step = max(1, round(step_fraction * total))
    goal = math.floor(target * total)
    removed_so_far, steps = 0, []
    model = run.model
    while True:
        graphdef, params, rest, gradient, evaluate = _functions(run, model)
        scored = _scores(run, evaluate, params, batches)
        flat = flat_params(model)
        steps.append(Pruned(len(steps), removed_so_far / total,
                            [list(heads_kept(flat, f"bodies.{i}.")) for i in range(len(run.bodies))],
                            sum(int(v.size) for v in flat.values()), scored["dev"], scored["test"]))
        print(f"step {steps[-1].step}: {removed_so_far}/{total} heads removed, {steps[-1].parameters:,} parameters, "
              f"dev {run.task.metric} {scored['dev'][run.task.metric]:.4f}, test {scored['test'][run.task.metric]:.4f}",
              flush=True)
        if removed_so_far >= goal:
            break
        importance: dict[str, np.ndarray] = {}
        for batch in train:
            grads = flat_params(nnx.merge(graphdef, jax.device_get(gradient(params, batch)), rest))
            for layer, values in head_importance(flat, grads).items():
                importance[layer] = importance.get(layer, 0) + values
        if normalize_by_layer:
            importance = normalized(importance)
        chosen = least_important({k: v for k, v in importance.items() if len(v)}, min(per_step, goal - removed_so_far))
        removed_so_far += sum(len(v) for v in chosen.values())
        model = _rebuilt(run, without_heads(flat, chosen))
    os.makedirs(out, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in flat_params(model).items()},
              os.path.join(out, "model.safetensors"))
    result = {"finetuned": os.path.abspath(directory), "task": run.task.name, "metric": run.task.metric,
              "target": target, "step_fraction": step_fraction, "importance_batches": importance_batches,
              "normalize_by_layer": normalize_by_layer, "heads": total,
              "steps": [dataclasses.asdict(step) for step in steps]}
    with open(os.path.join(out, "pruning.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.pruning`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    finetuned = flags.DEFINE_string("finetuned", None, "a fine-tuning run (pretrain.finetune --workdir, or a seed_<s> "
                                    "in it)", flag_values=flag_values)
    out = flags.DEFINE_string("out", None, "where pruning.json and the pruned parameters go", flag_values=flag_values)
    target = flags.DEFINE_float("target", 0.5, "the fraction of all heads to remove", flag_values=flag_values)
    step_fraction = flags.DEFINE_float("step_fraction", 0.1, "the fraction of all heads removed per step",
                                       flag_values=flag_values)
    batches = flags.DEFINE_integer("importance_batches", 16, "training batches the importances are summed over",
                                   flag_values=flag_values)
    cli.parse(flag_values, argv, __doc__)

    def command() -> str:
        if not finetuned.value or not out.value:
            raise ValueError("--finetuned and --out are required: the fine-tuning run to prune, and where to write")
        result = prune_run(finetuned.value, out.value, target=target.value, step_fraction=step_fraction.value,
                           importance_batches=batches.value)
        first, last = result["steps"][0], result["steps"][-1]
        metric = result["metric"]
        return (f"pruned {last['removed_fraction']:.0%} of {result['heads']} heads: {first['parameters']:,} -> "
                f"{last['parameters']:,} parameters; test {metric} {first['test'][metric]:.4f} -> "
                f"{last['test'][metric]:.4f}; wrote {os.path.join(out.value, 'pruning.json')}")

    print(cli.run_reporting_bad_input(command))


if __name__ == "__main__":
    main()
