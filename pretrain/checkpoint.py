"""Orbax checkpoints of the whole run: model, optimizer, step and data-iterator state.

`workdir/checkpoints/<step>/` holds three items, none of them pickled (nothing in
a checkpoint can run code when it loads):

  state  parameters, optimizer state and step: Orbax's array format (TensorStore
         OCDBT files plus JSON metadata)
  data   the input iterator state, as JSON (the same on every host)
  meta   JSON saying what wrote the checkpoint (the run description the trainer
         passes: model shape with vocabulary size, optimizer, parallelism,
         tokenizer hash), the path, shape and dtype of every array, a checksum of
         every array and of the data state, and a checksum of itself

Saves are asynchronous; the last `keep` are kept. Restoring walks back from the
newest step. A checkpoint that cannot be read, or whose contents disagree with its
checksums, is damaged: it is reported with its step and skipped. The checksums
matter: Orbax restores an array file with bytes overwritten inside it without
complaint. A checkpoint written by a different model, optimizer structure or
tokenizer is not damaged but foreign: restoring stops with `CheckpointMismatch`,
which names the differences. One whose arrays are another arrangement of the same
state (the other layer layout, `pretrain.layers.layout_alternatives`) is restored
in that arrangement, verified, and converted. Nothing is ever deleted; `set_aside_newer_than` moves
damaged steps out of the way of the saves that will replace them.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pretrain.errors import UserError

log = logging.getLogger(__name__)

META_FORMAT = 1
DAMAGED_DIRNAME = "damaged_checkpoints"  # next to checkpoints/, where set_aside_newer_than moves steps


class CheckpointMismatch(ValueError):
    """A readable checkpoint that another model, optimizer or tokenizer wrote."""


TEMPORARY_MARK = ".orbax-checkpoint-tmp"  # in the name of a save Orbax has not finalised


class CheckpointWriteFailed(UserError, OSError):
    """A checkpoint could not be written (a full disk, a lost mount): the run stops,
    and the checkpoints already finished stay as they are."""


class NoGoodCheckpoint(UserError, RuntimeError):
    """Checkpoints exist, but every one of them is damaged (none was deleted)."""


class _Damaged(Exception):
    """A checkpoint that cannot be restored as it was saved (the message says why)."""


class Checkpointer:
    """Saves and restores (state, data_state) pairs under `workdir/checkpoints`.

    `run_info` (JSON-able) describes what writes the checkpoints; it is stored in
    each one and compared on restore. Without it (readers such as evaluation)
    only array shapes and checksums are checked.
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True,
                 run_info: Mapping[str, Any] | None = None):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.run_info = json.loads(json.dumps(run_info)) if run_info is not None else None  # as it reads back
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))
        self._pending: int | None = None  # the step of the newest save started

    def steps(self) -> list[int]:
        """Steps with a finished checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts an (asynchronous) save of `state` and the iterator state at `step`.
        The checksums are taken now, on the device, from the very arrays saved."""
        body = {"format": META_FORMAT, "step": int(step), "run": self.run_info,
                "arrays": array_signature(state), "checksums": array_checksums(state),
                "data_sha256": _sha256(data_state)}
        meta = {"body": body, "sha256": _sha256(body)}
        with self._writing(step):  # also finishes the previous asynchronous save, whose failure surfaces here
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        self._pending = step

    @contextlib.contextmanager
    def _writing(self, step: int) -> Iterator[None]:
        """Turns an OSError of a save (this one, or the asynchronous one before it)
        into one message naming the step, the cause and the checkpoints still intact."""
        try:
            yield
        except OSError as error:
            failed = self._pending if self._pending is not None and self._pending not in self.steps() else step
            self._pending = None
            intact = [s for s in self.steps() if s != failed]
            cause = os.strerror(error.errno) if error.errno else str(error)
            fix = "free space on that disk, then " if error.errno == errno.ENOSPC else "fix the cause, then "
            resume = (f"rerun the command to resume from step {intact[-1]}" if intact
                      else "rerun the command to start again")
            raise CheckpointWriteFailed(
                f"writing the checkpoint of step {failed} to {self.directory} failed: {cause}. The checkpoints "
                f"of steps {intact} are intact; {fix}{resume}") from None

    def restore(self, abstract_state: Any, step: int | None = None,
                alternatives: Sequence[tuple[Any, Callable[[Any], Any]]] = ()) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest good checkpoint (or of `step` alone,
        when given), or None when there is none. `abstract_state` gives shapes, dtypes
        and shardings. `alternatives` are other arrangements of the same state, each
        (its abstract state, a function from such a state to `abstract_state`'s
        arrangement): a checkpoint whose arrays are those of one is read in it,
        verified against its checksums, converted and placed as `abstract_state` says.

        Raises:
          CheckpointMismatch: the newest readable checkpoint was written for another
            model, optimizer structure or tokenizer.
          NoGoodCheckpoint: checkpoints exist but every one is damaged (none is deleted).
        """
        with _quiet_abandoned_reads():
            return self._restore(abstract_state, step, alternatives)

    def unfinished_saves(self) -> list[str]:
        """Orbax's temporary directories of saves that never finished (a process that
        stopped while writing): never restored from, whatever they hold."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        return sorted(name for name in names if TEMPORARY_MARK in name)

    def _restore(self, abstract_state: Any, only: int | None,
                 alternatives: Sequence[tuple[Any, Callable[[Any], Any]]]) -> tuple[int, Any, dict] | None:
        unfinished = self.unfinished_saves()
        if unfinished:
            log.warning("%s holds unfinished saves (%s) of a run stopped while writing them: they are ignored and "
                        "left in place (delete them when no longer needed); %s", self.directory,
                        ", ".join(unfinished), f"restoring from the finished checkpoints {self.steps()}"
                        if self.steps() else "there is no finished checkpoint, so the run starts from step 0")
        failures = []
        candidates = list(reversed(self.steps()))
        if only is not None:
            if only not in candidates:
                raise ValueError(f"there is no checkpoint of step {only} in {self.directory}; its checkpoints are at "
                                 f"steps {sorted(candidates)}")
            candidates = [only]
        for step in candidates:
            try:
                body = self._read_meta(step)
                stored, convert = abstract_state, None
                if body is None:
                    log.warning("checkpoint at step %d in %s has no checksum item (written by an older version of "
                                "this project): restored without verifying its arrays and data state", step,
                                self.directory)
                else:
                    stored, convert = _arrangement(body["arrays"], abstract_state, alternatives)
                    self._check_compatible(step, body, stored)
                state, data_state = self._read_state(step, body, stored)
                if convert is not None:
                    state = _placed(convert(state), abstract_state)
            except _Damaged as error:
                log.warning("checkpoint at step %d in %s is damaged (%s); trying the previous one",
                            step, self.directory, error)
                failures.append(step)
                continue
            if failures:
                log.warning("restored step %d; damaged checkpoints at steps %s were skipped and not deleted",
                            step, failures)
            return step, state, data_state
        if failures:
            raise NoGoodCheckpoint(
                f"no checkpoint in {self.directory} can be restored (damaged steps {failures}); nothing was "
                "deleted. Move the directory aside to start afresh, or restore it from a backup.")
        return None

    def written_by(self, step: int) -> dict | None:
        """The run description (`run_info`) stored with the checkpoint of `step`, or None
        when its meta item cannot be read (restoring reports that damage)."""
        try:
            return (self._read_meta(step) or {}).get("run")
        except _Damaged:
            return None

    def _read_meta(self, step: int) -> dict | None:
        """The checksums and run description saved with `step`; None for a checkpoint
        written before they existed (an older version of this project: no meta item)."""
        step_directory = os.path.join(self.directory, str(step))
        if os.path.isdir(os.path.join(step_directory, "state")) and not os.path.exists(
                os.path.join(step_directory, "meta")):
            return None
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            body = meta["body"]
            intact = meta["sha256"] == _sha256(body)
        except Exception as error:  # noqa: BLE001 — whatever Orbax or JSON raise, the item is unreadable
            raise _Damaged(f"its meta item cannot be read: {_first_line(error)}") from error
        if not intact:
            raise _Damaged("its meta item does not match its own checksum")
        return body

    def _check_compatible(self, step: int, body: dict, abstract_state: Any) -> None:
        """Raises CheckpointMismatch when the checkpoint was written for another run
        shape; warns about other changed settings, which a resume may legitimately make."""
        wanted = array_signature(abstract_state)
        stored_run, run = body.get("run") or {}, self.run_info or {}
        changes = _differences(stored_run, run) if stored_run and run else []
        array_changes = _array_differences(body["arrays"], wanted)
        tokenizer_changed = any(key == "tokenizer_sha256" for key, _, _ in changes)
        if not array_changes and not tokenizer_changed:
            if changes:
                log.warning("checkpoint at step %d was written with other settings (%s); continuing with the "
                            "current ones", step, _describe(changes))
            return
        what = "tokenizer" if tokenizer_changed and not array_changes else "model or optimizer configuration"
        details = [_describe(changes)] if changes else []
        if array_changes:
            more = len(array_changes) - 3
            details.append(f"arrays: {'; '.join(array_changes[:3])}" + (f" (and {more} more)" if more > 0 else ""))
        raise CheckpointMismatch(
            f"checkpoint at step {step} in {self.directory} was written by a different {what}: "
            f"{'; '.join(details)}. Resume with the settings the run started with (its "
            "config.json and tokenizer.model in the workdir), or pass a new --workdir to start a new run.")

    def _read_state(self, step: int, body: dict | None, abstract_state: Any) -> tuple[Any, dict]:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as error:  # noqa: BLE001 — any failure means "this one is damaged"
            raise _Damaged(f"{type(error).__name__}: {_first_line(error)}") from error
        if body is None:  # nothing to verify against
            return restored["state"], restored["data"]
        found = array_checksums(restored["state"])
        bad = [path for path, checksum in body["checksums"].items() if found.get(path) != checksum]
        if bad:
            raise _Damaged(f"{len(bad)} array(s) differ from their checksums, e.g. {bad[0]}")
        if _sha256(restored["data"]) != body["data_sha256"]:
            raise _Damaged("the data-iterator state differs from its checksum")
        return restored["state"], restored["data"]

    def set_aside_newer_than(self, step: int, primary: bool = True) -> list[str]:
        """Moves checkpoints after `step` (the damaged ones `restore` skipped) to
        `workdir/damaged_checkpoints/`, so the run can save those steps again; returns
        where they went. Only the primary process moves; every process reloads."""
        moved = []
        if primary:
            target_root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIRNAME)
            for newer in (s for s in self.steps() if s > step):
                os.makedirs(target_root, exist_ok=True)
                target, suffix = os.path.join(target_root, str(newer)), 1
                while os.path.exists(target):
                    suffix += 1
                    target = os.path.join(target_root, f"{newer}.{suffix}")
                os.rename(os.path.join(self.directory, str(newer)), target)
                log.warning("moved the damaged checkpoint of step %d to %s (kept for inspection; delete it when "
                            "no longer needed)", newer, target)
                moved.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        with self._writing(self._pending or 0):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class _UnretrievedTaskErrors(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """When one array of a damaged checkpoint fails to read, Orbax raises that error
    and abandons the other reads, which then report at length: asyncio logs each
    failed task, the abandoned coroutines complain, and TensorStore's callbacks each
    print 'Event loop is closed'. The one warning `restore` gives says it all, so
    these are silenced while it runs."""
    logger, quiet, previous_hook = logging.getLogger("asyncio"), _UnretrievedTaskErrors(), sys.unraisablehook

    def hook(unraisable: Any) -> None:
        loop_closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # an abandoned Orbax read coroutine
        if not (loop_closed or (code is not None and "orbax" in code.co_filename)):
            previous_hook(unraisable)

    logger.addFilter(quiet)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()  # abandoned tasks report when collected: while the filters are on
        sys.unraisablehook = previous_hook
        logger.removeFilter(quiet)


def _arrangement(arrays: Mapping[str, list], abstract_state: Any,
                 alternatives: Sequence[tuple[Any, Callable[[Any], Any]]]) -> tuple[Any, Callable | None]:
    """(the abstract state to read a checkpoint with these `arrays` into, the conversion
    to `abstract_state` or None): the first alternative whose arrays they are, else
    `abstract_state` itself (whose differences `_check_compatible` then names)."""
    if array_signature(abstract_state) != arrays:
        for abstract, convert in alternatives:
            if array_signature(abstract) == arrays:
                return abstract, convert
    return abstract_state, None


def _placed(state: Any, abstract_state: Any) -> Any:
    """`state`'s arrays in `abstract_state`'s tree (matched by path, as in
    `array_signature`) and on its shardings."""
    arrays = dict(zip(array_signature(state), jax.tree.leaves(state)))
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    leaves = []
    for path, want in paths:
        array = arrays[jax.tree_util.keystr(path, simple=True, separator="/")]
        sharding = getattr(want, "sharding", None)
        leaves.append(jax.device_put(array, sharding) if sharding is not None else array)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def array_signature(tree: Any) -> dict[str, list]:
    """{'params/.../kernel/value': [shape, dtype]} of every array (or ShapeDtypeStruct)
    in `tree`, with the path spelling Orbax's own metadata tree gives too."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): [list(leaf.shape), str(np.dtype(leaf.dtype))]
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def array_checksums(tree: Any) -> dict[str, int]:
    """{path: uint32 checksum} of every array of `tree` (paths as in `array_signature`),
    computed on the device, so no array is copied to the host; see `_checksum`."""
    return dict(zip(array_signature(tree), (int(value) for value in jax.device_get(_checksums(tree)))))


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
    return [_checksum(leaf) for leaf in jax.tree.leaves(tree)]


def _checksum(array: jax.Array) -> jax.Array:
    """sum_i bits_i * (2 i + 1) mod 2**32 over the array's 32-bit words. The weights
    are odd, so any single changed word changes the sum; independent of sharding,
    because unsigned wrapping addition is exact in any order."""
    if array.dtype == jnp.bool_:
        words = array.astype(jnp.uint32)
    elif array.dtype.itemsize in (1, 2):
        words = jax.lax.bitcast_convert_type(array, {1: jnp.uint8, 2: jnp.uint16}[array.dtype.itemsize])
        words = words.astype(jnp.uint32)
    else:  # 4 bytes, or 8 (a trailing axis of two words appears)
        words = jax.lax.bitcast_convert_type(array, jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:300]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in the checkpoint, value now) for every differing flattened field."""
    old, new = _flatten(stored), _flatten(current)
    return [(key, old.get(key, "<unset>"), new.get(key, "<unset>"))
            for key in sorted(set(old) | set(new)) if old.get(key, "<unset>") != new.get(key, "<unset>")]


def _describe(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key} is {old!r} there and {new!r} now" for key, old, new in changes)


def _array_differences(stored: Mapping[str, list], wanted: Mapping[str, list]) -> list[str]:
    out = []
    for path in sorted(set(stored) | set(wanted), key=lambda p: (not p.startswith("params/"), p)):
        if path not in wanted:
            out.append(f"{path} is in the checkpoint but not in the model")
        elif path not in stored:
            out.append(f"{path} is missing from the checkpoint")
        elif stored[path] != wanted[path]:
            (shape, dtype), (want_shape, want_dtype) = stored[path], wanted[path]
            out.append(f"{path} is {tuple(shape)} {dtype} there and {tuple(want_shape)} {want_dtype} now")
    return out
