"""The task model: one or more pretrained bodies, pooling, and a task head.

    features of body i = its last layer, or (ELMo) gamma * sum_j softmax(w)_j layer_j
    pooled             = per example: its first token (BERT), its last token (GPT),
                         the mean of its tokens (Sentence-BERT), or concat pooling
                         [last, max, mean] over its tokens (ULMFiT)
    fused              = the bodies' pooled features concatenated, or mixed by a
                         learned per-example gate (fusion of several pretrained bodies)
    head               = one dense layer: its task kind's outputs (classes, a value, ...)
                         on the pooled features, or on each token's own features when
                         the kind reads tokens (`per_token`: tags, span boundaries)

Pooling reads each example's own segment of a packed row (`segment_ids`), so packed
and unpacked batches give the same outputs; the attention rule keeps the bodies'
states of one example free of every other example. Outputs are produced at every
position; the kind's loss reads them where its labels sit (the example's first token
for an example-level label, each word's first piece for a tag).

Parameter groups by depth from the top (the methods' unit for discriminative rates
and gradual unfreezing): 0 the task-specific parameters (head, scalar mixes, gate),
1 a body's top block with its final norm and its language-model head, k its
(L+1-k)-th block from the bottom, L+1 its embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.model import Transformer

POOLINGS = ("first", "last", "mean", "concat")
FUSIONS = ("concat", "gate")
INIT_STDDEV = 0.02


def segment_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int [B, L] first and last position of the segment each position belongs to."""
    length = segment_ids.shape[-1]
    positions = jnp.arange(length)
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    starts = jax.lax.cummax(jnp.where(segment_ids != previous, positions, 0), axis=1)
    ends = jax.lax.cummin(jnp.where(segment_ids != following, positions, length - 1), axis=1, reverse=True)
    return starts, ends


def pool(hidden: jax.Array, segment_ids: jax.Array, how: str) -> jax.Array:
    """Per position, the pooled features of its segment: [B, L, D] ('first', 'last',
    'mean' over the segment's tokens) or [B, L, 3D] ('concat': last, max, mean)."""
    starts, ends = segment_bounds(segment_ids)
    take = lambda index: jnp.take_along_axis(hidden, index[..., None], axis=1)  # noqa: E731
    if how == "first":
        return take(starts)
    if how == "last":
        return take(ends)
    rows, length = segment_ids.shape
    groups = (jnp.arange(rows)[:, None] * (length + 1) + segment_ids).reshape(-1)
    flat = hidden.reshape(rows * length, -1).astype(jnp.float32)
    count = rows * (length + 1)
    sums = jax.ops.segment_sum(flat, groups, count)
    sizes = jax.ops.segment_sum(jnp.ones_like(groups, jnp.float32), groups, count)
    back = lambda per_group: per_group[groups].reshape(rows, length, -1)  # noqa: E731
    mean = back(sums / jnp.maximum(sizes, 1.0)[:, None])
    if how == "mean":
        return mean.astype(hidden.dtype)
    maxima = jax.ops.segment_max(flat, groups, count)
    return jnp.concatenate([take(ends).astype(jnp.float32), back(maxima), mean], axis=-1).astype(hidden.dtype)


class ScalarMix(nnx.Module):
    """ELMo's learned softmax-weighted mix of a body's layers, times a learned scale."""

    def __init__(self, layers: int):
        self.weights = nnx.Param(jnp.zeros((layers,), jnp.float32))
        self.gamma = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, layers: Sequence[jax.Array]) -> jax.Array:
        weights = jax.nn.softmax(self.weights[...])
        mixed = sum(w * layer.astype(jnp.float32) for w, layer in zip(weights, layers))
        return (self.gamma[...] * mixed).astype(layers[-1].dtype)


class Gate(nnx.Module):
    """Per-example softmax weights over bodies from their concatenated features; each
    body's features are first projected to a common width."""

    def __init__(self, widths: Sequence[int], rngs: nnx.Rngs):
        width, init = max(widths), jax.nn.initializers.normal(INIT_STDDEV)
        keep_scale = jax.nn.initializers.lecun_normal()  # projected features as large as the bodies' own
        self.projections = nnx.List([nnx.Param(keep_scale(rngs.params(), (w, width), jnp.float32)) for w in widths])
        self.kernel = nnx.Param(init(rngs.params(), (sum(widths), len(widths)), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((len(widths),), jnp.float32))

    def weights(self, features: Sequence[jax.Array]) -> jax.Array:
        """[..., bodies]: the gate's weights (they sum to 1)."""
        joined = jnp.concatenate([f.astype(jnp.float32) for f in features], axis=-1)
        return jax.nn.softmax(joined @ self.kernel[...] + self.bias[...], axis=-1)

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        weights = self.weights(features)
        projected = [f.astype(jnp.float32) @ p[...] for f, p in zip(features, self.projections)]
        return sum(weights[..., i : i + 1] * p for i, p in enumerate(projected))


class TaskModel(nnx.Module):
    """Bodies + pooling + fusion + head (see module docstring)."""

    def __init__(self, bodies: Sequence[Transformer], layouts: Sequence[str], poolings: Sequence[str],
                 num_outputs: int, *, per_token: bool, scalar_mix: bool = False, fusion: str = "concat",
                 seed: int = 0):
        if not bodies:
            raise ValueError("a task model needs at least one body")
        rngs = nnx.Rngs(params=seed)
        self.bodies = nnx.List(list(bodies))
        self.layouts, self.poolings = tuple(layouts), tuple(poolings)
        self.per_token, self.fusion = per_token, fusion
        self.mixes = nnx.List([ScalarMix(b.config.num_layers + 1) for b in bodies]) if scalar_mix else None
        widths = [b.config.model_dim * (3 if p == "concat" and not per_token else 1) for b, p in zip(bodies, poolings)]
        self.gate = Gate(widths, rngs) if len(bodies) > 1 and fusion == "gate" else None
        width = max(widths) if self.gate is not None else sum(widths)
        init = jax.nn.initializers.normal(INIT_STDDEV)
        self.head_kernel = nnx.Param(init(rngs.params(), (width, num_outputs), jnp.float32))
        self.head_bias = nnx.Param(jnp.zeros((num_outputs,), jnp.float32))

    def body_view(self, batch: Mapping[str, jax.Array], index: int) -> dict[str, jax.Array]:
        """The batch as body `index` reads it (its layout's inputs and attention kinds)."""
        if self.layouts[index] == "causal":
            return {**batch, "inputs": batch["inputs_causal"], "attention_kind": batch["attention_kind_causal"]}
        return dict(batch)

    def body_hidden(self, batch: Mapping[str, jax.Array], index: int) -> jax.Array:
        """Body `index`'s features [B, L, D]: its last layer, or its layers' scalar mix."""
        body, view = self.bodies[index], self.body_view(batch, index)
        if self.mixes is None:
            return body(view)
        return self.mixes[index](body.layer_outputs(view))

    def features(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        """(the head's input at every position, each body's features)."""
        hidden = [self.body_hidden(batch, i) for i in range(len(self.bodies))]
        per_body = hidden if self.per_token else [pool(h, batch["segment_ids"], p)
                                                for h, p in zip(hidden, self.poolings)]
        if self.gate is not None:
            return self.gate(per_body), hidden
        return jnp.concatenate([f.astype(jnp.float32) for f in per_body], axis=-1), hidden

    def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        """(outputs [B, L, num_outputs] float32 at every position, each body's features)."""
        features, hidden = self.features(batch)
        return features.astype(jnp.float32) @ self.head_kernel[...] + self.head_bias[...], hidden


def path_of(keys: Sequence[Any]) -> tuple:
    """A parameter's path (('bodies', 0, 'blocks', 3, 'mlp', 'wi')) from its pytree key path."""
    return tuple(key.key for key in keys if isinstance(key, jax.tree_util.DictKey))


def parameter_paths(params: nnx.State) -> list[tuple]:
    """The path of every parameter array, in pytree order."""
    return [path_of(keys) for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def parameter_depths(params: nnx.State, num_layers: Sequence[int]) -> dict[tuple, int]:
    """{parameter path: depth from the top} (see module docstring)."""
    depths = {}
    for path in parameter_paths(params):
        if path[0] != "bodies":
            depths[path] = 0
            continue
        body, part = int(path[1]), path[2]
        layers = num_layers[body]
        if part == "blocks":
            depths[path] = layers - int(path[3])
        elif part in ("token_embedding", "position_embedding", "type_embedding", "embedding_norm",
                      "embedding_projection_kernel", "embedding_projection_bias"):
            depths[path] = layers + 1
        else:  # final norm and the language-model / sentence-pair heads: with the top block
            depths[path] = 1
    return depths
