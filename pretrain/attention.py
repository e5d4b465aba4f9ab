"""The one attention rule, built on the device from per-token segment ids and kinds.

For query token i and key token j of the same packed row::

    visible(i, j) = seg[i] == seg[j] != 0 and (
          kind[j] == PREFIX
       or (kind[j] == ENCODER_ONLY and kind[i] in (PREFIX, ENCODER_ONLY))
       or (kind[i] == L2R and kind[j] == L2R and j <= i)
       or (kind[i] == R2L and kind[j] == R2L and j >= i))

An ENCODER_ONLY token is a PREFIX token hidden from the L2R and R2L parts (MASS's
decoder never reads the [MASK]ed source positions); as a query it is a PREFIX token.

Worked example (DESIGN.md section 3): a seq2seq example with 3 source and 2 target
tokens, a causal example of 3 tokens and one pad, `seg = 1 1 1 1 1 2 2 2 0`,
`kind = P P P L L L L L P`, gives (rows are queries, columns keys)::

    1 1 1 0 0 0 0 0 0
    1 1 1 0 0 0 0 0 0
    1 1 1 0 0 0 0 0 0
    1 1 1 1 0 0 0 0 0
    1 1 1 1 1 0 0 0 0
    0 0 0 0 0 1 0 0 0
    0 0 0 0 0 1 1 0 0
    0 0 0 0 0 1 1 1 0
    0 0 0 0 0 0 0 0 0

Only O(L) integers per row travel to the device; the L x L mask is computed there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.example import ENCODER_ONLY, L2R, PREFIX, R2L


def visibility(
    query_segments: jax.Array,  # int [B, Tq]
    query_kinds: jax.Array,  # int [B, Tq]
    query_slots: jax.Array,  # int [B, Tq] or [Tq]: index of each query in its row
    key_segments: jax.Array,  # int [B, Tk]
    key_kinds: jax.Array,  # int [B, Tk]
    key_slots: jax.Array,  # int [B, Tk] or [Tk]
) -> jax.Array:
    """bool [B, Tq, Tk]: which keys each query may attend to (the rule above).

    Slots order tokens within a row, so the same function serves a full packed row
    (slots 0..L-1 for both sides) and incremental decoding against a KV cache.
    """
    q_seg, k_seg = query_segments[:, :, None], key_segments[:, None, :]
    q_kind, k_kind = query_kinds[:, :, None], key_kinds[:, None, :]
    q_slot = jnp.broadcast_to(query_slots, query_segments.shape)[:, :, None]
    k_slot = jnp.broadcast_to(key_slots, key_segments.shape)[:, None, :]
    same_example = (q_seg == k_seg) & (q_seg != 0)
    left_to_right = (q_kind == L2R) & (k_kind == L2R) & (k_slot <= q_slot)
    right_to_left = (q_kind == R2L) & (k_kind == R2L) & (k_slot >= q_slot)
    source_only = (k_kind == ENCODER_ONLY) & ((q_kind == PREFIX) | (q_kind == ENCODER_ONLY))
    return same_example & ((k_kind == PREFIX) | source_only | left_to_right | right_to_left)


def attention_mask(segment_ids: jax.Array, attention_kind: jax.Array) -> jax.Array:
    """bool [B, 1, L, L] mask of a packed batch (the head axis broadcasts).

    Padding (segment 0) rows see nothing; the model's attention then spreads
    their weight uniformly instead of dividing by zero, so they carry no NaN, and
    no real token ever attends to them.
    """
    slots = jnp.arange(segment_ids.shape[-1])
    mask = visibility(segment_ids, attention_kind, slots, segment_ids, attention_kind, slots)
    return mask[:, None, :, :]


# -- the same rule as key ranges, for fused kernels ----------------------------------

ATTENTION_CHOICES = ("dense", "flash", "auto")
KEY_RANGE_KINDS = frozenset({PREFIX, L2R, R2L})  # layouts of these kinds give each query one key range


def has_key_ranges(kinds: frozenset[int] | set[int]) -> bool:
    """Whether a layout of these attention kinds gives every query one contiguous
    range of visible keys (what a fused kernel with per-query `k_start`/`k_end`
    runs exactly): true for PREFIX, L2R and R2L, whose examples put their PREFIX
    part first. ENCODER_ONLY breaks it: a decoder query then sees the source minus
    its hidden positions, which is not one range."""
    return set(kinds) <= KEY_RANGE_KINDS


def key_ranges(segment_ids: jax.Array, attention_kind: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 [B, L] `k_start` (inclusive) and `k_end` (exclusive) of every query.

    The rule above for layouts with `has_key_ranges`: a PREFIX query sees its
    example's PREFIX part `[start, start + n_prefix)`; an L2R query sees
    `[start, i + 1)` (the prefix, then itself and the L2R tokens before it); an
    R2L query sees `[i, end)`. Segments are contiguous in a packed row, so
    `start` and `end` come from running maxima and minima of the boundaries:
    O(L) work, no L x L array. A padding query gets its own slot, `[i, i + 1)`,
    so it carries no NaN, and no real query's range ever reaches it.
    """
    length = segment_ids.shape[-1]
    slots = jnp.arange(length, dtype=jnp.int32)
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    start = jax.lax.cummax(jnp.where(segment_ids != previous, slots, 0), axis=1)
    end = jax.lax.cummin(jnp.where(segment_ids != following, slots + 1, length), axis=1, reverse=True)
    prefix_count = jnp.cumsum((attention_kind == PREFIX).astype(jnp.int32), axis=1)
    before_start = jnp.take_along_axis(jnp.pad(prefix_count, ((0, 0), (1, 0))), start, axis=1)
    prefix_end = start + jnp.take_along_axis(prefix_count, end - 1, axis=1) - before_start
    k_start = jnp.where(attention_kind == R2L, slots, start)
    k_end = jnp.where(attention_kind == L2R, slots + 1, jnp.where(attention_kind == R2L, end, prefix_end))
    padding = segment_ids == 0
    return jnp.where(padding, slots, k_start), jnp.where(padding, slots + 1, k_end)


def choose_attention(requested: str, kinds: frozenset[int] | set[int]) -> tuple[str, str | None]:
    """The attention path (`config.model.attention`) a run of these kinds takes, and
    why it differs from `requested` (None when it does not).

    'flash' and 'auto' fall back to 'dense' for a layout without key ranges (the
    one line the trainer logs). 'auto' itself is resolved by the model when it is
    traced: the fused kernel on accelerators, the dense path on CPU."""
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"config.model.attention={requested!r} must be one of {ATTENTION_CHOICES}")
    if requested != "dense" and not has_key_ranges(kinds):
        names = {PREFIX: "PREFIX", L2R: "L2R", R2L: "R2L", ENCODER_ONLY: "ENCODER_ONLY"}
        hidden = ", ".join(sorted(names.get(kind, str(kind)) for kind in set(kinds) - KEY_RANGE_KINDS))
        return "dense", (f"config.model.attention={requested!r} falls back to 'dense': the objectives use "
                         f"attention kind {hidden}, whose queries do not see one contiguous key range")
    return requested, None
