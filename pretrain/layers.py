"""The Transformer's layers and their stack: attention, MLP, the block, and how the
blocks run (a Python loop or one scan over stacked parameters, with or without
rematerialisation).

Two layouts hold the same parameters (`config.model.scan_layers`):

  loop  `blocks` is a list: `blocks/0/attention/qkv_kernel` [D, 3, H, K], ... one
        subtree per layer; the traced program repeats the block num_layers times.
  scan  `blocks` is one block whose every variable has a leading layer axis:
        `blocks/attention/qkv_kernel` [num_layers, D, 3, H, K] (logical axis
        'layers', replicated by `pretrain.sharding`); `jax.lax.scan` runs it, so
        the program holds the block once and compile time is flat in depth.

A model of either layout starts from the same numbers for the same seed (the scan
layout is built by stacking the loop layout's blocks), and `to_layout` converts any
state between them (parameters, optimizer moments, a checkpoint's pure dicts): the
one home of that rule, used by checkpoint restore and the Hugging Face boundary.

`config.model.remat` wraps each block in `jax.checkpoint` with a policy
(`REMAT_POLICIES`), as MaxText does: 'full' saves nothing of a block's forward pass
and recomputes it in the backward pass; 'dots' saves the outputs of the matmuls
without batch dimensions (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`,
MaxText's 'minimal': the weight projections are kept, the [B, H, L, L] attention
scores and softmax are recomputed; `dense`'s outputs are named so that its CPU
custom-gradient product counts as a matmul too). The numbers are those of 'none'.

Shapes: B batch, L length, D model_dim, H heads, K head_dim, F mlp_dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

if TYPE_CHECKING:
    from pretrain.model import TransformerConfig

INIT_STDDEV = 0.02  # BERT's and GPT-2's initializer range
_HIDDEN_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # the score of a key a query may not see
GELU_FORMS = ("tanh", "exact")
ACTIVATION_QUANTIZATIONS = ("none", "int8")  # config.model.activation_quantization
LAYER_AXIS = "layers"  # the logical name of the stacked layer axis (scan layout)
BLOCKS = "blocks"  # the attribute (and state key) that holds the blocks
DENSE_OUTPUT = "dense"  # the checkpoint name of `dense`'s output (a matmul the 'dots' policy keeps)

# config.model.remat -> the jax.checkpoint policy of each block (None: no jax.checkpoint). 'dots' also keeps
# what `dense` names: on CPU its product is a custom_vjp call, which the dot policy alone does not see.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)),
}


def gelu(config: TransformerConfig, x: jax.Array) -> jax.Array:
    """GELU in the form `config.gelu` names (the tanh approximation or the exact erf)."""
    return jax.nn.gelu(x, approximate=config.gelu == "tanh")


def quantized_activation(config: TransformerConfig, x: jax.Array, contracting: int = 1) -> jax.Array:
    """The input x of a weight matmul (its last `contracting` axes summed over) as int8
    inference computes with it under `config.activation_quantization='int8'`: one scale
    per token (`pretrain.quantization.fake_int8`); x itself otherwise."""
    if config.activation_quantization == "none":
        return x
    from pretrain.quantization import fake_int8  # qwix loads only for a quantized model

    return fake_int8(x, tuple(range(x.ndim - contracting)))


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], init=None) -> nnx.Param:
    """A float32 parameter with logical axis names for sharding."""
    init = init or jax.nn.initializers.normal(INIT_STDDEV)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes, eager_sharding=False)


_LOGICAL_EMBED = {"out_sharding": ("embed",), "eager_sharding": False}


def layer_norm(config: TransformerConfig, rngs: nnx.Rngs, width: int | None = None) -> nnx.LayerNorm:
    """A float32 LayerNorm over `width` (default: the model width), its scale and bias named 'embed'."""
    return nnx.LayerNorm(
        width or config.model_dim,
        epsilon=config.layer_norm_epsilon,
        dtype=jnp.float32,
        scale_metadata=_LOGICAL_EMBED,
        bias_metadata=_LOGICAL_EMBED,
        rngs=rngs,
    )


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., D] times kernel [D, *O] -> [..., *O].

    On CPU through `_cpu_dense` (a custom backward pass measured to help XLA CPU,
    README, Performance); on accelerators the plain product, whose gradient XLA
    derives itself: the trick is unmeasured there. Decided when the step is traced.
    """
    if jax.default_backend() == "cpu":
        return checkpoint_name(_cpu_dense(x, kernel), DENSE_OUTPUT)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _cpu_dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`dense` with the kernel gradient written as one product of x and the output
    gradient over all token axes.

    The same numbers as `jnp.einsum`. The custom backward pass only changes
    which operand XLA CPU transposes for the kernel gradient (a sum over
    tokens, which its matmul library takes in one orientation only): x, D
    wide, instead of the output gradient, 3D (QKV) or F (MLP) wide: a
    narrower transposed copy on every step (README, Performance).
    """
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_forward(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _cpu_dense(x, kernel), (x, kernel)


def _dense_backward(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    outputs = tuple(range(1, kernel.ndim))
    d_x = jax.lax.dot_general(grad, kernel, ((tuple(range(x.ndim - 1, grad.ndim)), outputs), ((), ())))
    tokens = tuple(range(x.ndim - 1))
    d_kernel = jax.lax.dot_general(x, grad, ((tokens, tokens), ((), ())))
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_cpu_dense.defvjp(_dense_forward, _dense_backward)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyRanges:
    """int32 [B, L] first (inclusive) and last (exclusive) key of every query: the
    attention rule in the form a fused kernel takes (`pretrain.attention.key_ranges`)."""

    start: jax.Array
    end: jax.Array


class Attention(nnx.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs, heads: int | None = None):
        """`heads`: how many heads (default config.num_heads; fewer in a pruned layer), each head_dim wide."""
        d, h, k = config.model_dim, config.num_heads if heads is None else heads, config.head_dim
        self.config = config
        zeros = jax.nn.initializers.zeros
        self.qkv_kernel = param(rngs, (d, 3, h, k), ("embed", None, "heads", "head_dim"))
        self.qkv_bias = param(rngs, (3, h, k), (None, "heads", "head_dim"), zeros)
        self.out_kernel = param(rngs, (h, k, d), ("heads", "head_dim", "embed"))
        self.out_bias = param(rngs, (d,), ("embed",), zeros)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v [B, L, H, K] of x [B, L, D]."""
        dtype = self.config.compute_dtype
        # [B, L, 3, H, K]: the token axes stay in front, so the product is one
        # [B*L, D] x [D, 3*H*K] matmul with no transposed copies.
        qkv = dense(quantized_activation(self.config, x), self.qkv_kernel[...].astype(dtype)) + \
            self.qkv_bias[...].astype(dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array | KeyRanges) -> jax.Array:
        """Attention output [B, Lq, D] for queries q over keys k and values v.

        `visible` is a bool mask [B, 1, Lq, Lk] (the dense path) or the key ranges
        of every query (the fused kernel, `pretrain.flash_attention`).
        """
        if isinstance(visible, KeyRanges):
            from pretrain.flash_attention import flash_attention

            context = flash_attention(q, k, v, visible.start, visible.end)
        else:
            context = self._dense_context(q, k, v, visible)
        dtype = self.config.compute_dtype
        context = quantized_activation(self.config, context, contracting=2)
        out = jnp.einsum("blhk,hkd->bld", context, self.out_kernel[...].astype(dtype))
        return out + self.out_bias[...].astype(dtype)

    @staticmethod
    def scores(q: jax.Array, k: jax.Array) -> jax.Array:
        """The attention scores q k^T / sqrt(K) [B, H, Lq, Lk] (float32), before any mask
        or softmax: what the softmax weighs (TinyBERT distils them, `pretrain.distillation`)."""
        return jnp.einsum("bqhk,bthk->bhqt", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)

    @staticmethod
    def _dense_context(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """softmax(q k^T / sqrt(K)) v [B, Lq, H, K] with hidden keys set to a large
        negative score, written out rather than through `jax.nn.dot_product_attention`:
        its XLA implementation (the one a dense mask gets) vmaps over head groups,
        which on CPU adds transposes and a slow reduction to the backward pass
        (README, Performance). A query that sees nothing (padding) spreads its
        weight uniformly, so it carries no NaN. Scores and softmax are float32.
        """
        scores = jnp.where(mask, Attention.scores(q, k), _HIDDEN_SCORE)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqt,bthk->bqhk", weights, v)


class MLP(nnx.Module):
    """Position-wise GELU feed-forward block."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs):
        zeros = jax.nn.initializers.zeros
        self.config = config
        self.wi = param(rngs, (config.model_dim, config.mlp_dim), ("embed", "mlp"))
        self.bi = param(rngs, (config.mlp_dim,), ("mlp",), zeros)
        self.wo = param(rngs, (config.mlp_dim, config.model_dim), ("mlp", "embed"))
        self.bo = param(rngs, (config.model_dim,), ("embed",), zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.config.compute_dtype
        x = quantized_activation(self.config, x)
        hidden = gelu(self.config, dense(x, self.wi[...].astype(dtype)) + self.bi[...].astype(dtype))
        return quantized_activation(self.config, hidden) @ self.wo[...].astype(dtype) + self.bo[...].astype(dtype)


LayerCache = tuple[jax.Array, jax.Array, jax.Array]  # one layer's (keys, values) [B, T, H, K] and the write slot


class Block(nnx.Module):
    """One Transformer layer, pre-LN (`x + f(LN(x))`) or post-LN (`LN(x + f(x))`)."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs, layer: int = 0):
        self.config = config
        self.attention = Attention(config, rngs, config.layer_heads(layer))
        self.mlp = MLP(config, rngs)
        self.attention_norm = layer_norm(config, rngs)
        self.mlp_norm = layer_norm(config, rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def _norm(self, norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
        return norm(x).astype(self.config.compute_dtype)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | KeyRanges,
        *,
        deterministic: bool,
        cache: LayerCache | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, L, D] -> (x', (k, v)). With `cache=(keys, values, start)` the new
        keys and values are written at slot `start` and the queries attend over
        the whole cache; (k, v) are then the updated cache arrays."""
        pre = self.config.pre_layer_norm
        q, k, v = self.attention.project(self._norm(self.attention_norm, x) if pre else x)
        if cache is not None:
            cached_keys, cached_values, start = cache
            k = jax.lax.dynamic_update_slice_in_dim(cached_keys, k.astype(cached_keys.dtype), start, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cached_values, v.astype(cached_values.dtype), start, 1)
        attended = self.dropout(self.attention.attend(q, k, v, mask), deterministic=deterministic)
        x = x + attended if pre else self._norm(self.attention_norm, x + attended)
        transformed = self.mlp(self._norm(self.mlp_norm, x) if pre else x)
        transformed = self.dropout(transformed, deterministic=deterministic)
        x = x + transformed if pre else self._norm(self.mlp_norm, x + transformed)
        return x, (k, v)


# -- the stack -------------------------------------------------------------------------

def make_blocks(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.List | Block:
    """The num_layers blocks in the layout `config.scan_layers` names: an `nnx.List`
    (loop), or one block holding them all stacked (scan); with `config.share_layers`
    a list of the one block every layer applies (ALBERT). Both draw the same numbers
    from `rngs` in the same order, so a seed gives the same model in either layout."""
    if config.share_layers:  # ALBERT: one block, applied num_layers times (`run_blocks`)
        return nnx.List([Block(config, rngs)])
    blocks = nnx.List([Block(config, rngs, layer) for layer in range(config.num_layers)])
    if not config.scan_layers:
        return blocks
    graphdef = nnx.graphdef(blocks[0])
    return nnx.merge(graphdef, _stacked([nnx.state(block) for block in blocks], axis=0))


def run_blocks(
    blocks: nnx.List | Block,
    config: TransformerConfig,
    x: jax.Array,
    mask: jax.Array | KeyRanges,
    *,
    deterministic: bool,
    keep_layers: bool = False,
    cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, list[jax.Array], tuple[jax.Array, jax.Array] | None]:
    """x [B, L, D] through every block, in the blocks' layout and under `config.remat`.

    Returns (x after the last block, the state after each block when `keep_layers`
    (else []), and with `cache=(keys, values, start)` (keys and values
    [num_layers, B, T, H, K]) the updated keys and values, else None). Dropout
    draws from each block's own stream (stacked, in the scan layout), whose
    counts are written back to `blocks`.
    """
    caching = cache is not None
    start = cache[2] if caching else None

    def layer_function(graphdef: nnx.GraphDef) -> Callable:
        """(layer state, x, layer cache) -> (x', its random streams' counts or None, (k, v) or None),
        a pure function of one block, checkpointed under `config.remat`."""
        def layer(state: nnx.State, x: jax.Array, layer_cache: tuple[jax.Array, jax.Array] | None):
            block = nnx.merge(graphdef, state)
            x, kv = block(x, mask, deterministic=deterministic, cache=(*layer_cache, start) if caching else None)
            # dropout advanced the block's random streams: their counts go back to `blocks`
            return x, None if deterministic else nnx.state(block, nnx.RngCount), kv if caching else None

        if config.remat == "none":
            return layer
        # prevent_cse keeps XLA from merging the recomputation into the forward pass; scan already does
        return jax.checkpoint(layer, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)

    if config.scan_layers:
        graphdef, state = nnx.split(blocks)
        layer = layer_function(graphdef)

        def body(x: jax.Array, inputs: tuple) -> tuple[jax.Array, tuple]:
            layer_state, layer_cache = inputs
            x, rng_state, kv = layer(layer_state, x, layer_cache)
            return x, (rng_state, kv, x if keep_layers else None)

        x, (rng_state, kv, hidden) = jax.lax.scan(body, x, (state, cache[:2] if caching else None))
        if not deterministic:
            nnx.update(blocks, rng_state)
        return x, list(hidden) if keep_layers else [], kv
    hidden, keys, values = [], [], []
    for index, block in enumerate([blocks[0]] * config.num_layers if config.share_layers else blocks):
        graphdef, state = nnx.split(block)
        x, rng_state, kv = layer_function(graphdef)(state, x, (cache[0][index], cache[1][index]) if caching else None)
        if not deterministic:
            nnx.update(block, rng_state)
        if keep_layers:
            hidden.append(x)
        if caching:
            keys.append(kv[0])
            values.append(kv[1])
    return x, hidden, (jnp.stack(keys), jnp.stack(values)) if caching else None


def block_at(blocks: nnx.List | Block, config: TransformerConfig, index: int) -> Block:
    """Block `index` of a stack in either layout: the list's own block (loop), or a
    block over the `index` slice of the stacked variables (scan)."""
    if config.share_layers:
        return blocks[0]
    if not config.scan_layers:
        return blocks[index]
    graphdef, state = nnx.split(blocks)
    return nnx.merge(graphdef, _layer(state, index, 0))


# -- converting states between the layouts ---------------------------------------------

def to_layout(tree: Any, scan: bool, axis: int = 0) -> Any:
    """`tree` with the blocks of every model state in it in the scan layout (`scan`)
    or the loop layout; what is already in that layout is returned as it is.

    `tree` is any pytree holding model states: an `nnx.State` of parameters, a
    training state (parameters and the optimizer's moments, which mirror them),
    the pure dicts `nnx.to_pure_dict` or a checkpoint give (list indices as ints or
    digit strings), with arrays, NumPy arrays or `jax.ShapeDtypeStruct`s (whose
    `NamedSharding` gains or loses a replicated dimension). A model state is a
    mapping with a 'blocks' entry (and so is a head's stack inside it). `axis` is where the layer axis goes: 0, or 1
    for a pmap state whose every array has a leading device axis. Stacking and
    indexing copy values exactly, so the conversion round-trips bit for bit.
    """
    def convert(node: Any) -> Any:
        if not _holds_blocks(node):
            return node
        items = _plain(node)
        for key, value in items.items():  # a head with a stack of its own (ELECTRA's generator) converts alike
            if key != BLOCKS:
                items[key] = jax.tree.map(convert, value, is_leaf=_holds_blocks)
        layers = _loop_layers(items[BLOCKS])
        if scan and layers is not None:
            items[BLOCKS] = _stacked(layers, axis)
        elif not scan and layers is None:
            count = jax.tree.leaves(items[BLOCKS])[0].shape[axis]
            items[BLOCKS] = {index: _layer(items[BLOCKS], index, axis) for index in range(count)}
        return nnx.State(items, _copy=False) if isinstance(node, nnx.State) else items

    return jax.tree.map(convert, tree, is_leaf=_holds_blocks)


def layout_of(tree: Any) -> bool | None:
    """True when every model state in `tree` is in the scan layout, False when every
    one is in the loop layout, None when it holds none (or both)."""
    holders = [node for node in jax.tree.leaves(tree, is_leaf=_holds_blocks) if _holds_blocks(node)]
    layouts = {_loop_layers(node[BLOCKS]) is None for node in holders}
    return layouts.pop() if len(layouts) == 1 else None


def layout_alternatives(abstract_state: Any, axis: int = 0) -> list[tuple[Any, Callable[[Any], Any]]]:
    """[(the state in the other layout, a function taking such a state back to this
    layout)]: what `pretrain.checkpoint.Checkpointer.restore` takes to restore a
    checkpoint written by a run of the other `config.model.scan_layers`. Empty
    for a state without model states (or with both layouts)."""
    scan = layout_of(abstract_state)
    if scan is None:
        return []
    return [(to_layout(abstract_state, not scan, axis), lambda state: to_layout(state, scan, axis))]


def _holds_blocks(node: Any) -> bool:
    return isinstance(node, Mapping) and BLOCKS in node


def _loop_layers(blocks: Mapping) -> list | None:
    """The per-layer subtrees of a loop-layout `blocks` in layer order, or None when
    `blocks` is in the scan layout (its keys are the block's attribute names)."""
    keys = list(blocks)
    if not all(isinstance(key, int) or (isinstance(key, str) and key.isdigit()) for key in keys):
        return None
    order = sorted(keys, key=int)
    if [int(key) for key in order] != list(range(len(order))):
        raise ValueError(f"the blocks of a loop-layout state are numbered {order}, not 0..{len(order) - 1}")
    return [blocks[key] for key in order]


def _plain(node: Mapping) -> dict:
    """A mapping as nested dicts (an nnx.State keeps dicts inside, as here)."""
    return {key: _plain(value) if isinstance(value, nnx.State) else value for key, value in node.items()}


def _is_variable(leaf: Any) -> bool:
    return isinstance(leaf, nnx.Variable)


def _stacked(layers: Sequence[Any], axis: int) -> Any:
    """One tree whose leaves are the layers' leaves stacked along `axis`."""
    return jax.tree.map(lambda *leaves: _stack_leaves(leaves, axis), *layers, is_leaf=_is_variable)


def _layer(stacked: Any, index: int, axis: int) -> Any:
    """Layer `index` of a stacked tree."""
    return jax.tree.map(lambda leaf: _index_leaf(leaf, index, axis), stacked, is_leaf=_is_variable)


def _stack_leaves(leaves: Sequence[Any], axis: int) -> Any:
    first = leaves[0]
    if isinstance(first, nnx.Variable):  # the layer axis joins its logical axis names (first of the model's)
        names = first.get_metadata().get("out_sharding")
        value = _stack_leaves([leaf.get_value() for leaf in leaves], axis)
        return first.replace(value, **({"out_sharding": (LAYER_AXIS, *names)} if names else {}))
    if isinstance(first, jax.ShapeDtypeStruct):
        shape = (*first.shape[:axis], len(leaves), *first.shape[axis:])
        return jax.ShapeDtypeStruct(shape, first.dtype, sharding=_spec_changed(first.sharding, axis, insert=True))
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves, axis)
    return jnp.stack(leaves, axis)


def _index_leaf(leaf: Any, index: int, axis: int) -> Any:
    if isinstance(leaf, nnx.Variable):
        names = leaf.get_metadata().get("out_sharding")
        value = _index_leaf(leaf.get_value(), index, axis)
        return leaf.replace(value, **({"out_sharding": tuple(names[1:])} if names and names[0] == LAYER_AXIS
                                      else {}))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        shape = (*leaf.shape[:axis], *leaf.shape[axis + 1:])
        return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=_spec_changed(leaf.sharding, axis, insert=False))
    return leaf[(slice(None),) * axis + (index,)]


def _spec_changed(sharding: Any, axis: int, insert: bool) -> Any:
    """A NamedSharding with a replicated dimension inserted at (or removed from) `axis`;
    any other sharding (one device, none) as it is."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec)
    if insert:
        spec.insert(min(axis, len(spec)), None)
    elif axis < len(spec):
        del spec[axis]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))
