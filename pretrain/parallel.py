"""How a training loop runs its step on the devices: pjit or pmap, as two small strategies.

The loop (`pretrain.loop.Loop`) trains whatever program it is given (pretraining,
fine-tuning) with one of these and never asks which: each places the training state on
the devices, compiles the step and the evaluation step, puts host batches where the
step reads them, brings results back, and says where a state's layer axis lies (for
checkpoints written in the other layer layout) and how it describes itself.

- `Pjit`: `jax.jit` over the one mesh (`pretrain.sharding`): the state sharded by the
  logical-axis rules, each batch assembled from the processes' local rows.
- `Pmap`: `jax.pmap` over the local devices: the state replicated (every replica saved,
  as pmap programs do), each batch split across devices, and the step's sums added
  across them (`axis_name`); evaluation runs on one device over the first replica.

A program may also hold frozen parameters the step reads but never trains (a
distillation teacher, `pretrain.distill`): `compile` places them once, like the
parameters (sharded by their logical axes, or one copy per device), and the compiled
steps take them as an argument, not as constants folded into the program; they are
not part of the training state, so no checkpoint holds them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pretrain import sharding
from pretrain.train_step import initial_state

Batch = Mapping[str, np.ndarray]


class Pjit:
    """`jax.jit` over the mesh of `config.mesh` (see module docstring)."""

    axis_name: str | None = None  # the step's sums are global already: the compiler adds across the mesh
    layer_axis = 0  # where a stacked-layer state has its layer axis
    state_copies = 1  # states one checkpoint holds

    def __init__(self, mesh_config: Any):
        self.mesh = sharding.make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)
        self._batch_sharding = sharding.batch_sharding(self.mesh)

    def place(self, params: Any, optimizer: optax.GradientTransformation) -> tuple[dict, Any]:
        """(the initial training state of `params` (`train_step.initial_state`), sharded;
        its abstract form with shardings). `compile` uses these shardings."""
        self._shardings = sharding.train_state_shardings(params, optimizer, self.mesh)
        state = jax.jit(functools.partial(initial_state, optimizer), out_shardings=self._shardings)(params)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                self._shardings)
        return state, abstract

    def compile(self, step_fn: Callable, eval_fn: Callable, frozen: Any = None) -> tuple[Callable, Callable]:
        """(train step, evaluation step), jitted with the state's and the batch's shardings.
        With `frozen` parameters (an `nnx.State`), both functions take them as a third
        argument; they are placed once, sharded by their logical axes, and bound."""
        replicated = sharding.replicated(self.mesh)
        if frozen is None:
            train_step = jax.jit(step_fn, in_shardings=(self._shardings, self._batch_sharding),
                                 out_shardings=(self._shardings, replicated), donate_argnums=0)
            eval_step = jax.jit(eval_fn, in_shardings=(self._shardings["params"], self._batch_sharding),
                                out_shardings=replicated)
            return train_step, eval_step
        frozen_shardings = sharding.tree_shardings(nnx.get_partition_spec(frozen), frozen, self.mesh)
        placed = jax.device_put(frozen, frozen_shardings)
        train_step = jax.jit(step_fn, in_shardings=(self._shardings, self._batch_sharding, frozen_shardings),
                             out_shardings=(self._shardings, replicated), donate_argnums=0)
        eval_step = jax.jit(eval_fn, in_shardings=(self._shardings["params"], self._batch_sharding,
                                                   frozen_shardings), out_shardings=replicated)
        return (lambda state, batch: train_step(state, batch, placed),
                lambda params, batch: eval_step(params, batch, placed))

    def put_batch(self, batch: Batch) -> dict[str, jax.Array]:
        """This process's rows as the global batch the step reads."""
        return {k: jax.make_array_from_process_local_data(self._batch_sharding, v) for k, v in batch.items()}

    put_eval_batch = put_batch

    @staticmethod
    def unreplicate(tree: Any) -> Any:
        """A result of the step as the loop reads it (already one copy)."""
        return tree

    def describe(self) -> str:
        shape = dict(self.mesh.shape)
        return f"pjit over mesh data={shape['data']} fsdp={shape['fsdp']} tensor={shape['tensor']}"


class Pmap:
    """`jax.pmap` over the local devices (see module docstring)."""

    axis_name = "devices"
    layer_axis = 1  # after the device axis
    mesh = None

    def __init__(self) -> None:
        self.devices = jax.local_device_count()
        self.state_copies = self.devices

    def place(self, params: Any, optimizer: optax.GradientTransformation) -> tuple[dict, Any]:
        """(the initial training state of `params` (`train_step.initial_state`), one
        replica per device; its abstract form)."""
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.devices, *x.shape)),
                             initial_state(optimizer, params))
        return state, jax.eval_shape(lambda: state)

    def compile(self, step_fn: Callable, eval_fn: Callable, frozen: Any = None) -> tuple[Callable, Callable]:
        """(the step pmapped over the devices, the evaluation step jitted on one). With
        `frozen` parameters, both take them as a third argument: one copy per device for
        the step, the host's tree for evaluation, bound."""
        train_step, eval_step = jax.pmap(step_fn, axis_name=self.axis_name, donate_argnums=0), jax.jit(eval_fn)
        if frozen is None:
            return train_step, eval_step
        # from the host: an array committed to one device (a restored teacher's) is split by neither pmap nor
        # the evaluation (whose parameters are the first replica, wherever pmap left it)
        single = jax.device_get(frozen)
        replicas = jax.pmap(lambda tree: tree)(  # placed once: one copy on each device, as pmap splits them
            jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.devices, *x.shape)), single))
        return (lambda state, batch: train_step(state, batch, replicas),
                lambda params, batch: eval_step(params, batch, single))

    def put_batch(self, batch: Batch) -> dict[str, np.ndarray]:
        """The batch split into one slice of rows per device."""
        return {k: v.reshape(self.devices, -1, *v.shape[1:]) for k, v in batch.items()}

    @staticmethod
    def put_eval_batch(batch: Batch) -> Batch:
        return batch

    @staticmethod
    def unreplicate(tree: Any) -> Any:
        """The first replica of a replicated result."""
        return jax.tree.map(lambda x: x[0], tree)

    def describe(self) -> str:
        return f"pmap over {self.devices} local devices"


PARALLELISMS = ("pjit", "pmap")  # config.parallelism


def make_strategy(parallelism: str, mesh_config: Any) -> Pjit | Pmap:
    """The strategy `config.parallelism` names (one of PARALLELISMS)."""
    if parallelism == "pmap":
        return Pmap()
    if parallelism == "pjit":
        return Pjit(mesh_config)
    raise ValueError(f"config.parallelism={parallelism!r} must be one of {PARALLELISMS}")
