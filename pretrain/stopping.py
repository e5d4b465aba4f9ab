"""Stop requests: SIGTERM (preemption) and Ctrl-C save at the next step boundary.

A preemption notice (SIGTERM) and the first Ctrl-C (SIGINT) both ask the training
loop to finish the step that is running, save a checkpoint of it and exit 0;
nothing trained is lost. A second Ctrl-C aborts at once (`KeyboardInterrupt`),
for a user who cannot wait for the save. The loop checks the request before it
dispatches each step and never runs more than one step ahead of the device, so
the checkpoint is of the step that was running when the signal came.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("pretrain.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers for SIGTERM and SIGINT while the loop runs (main thread
    only; elsewhere signals keep their handlers and `requested` stays None)."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked to stop
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if self.requested is not None and number == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: aborted without saving")
        if self.requested is None:
            again = " (press Ctrl-C again to abort without saving)" if number == signal.SIGINT else ""
            log.warning("%s received: saving a checkpoint at the end of the current step, then exiting%s",
                        name, again)
        self.requested = name

    def close(self) -> None:
        """Gives the signals back their previous handlers (idempotent)."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
