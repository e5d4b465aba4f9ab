"""Packing examples into rows of exactly `seq_len`.

Each row holds whole examples one after another; `segment_ids` numbers them
1, 2, ... and marks padding 0, which is all the attention rule needs to keep
examples apart. Positions already restart at 0 in every example (the objectives
write them). The per-token fields of the objectives' loss terms (`objectives.terms`)
travel the same way: every row has every field the mixture declares, filled with the
field's fill value where an example does not carry it and in the padding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from objectives.example import TOKEN_FIELDS, Example
from pretrain.errors import raise_problems

PACKED_FIELDS = TOKEN_FIELDS + ("segment_ids",)  # and the fields of the loss terms
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


def pack_row(examples: Sequence[Example], seq_len: int, term_fields: Mapping[str, int] | None = None
             ) -> dict[str, np.ndarray]:
    """One row [seq_len] per field from examples that fit together; `term_fields` are
    the loss terms' fields with their fill values (`Mixture.term_fields`)."""
    term_fields = dict(term_fields or {})
    row = {name: np.zeros(seq_len, np.float32 if name == "weights" else np.int32) for name in PACKED_FIELDS}
    row.update({name: np.full(seq_len, fill, np.int32) for name, fill in term_fields.items()})
    offset = 0
    for segment, example in enumerate(examples, start=1):
        end = offset + len(example)
        if end > seq_len:
            raise ValueError(f"examples of {end} tokens do not fit in seq_len={seq_len}")
        unknown = sorted(set(example.extras) - set(term_fields))
        if unknown:
            raise ValueError(f"an example carries fields {unknown} that no loss term of the packed mixture reads "
                             f"(declared: {sorted(term_fields)})")
        for name, values in example.fields().items():
            row[name][offset:end] = values
        row["segment_ids"][offset:end] = segment
        offset = end
    return row


def packer(term_fields: Mapping[str, int]) -> Callable[[Sequence[Example], int], dict[str, np.ndarray]]:
    """`pack_row` for a mixture whose loss terms read `term_fields`."""
    return functools.partial(pack_row, term_fields=dict(term_fields))


def pack(examples: Sequence[Example], seq_len: int, strategy: str = "best_fit",
         term_fields: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """All examples packed into [rows, seq_len] arrays per field."""
    rows = [pack_row([examples[i] for i in members], seq_len, term_fields)
            for members in assign_rows([len(e) for e in examples], seq_len, strategy)]
    names = (*PACKED_FIELDS, *(term_fields or {}))
    return {name: np.stack([row[name] for row in rows]) for name in names}
