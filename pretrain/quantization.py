"""Int8 quantization of a trained model with qwix (Google's JAX quantization library).

Two post-training schemes, as Q8BERT and qwix's PTQ define them, and quantization-aware
training:

  'int8_weights'  every weight matrix and embedding table (`is_quantized`) stored as int8
                  with one float32 scale per output channel
                  (symmetric, absmax: `qwix.quantize(..., channelwise_axes=...)`); biases
                  and LayerNorm stay float32. Inference dequantizes and computes in float,
                  so scoring the dequantized weights (`fake_quantized`) is that model's score.
  'int8'          the same weights, and the inputs of the blocks' four weight matmuls (QKV,
                  attention output, MLP in and out) quantized per token to int8 at run time
                  (`model.activation_quantization`, `pretrain.layers.quantized_activation`):
                  int8 x int8 products with int32 sums are exact in float32 at these widths,
                  so the dequantized product is the integer kernel's result up to the final
                  scale's rounding.

Quantization-aware fine-tuning (`pretrain.finetune --config.quantize=int8`) trains through
both with a straight-through gradient. `save_quantized` writes the int8 tensors and their
scales (safetensors), the bytes on disk the comparison reports.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

QUANTIZATIONS = ("int8_weights", "int8")  # what a model may be quantized to ('none': float32)
QUANTIZED_DTYPE = jnp.int8


def contracting_axes(name: str, ndim: int) -> tuple[int, ...]:
    """The axes a weight is summed over where it is used: an embedding table [rows, E]
    its width (a row is looked up, or dotted with a hidden state by the tied output); the
    attention output kernel [H, K, D] its heads and head width; every other kernel its
    first (input) axis. One scale per remaining index: per output channel, per token row."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("embedding"):
        return (ndim - 1,)
    if leaf == "out_kernel":
        return (0, 1)
    return (0,)


WEIGHT_NAMES = ("wi", "wo")  # the MLP's kernels; every other weight matrix's name holds 'kernel' or 'embedding'


def is_quantized(name: str, value: Any) -> bool:
    """Whether int8 quantization stores parameter `name`: every weight matrix (a kernel:
    the blocks', the heads', the task head's, the fusion's projections) and embedding table;
    biases, norms and mixing weights stay float32, whatever their shape."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    weight = leaf in WEIGHT_NAMES or "kernel" in leaf or leaf.endswith("embedding") or parent == "projections"
    return weight and np.ndim(value) >= 2


def channelwise_axes(name: str, ndim: int) -> tuple[int, ...]:
    """The axes with a scale of their own: all but `contracting_axes`."""
    contracting = contracting_axes(name, ndim)
    return tuple(axis for axis in range(ndim) if axis not in contracting)


def quantize(name: str, value: jax.Array) -> qwix.QArray:
    """Parameter `name` as int8 values and float32 scales (qwix, absmax, symmetric)."""
    return qwix.quantize(jnp.asarray(value, jnp.float32), QUANTIZED_DTYPE,
                         channelwise_axes=channelwise_axes(name, jnp.ndim(value)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_int8(value: jax.Array, channelwise: tuple[int, ...]) -> jax.Array:
    """`value` quantized to int8 (a scale per index of the `channelwise` axes) and back:
    the numbers int8 inference computes with. The gradient passes straight through."""
    quantized = qwix.quantize(value.astype(jnp.float32), QUANTIZED_DTYPE, channelwise_axes=channelwise)
    return qwix.dequantize(quantized).astype(value.dtype)


def _forward(value: jax.Array, channelwise: tuple[int, ...]) -> tuple[jax.Array, None]:
    return fake_int8(value, channelwise), None


def _backward(channelwise: tuple[int, ...], residual: None, gradient: jax.Array) -> tuple[jax.Array]:
    del channelwise, residual
    return (gradient,)


fake_int8.defvjp(_forward, _backward)


def fake_quantized(params: Any) -> Any:
    """`params` (any tree of arrays) with every quantized parameter replaced by its int8
    value times its scale: the weights int8 inference computes with. The gradient passes
    straight through (quantization-aware training)."""
    def leaf(path: tuple, value: Any) -> Any:
        name = ".".join(str(getattr(key, "key", getattr(key, "idx", ""))) for key in path
                        if not isinstance(key, jax.tree_util.GetAttrKey))  # an nnx Variable's `.value`
        return fake_int8(value, channelwise_axes(name, value.ndim)) if is_quantized(name, value) else value

    return jax.tree_util.tree_map_with_path(leaf, params)


def quantized_tensors(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stored form of flat parameters (dotted names): `<name>.qvalue` int8 and
    `<name>.scale` float32 for each quantized one, the others float32 as they are."""
    out = {}
    for name, value in flat.items():
        if is_quantized(name, value):
            q = quantize(name, jnp.asarray(value))
            out[f"{name}.qvalue"] = np.asarray(q.qvalue, np.int8)
            out[f"{name}.scale"] = np.asarray(q.scale, np.float32)
        else:
            out[name] = np.asarray(value, np.float32)
    return out


def save_quantized(flat: Mapping[str, np.ndarray], path: str, quantization: str | None) -> int:
    """Writes the parameters (int8 where `quantization` names a scheme, float32 for None)
    as one safetensors file; returns its bytes on disk."""
    from safetensors.numpy import save_file

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} must be one of {QUANTIZATIONS} (or None: float32)")
    tensors = quantized_tensors(flat) if quantization else {k: np.asarray(v, np.float32) for k, v in flat.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return os.path.getsize(path)


def quantized_model(model: Any, scheme: str) -> Any:
    """A copy of `model` (a Transformer, or any module whose Transformers are reachable as
    attributes, such as a task model) as `scheme` runs it: its quantized parameters
    replaced by their int8 values times their scales, and under 'int8' every Transformer
    in it quantizing its matmuls' inputs at run time. `model` is left as it was."""
    import dataclasses

    from flax import nnx

    from pretrain.model import Transformer

    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantization {scheme!r} must be one of {QUANTIZATIONS}")
    copy = nnx.clone(model)
    if scheme == "int8":
        for _, module in nnx.iter_modules(copy):
            if isinstance(module, Transformer):
                configured = dataclasses.replace(module.config, activation_quantization="int8")
                for _, inner in nnx.iter_modules(module):
                    if getattr(inner, "config", None) is module.config:
                        inner.config = configured
    params = nnx.state(copy, nnx.Param)
    nnx.update(copy, jax.jit(fake_quantized)(params))
    return copy
