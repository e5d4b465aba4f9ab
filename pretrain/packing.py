"""Packing examples into rows of exactly `seq_len`.

Each row holds whole examples one after another; `segment_ids` numbers them
1, 2, ... and marks padding 0, which is all the attention rule needs to keep
examples apart. Positions already restart at 0 in every example (the objectives
write them). The example-level `nsp_label` travels as `nsp_labels`: the label at
the example's first token, -1 everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from objectives.example import NO_NSP_LABEL, TOKEN_FIELDS, Example
from pretrain.errors import raise_problems

PACKED_FIELDS = TOKEN_FIELDS + ("segment_ids", "nsp_labels")
STRATEGIES = ("first_fit", "best_fit")


def strategy_problems(strategy: str) -> list[str]:
    """Why `strategy` is no packing strategy (`config.data.packing`), or nothing."""
    return [] if strategy in STRATEGIES else [f"config.data.packing={strategy!r} must be one of {STRATEGIES}"]


def assign_rows(lengths: Sequence[int], seq_len: int, strategy: str = "best_fit") -> list[list[int]]:
    """Example indices per row. `first_fit` puts each example in the first row
    with room, `best_fit` in the row it fills most tightly; a new row opens when
    none fits. Examples keep their order within a row."""
    raise_problems(strategy_problems(strategy))
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        if length > seq_len:
            raise ValueError(f"example {index} has {length} tokens, more than seq_len={seq_len}")
        fitting = [row for row, free in enumerate(room) if free >= length]
        if not fitting:
            rows.append([index])
            room.append(seq_len - length)
            continue
        row = fitting[0] if strategy == "first_fit" else min(fitting, key=lambda r: room[r])
        rows[row].append(index)
        room[row] -= length
    return rows


def pack_row(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One row [seq_len] per field from examples that fit together."""
    row = {name: np.zeros(seq_len, np.float32 if name == "weights" else np.int32)
           for name in PACKED_FIELDS}
    row["nsp_labels"][:] = NO_NSP_LABEL
    offset = 0
    for segment, example in enumerate(examples, start=1):
        end = offset + len(example)
        if end > seq_len:
            raise ValueError(f"examples of {end} tokens do not fit in seq_len={seq_len}")
        for name, values in example.fields().items():
            row[name][offset:end] = values
        row["segment_ids"][offset:end] = segment
        row["nsp_labels"][offset] = example.nsp_label
        offset = end
    return row


def pack(examples: Sequence[Example], seq_len: int, strategy: str = "best_fit") -> dict[str, np.ndarray]:
    """All examples packed into [rows, seq_len] arrays per field."""
    rows = [pack_row([examples[i] for i in members], seq_len)
            for members in assign_rows([len(e) for e in examples], seq_len, strategy)]
    return {name: np.stack([row[name] for row in rows]) for name in PACKED_FIELDS}
