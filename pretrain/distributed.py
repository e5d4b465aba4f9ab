"""Multi-host start-up: when to call `jax.distributed.initialize`, and host ordering.

One process runs per host (or per GPU group); together they see every device of
the job, and `pretrain.sharding.make_mesh` lays the mesh over all of them. Each
process feeds only its rows of the global batch (`pretrain.data`), reading only
the data shards of those rows; their iterator states are merged into one before a
checkpoint (`merge_host_states`), and only process 0 writes the metrics, the
config and the tokenizer.

The job is multi-process when coordinator flags are given, or when the
environment says so: SLURM (`SLURM_NTASKS` > 1), Open MPI (`OMPI_COMM_WORLD_SIZE`
> 1), a multi-host Cloud TPU slice (`TPU_WORKER_HOSTNAMES` lists several hosts),
or `JAX_COORDINATOR_ADDRESS` set. In the environment cases JAX's own cluster
detection fills in the coordinator, the process count and the process id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher named by the environment, or None for one process."""
    env = os.environ if environ is None else environ

    def more_than_one(name: str) -> bool:
        value = env.get(name, "")
        return value.isdigit() and int(value) > 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and more_than_one("SLURM_NTASKS"):
        return "SLURM"
    if more_than_one("OMPI_COMM_WORLD_SIZE"):
        return "Open MPI"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "Cloud TPU pod"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, peer_timeout: float = 0.0) -> bool:
    """Joins the multi-process job when flags or the environment call for it.

    Must run before anything touches a JAX device. Returns whether the job is
    multi-process. With `peer_timeout` (`config.peer_timeout_seconds`) JAX's own
    heartbeat waits longer than `pretrain.peers.PeerWatch`, which names a lost
    process first. CPU collectives go through gloo, the CPU implementation that
    spans processes (GPU and TPU devices use their own).
    """
    flags_given = [value is not None for value in (coordinator_address, num_processes, process_id)]
    if any(flags_given) and not all(flags_given):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together: give all three "
                         "(e.g. --coordinator_address=host0:1234 --num_processes=2 --process_id=0) or none")
    launcher = "flags" if all(flags_given) else cluster_environment()
    if launcher is None:
        return False
    if all(flags_given) and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects CPU devices only
    log.info("multi-process start-up (%s)", launcher)
    from pretrain.peers import heartbeat_timeout

    timeouts = {"heartbeat_timeout_seconds": heartbeat_timeout(peer_timeout)} if peer_timeout > 0 else {}
    if all(flags_given):
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
    else:
        jax.distributed.initialize(**timeouts)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
    """Runs the body on process 0 first, then on the others.

    For work whose result lands in the (possibly shared) workdir, such as
    training the tokenizer: the others then find it there instead of racing to
    write the same file. Without a shared filesystem they redo it, identically,
    because the work is deterministic.
    """
    multi = jax.process_count() > 1
    if multi and jax.process_index() != 0:
        _barrier(name)
    yield
    if multi and jax.process_index() == 0:
        _barrier(name)


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def merge_host_states(state: dict[str, Any]) -> dict[str, Any]:
    """The data iterator state of every process merged into one, the same on all
    (`pretrain.data.merge_states`): each process holds only the shards it reads,
    a checkpoint holds them all, so a run can resume on another number of hosts.
    A collective when there are several processes (every process must call it);
    with one, `state` itself, at no cost."""
    if jax.process_count() == 1:
        return state
    from pretrain.data import merge_states

    return merge_states(all_process_values(state))


def all_process_values(value: Any) -> list[Any]:
    """Every process's JSON-serializable `value`, in process order (a collective):
    the JSON bytes, padded to the longest, gathered with `process_allgather`."""
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(encoded)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(encoded)] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:length]).decode("utf-8")) for row, length in zip(gathered, lengths)]
