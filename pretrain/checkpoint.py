"""Orbax checkpoints of the whole run: model, optimizer, step and data-iterator state.

`workdir/checkpoints/<step>/` holds `state` (parameters, optimizer state, step; Orbax's
standard array format, no pickle) and `data` (the input iterator state as JSON; the
same on every host, because every host runs the same stream). Saves are
asynchronous; the last `keep` are kept. Restoring walks back from the newest step: a
checkpoint that fails to load is reported with its step and skipped, and nothing is
deleted.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores (state, data_state) pairs under `workdir/checkpoints`."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        """Steps with a finished checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts an (asynchronous) save of `state` and the iterator state at `step`."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest loadable checkpoint, or None when
        there is none. `abstract_state` gives shapes, dtypes and shardings."""
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as error:  # noqa: BLE001 — any failure means "this one is damaged"
                log.warning("checkpoint at step %d in %s cannot be restored (%s: %s); trying the previous one",
                            step, self.directory, type(error).__name__, str(error).splitlines()[0][:300])
                failures.append(step)
                continue
            if failures:
                log.warning("resumed from step %d; damaged checkpoints left in place: %s", step, failures)
            return step, restored["state"], restored["data"]
        if failures:
            raise RuntimeError(
                f"no checkpoint in {self.directory} can be restored (damaged steps {failures}); nothing was "
                "deleted. Move the directory aside to start afresh, or restore it from a backup.")
        return None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
