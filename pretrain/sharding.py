"""The one place a device mesh is built, and the rules that place arrays on it.

Parameters carry logical axis names (`pretrain.model`); `LOGICAL_AXIS_RULES` maps
them to the mesh axes ('data', 'fsdp', 'tensor'). Data parallelism shards the batch
over 'data' and 'fsdp'; FSDP additionally shards each parameter's 'embed' dimension
over 'fsdp'; tensor parallelism shards heads, MLP width and vocabulary over 'tensor'.
Changing the mesh shape in the config is all it takes to switch between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pretrain.errors import raise_problems

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (None: replicated)
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": None,
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "layers": None,  # the stacked layer axis of config.model.scan_layers: every device holds every layer's slice
}


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes with data=-1 filled in from `device_count`."""
    if data == -1 and fsdp >= 1 and tensor >= 1 and device_count % (fsdp * tensor) == 0:
        data = device_count // (fsdp * tensor)
    return data, fsdp, tensor


def mesh_problems(data: int, fsdp: int, tensor: int, device_count: int) -> list[str]:
    """Why a ('data', 'fsdp', 'tensor') mesh of these sizes cannot span `device_count`
    devices (the one home of this rule; the config checks report it before training,
    `make_mesh` enforces it)."""
    sizes = mesh_shape(data, fsdp, tensor, device_count)
    if min(sizes) < 1 or sizes[0] * sizes[1] * sizes[2] != device_count:
        return [f"config.mesh data={data} x fsdp={fsdp} x tensor={tensor} does not match the {device_count} "
                f"devices; make the product {device_count} (data=-1 fills in)"]
    return []


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices (of every process).

    The product of the three sizes must equal the device count; -1 for `data`
    means "whatever is left".
    """
    devices = list(jax.devices() if devices is None else devices)
    raise_problems(mesh_problems(data, fsdp, tensor, len(devices)))
    return Mesh(np.asarray(devices).reshape(mesh_shape(data, fsdp, tensor, len(devices))), MESH_AXES)


def mesh_spec(logical: PartitionSpec | Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The mesh PartitionSpec of an array with logical axis names `logical`.

    A dimension whose size the mesh axis does not divide stays replicated, so
    small models and odd vocabularies still run on any mesh.
    """
    axes = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        mesh_axis = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]):
            mesh_axis = None
        axes.append(mesh_axis)
    return PartitionSpec(*axes)


def tree_shardings(logical_specs: Any, abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays given the matching tree of logical specs."""
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, mesh_spec(spec, leaf.shape, mesh)),
        logical_specs, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec))


def train_state_shardings(params: nnx.State, optimizer: optax.GradientTransformation, mesh: Mesh) -> dict:
    """NamedShardings of a training state {'params', 'opt_state', 'step'}: each
    parameter by its logical axis names, the optimizer's per-parameter state like
    its parameter (none for a frozen one), everything else replicated. The state the
    trainer creates sharded, and what its compiled step takes and returns."""
    param_shardings = tree_shardings(nnx.get_partition_spec(params), params, mesh)
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)  # noqa: E731 (frozen parameters have no state)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda leaf, s: leaf if masked(leaf) else s, jax.eval_shape(optimizer.init, params),
        param_shardings, transform_non_params=lambda _: replicated(mesh), is_leaf=masked)
    return {"params": param_shardings, "opt_state": opt_shardings, "step": replicated(mesh)}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays [B, L]: rows split over ('data', 'fsdp'), positions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
