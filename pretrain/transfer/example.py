"""What a task is made of: `TaskExample`, and `Record`, one row of a user's task file.

Both sit below the task kinds (`pretrain.transfer.kinds`), which turn records into
examples and examples into rows, and below `tasks`, which gathers examples into
splits; so neither imports the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

FINGERPRINTED_FIELDS = 5  # the fields every example has hashed since fingerprints began


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One example. Classification: `text` (and `text_b` for pairs) and `label`, an
    index into the task's labels; regression: `label` is the value; tagging: `words`
    and `tags` (indices into the task's labels), one tag per word; extractive
    question answering: the question `text`, the passage `text_b` and `answers`, the
    character spans [start, end) of the passage that answer it.

    Fields after the first five (`answers`) enter a task's fingerprint only when set
    (`tasks.fingerprint`), so a task without them keeps the fingerprint it had."""

    text: str = ""
    text_b: str | None = None
    label: float = 0
    words: tuple[str, ...] = ()
    tags: tuple[int, ...] = ()
    answers: tuple[tuple[int, int], ...] = ()

    def hashed(self) -> tuple:
        """The fields a fingerprint hashes: every field up to the last one set beyond
        the first five."""
        values = dataclasses.astuple(self)
        while len(values) > FINGERPRINTED_FIELDS and values[-1] == ():
            values = values[:-1]
        return values


@dataclasses.dataclass(frozen=True)
class Record:
    """One row of a task file as read, before its kind checks it: where it stands
    (`file:line`, for messages) and its fields (a JSON object's, a table row's cells by
    column, or a CoNLL sentence's `tokens` and `tags`)."""

    where: str
    fields: Mapping[str, Any]
