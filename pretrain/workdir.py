"""The run directory before training starts: usable, big enough, and ours alone.

Problems a run would otherwise meet only at its first checkpoint (an hour in) are
found here, before anything is compiled: a workdir that cannot be created or
written, a disk without room for one checkpoint, and a second training process on
the same workdir. The last is prevented by an exclusive `flock` on
`workdir/train.lock`, held for as long as the trainer lives; the trainer removes
the file when it closes (a failed start included), and the kernel drops the lock
when the process dies, so a rerun after a crash or SIGKILL is never blocked by a
stale lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any

import jax
import numpy as np

from pretrain.errors import UserError

LOCK_FILENAME = "train.lock"
# Orbax metadata, the data-iterator JSON and filesystem slack on top of the arrays.
CHECKPOINT_OVERHEAD_BYTES = 16 << 20


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot hold this run; the message names the path and the fix."""


class WorkdirLocked(WorkdirError):
    """Another live process is training in this workdir."""


def prepare_workdir(workdir: str | os.PathLike) -> str:
    """Creates `workdir` (and missing parents) and proves it writable; returns its absolute path.

    A write probe, not `os.access`, decides: permission bits say nothing about
    read-only mounts, immutable directories or a root user.
    """
    path = os.path.abspath(os.fspath(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {path} exists but is not a directory; pass --workdir=<a directory path>")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        ancestor = _nearest_existing(path)
        if not os.path.isdir(ancestor):
            raise WorkdirError(f"cannot create workdir {path}: {ancestor} is a file, not a directory, so nothing can "
                               f"be created under it. Pass a --workdir whose parents are directories, or move "
                               f"{ancestor} out of the way") from error
        raise WorkdirError(f"cannot create workdir {path}: {ancestor} does not allow creating "
                           f"{os.path.relpath(path, ancestor)} in it ({error.strerror}). Create it yourself "
                           f"(mkdir -p {path}) or pass a --workdir on a writable disk") from error
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("probe")
        os.remove(probe)
    except OSError as error:
        raise WorkdirError(f"workdir {path} is not writable ({error.strerror}); fix its permissions "
                           f"(e.g. chmod u+w {path}) or pass a --workdir on a writable disk") from error
    return path


def _nearest_existing(path: str) -> str:
    """The deepest existing prefix of `path` (a file, when a file blocks the way)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def checkpoint_bytes(abstract_state: Any) -> int:
    """Bytes one checkpoint of `abstract_state` (arrays or ShapeDtypeStructs) takes on disk, at most."""
    arrays = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract_state))
    return arrays + CHECKPOINT_OVERHEAD_BYTES


def check_free_space(workdir: str | os.PathLike, needed_bytes: int) -> None:
    """Raises WorkdirError when the workdir's filesystem has less than `needed_bytes` free."""
    stats = os.statvfs(workdir)
    free = stats.f_bavail * stats.f_frsize
    if free < needed_bytes:
        raise WorkdirError(
            f"not enough free space in {os.fspath(workdir)} for one checkpoint: {_size(free)} free, a checkpoint "
            f"of this model and optimizer state needs about {_size(needed_bytes)}. Free space on that disk or pass "
            "a --workdir on a larger one")


def _size(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    index = 0
    while count >= 1024 and index < len(units) - 1:
        count, index = count / 1024, index + 1
    return f"{count:.1f} {units[index]}"


class WorkdirLock:
    """An exclusive, non-blocking `flock` on `workdir/train.lock` (a context manager).

    The file also records who holds it (pid, host, start time, command), so the
    process that is refused can say whom it met. `release` removes the file while
    still holding the lock; a process that opened it just before then locks a file
    no longer at the path, sees so and opens the path afresh, so two holders never
    coexist. A process killed before release leaves the file, holding nothing (the
    kernel releases the lock with the process).
    """

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = os.path.join(os.fspath(workdir), LOCK_FILENAME)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 — held for the lock's lifetime
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.close()
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise WorkdirLocked(
                    f"workdir {os.path.dirname(self.path)} is in use by another training process "
                    f"({_holder(self.path)}); two runs on one workdir would overwrite each other's checkpoints. Wait "
                    "for it to finish or stop it, or pass another --workdir") from None
            if _same_file(handle, self.path):
                break
            handle.close()  # the holder before us removed it between our open and our lock
        self._handle = handle
        self._handle.seek(0)
        self._handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv)}, self._handle)
        self._handle.flush()

    def release(self) -> None:
        """Removes the lock file and drops the lock (idempotent)."""
        if not self._handle.closed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # still locked: see the class docstring
            self._handle.close()  # closing the descriptor releases the flock

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _same_file(handle: Any, path: str) -> bool:
    """Whether the open `handle` is the file now at `path`."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def _holder(path: str) -> str:
    """Who the lock file says holds it, in words."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}: {info['command']}"
    return f"see {path}"
