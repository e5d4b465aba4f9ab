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
