"""Fused attention over per-query key ranges, through tokamax's kernels.

The dense path (`pretrain.model.Attention.attend`) writes out an [B, H, L, L]
score array; this one hands `tokamax` the queries, keys, values and the O(L)
integers of `pretrain.attention.key_ranges`, and its kernels skip every block
outside a query's range: memory linear in L, and work in proportion to what is
visible. Which kernel runs depends on the backend:

    gpu  Mosaic GPU (sm90/sm100), else Pallas-Triton
    tpu  Mosaic TPU (splash)
    cpu  tokamax's chunked XLA path: the same blockwise softmax in plain XLA, the
         reference the tests compare against the dense path (flash kernels do not
         run on CPU, and tokamax's Pallas kernels have no interpret mode)

A kernel that does not support a call raises NotImplementedError and the next one
is tried; the chunked XLA path is the last resort everywhere. The kernel a trace
chose is recorded in `CHOSEN`, so a run can say which one trained it.

tokamax's public `dot_product_attention` takes a boolean mask only; its
implementations take the range mask (`base.Mask(k_start=..., k_end=...)`), so
this module, the one place that imports tokamax, reaches for those.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

KERNELS_BY_BACKEND = {"gpu": ("mosaic_gpu", "triton"), "tpu": ("mosaic_tpu",), "cpu": ()}
CHOSEN: dict[str, str] = {}  # backend -> the kernel the latest trace used


def _chunk(length: int, largest: int = 512) -> int:
    """The largest power of two up to `largest` dividing `length` (the chunked
    path needs the query length to be a multiple of its chunk)."""
    chunk = largest
    while length % chunk:
        chunk //= 2
    return chunk


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array, k_end: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v [B, L, H, K] where query i of row b sees keys
    `[k_start[b, i], k_end[b, i])` only; q, k, v [B, L, H, K], ranges int [B, L].

    Logits and softmax statistics are float32 whatever the compute dtype."""
    from absl import flags
    from tokamax._src.ops.attention import api, base, xla_chunked

    if not flags.FLAGS.is_parsed():  # tokamax reads its options as absl flags, else parsing sys.argv (a
        flags.FLAGS.mark_as_parsed()  # library call, a test runner): its defaults, not someone else's arguments
    mask = base.Mask(k_start=k_start[:, None, :], k_end=k_end[:, None, :])
    backend = jax.default_backend()
    names = KERNELS_BY_BACKEND.get(backend, ())
    kernels = [(name, api.IMPLEMENTATIONS[name]) for name in names if name in api.IMPLEMENTATIONS]
    length = q.shape[1]
    kernels.append(("xla_chunked", xla_chunked.XlaChunkedDotProductAttention(
        chunk_size=(_chunk(length), _chunk(length)))))
    skipped = []
    for name, kernel in kernels:
        try:
            out = kernel(q, k, v, mask=mask, logits_dtype=jnp.float32)
        except NotImplementedError as error:
            skipped.append(f"{name}: {error}")
            continue
        if CHOSEN.get(backend) != name:
            CHOSEN[backend] = name
            if skipped and names:
                log.warning("flash attention on %s runs %s; skipped %s", backend, name, "; ".join(skipped))
        return out.astype(v.dtype)
    raise NotImplementedError("no flash attention kernel runs this call: " + "; ".join(skipped))
