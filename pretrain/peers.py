"""The other processes of a multi-process run: is any of them lost, and do all agree
to stop at this step.

Lost peers. A SIGKILLed process stops taking part in collectives, so the others
block in the next one. JAX's coordination service notices through its heartbeats,
after `heartbeat_timeout_seconds` (JAX's default: 100 s), and then aborts every
process with a C++ stack trace; when the lost process is process 0, the
coordination service itself is gone and JAX aborts the others within a second,
with a message naming the leader task. `PeerWatch` makes the first case bounded and
plain: each process bumps its own counter in the coordination service's key-value
store every `interval` seconds from a thread (so a slow step, a long compilation or
a big save never looks like a lost peer), reads the others' counters, and when one
has not moved for `timeout` seconds of this process's own clock (no clocks are
compared across hosts), prints one line naming the lost process(es) and exits
with `EXIT_PEER_LOST`, leaving the newest finalised checkpoint as it is. JAX's
heartbeat timeout is set above ours (`heartbeat_timeout`), so ours speaks first.

Agreed stop. SIGTERM (preemption) may reach one process, or reach them at
different steps. `any_process` ORs a flag over all processes; the training loop
calls it once per step on every process, in lockstep, so every process sees the
request at the same step and all of them save that step and exit 0.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax
import numpy as np

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: rerun every process with the same command to resume
_KEY = "pretrain/alive/{}"


def heartbeat_timeout(peer_timeout: float) -> int:
    """JAX's heartbeat timeout for a run whose `PeerWatch` waits `peer_timeout`
    seconds: later than ours, so the lost peer is named by our line, not by an abort."""
    return int(max(100, 2 * peer_timeout + 10))


class PeerWatch:
    """A daemon thread that notices lost processes (see the module docstring).

    Inactive (no thread) with one process. `on_lost(message)` defaults to printing
    the message to stderr and `os._exit(EXIT_PEER_LOST)`; a test may pass its own.
    Watch the whole command (`with PeerWatch(...)`), not just the loop: a process
    can also be left waiting for a lost peer while it exits.
    """

    def __init__(self, timeout: float, interval: float = 1.0, on_lost=None, client=None):
        self.timeout, self.interval = timeout, interval
        self.on_lost = on_lost or _exit_naming
        self.process, self.count = jax.process_index(), jax.process_count()
        self._client = client
        self._stop = threading.Event()
        self._thread = None
        if self.count > 1 and timeout > 0:
            if self._client is None:
                from jax._src import distributed as jax_distributed

                self._client = jax_distributed.global_state.client
            self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        beat = 0
        seen = {peer: (None, time.monotonic()) for peer in range(self.count) if peer != self.process}
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                self._client.key_value_set(_KEY.format(self.process), str(beat), allow_overwrite=True)
                values = {peer: self._beat_of(peer) for peer in seen}
            except Exception as error:  # noqa: BLE001 - the coordination service itself is unreachable
                if self._stop.is_set():
                    return
                self.on_lost(f"process {self.process} of {self.count} lost the coordination service on process 0 "
                             f"({type(error).__name__}); process 0 is lost. {_ADVICE}")
                return
            now = time.monotonic()
            for peer, value in values.items():
                if value != seen[peer][0]:
                    seen[peer] = (value, now)
            # A peer counts only once it has beaten: one still starting up is JAX's heartbeat's to judge.
            lost = sorted(peer for peer, (value, changed) in seen.items()
                          if value is not None and now - changed > self.timeout)
            if lost:
                names = ", ".join(str(peer) for peer in lost)
                self.on_lost(f"process {self.process} of {self.count}: process {names} sent no sign of life for "
                             f"{self.timeout:g} s (config.peer_timeout_seconds); it is lost, so this process stops "
                             f"without saving. {_ADVICE}")
                return

    def _beat_of(self, peer: int) -> str | None:
        """The newest counter `peer` wrote (None before its first)."""
        try:
            return self._client.key_value_try_get(_KEY.format(peer))
        except Exception as error:  # noqa: BLE001 - JAX raises its runtime error for a missing key
            if "NOT_FOUND" in str(error):
                return None
            raise

    def close(self) -> None:
        """Stops the thread (idempotent); the run's own end, not a lost peer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None

    def __enter__(self) -> PeerWatch:
        return self

    def __exit__(self, error_type: type | None, *rest: object) -> None:
        """Stops watching when the body ended normally. After an error it keeps
        watching: a process whose peer died fails in a collective, then waits for
        that peer again while exiting (Orbax's final wait, JAX's shutdown barrier),
        and the watch is what ends that wait."""
        if error_type is None:
            self.close()


_ADVICE = ("The newest finalised checkpoint is intact; rerun every process with the same command to resume from it")


def _exit_naming(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective every process must call at
    the same point; with one process, `flag` itself at no cost)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))).any())
