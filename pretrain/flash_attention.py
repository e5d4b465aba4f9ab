"""Fused attention over per-query key ranges, through tokamax's kernels.

The dense path (`pretrain.layers.Attention.attend`) writes out an [B, H, L, L]
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
chose is recorded in `CHOSEN`, so a run can say which one trained it
(`pretrain.model.attention_kernel`, in every row of a run's metrics.jsonl).

tokamax's public `dot_product_attention` takes a boolean mask only; its
implementations take the range mask (`base.Mask(k_start=..., k_end=...)`), so
this module, the one place that imports tokamax, reaches for those private names,
all in `tokamax_internals`. They may move in any release: pyproject.toml pins the
tokamax versions tested, and a kernel we ask for that the installed tokamax lacks
is named in a warning rather than silently skipped.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

KERNELS_BY_BACKEND = {"gpu": ("mosaic_gpu", "triton"), "tpu": ("mosaic_tpu",), "cpu": ()}
FALLBACK = "xla_chunked"  # the kernel every backend ends with
CHOSEN: dict[str, str] = {}  # backend -> the kernel the latest trace used
_WARNED_MISSING: set[str] = set()  # kernel names this process has already warned are missing


class TokamaxInternals(NamedTuple):
    """The private tokamax names this module calls."""

    implementations: Mapping[str, Callable[..., Any]]  # kernel name -> kernel (api.IMPLEMENTATIONS)
    Mask: type  # the per-query key range mask (base.Mask)
    XlaChunked: type  # the blockwise softmax in plain XLA (xla_chunked.XlaChunkedDotProductAttention)


@functools.cache
def tokamax_internals() -> TokamaxInternals:
    """tokamax's private attention names, resolved in this one place; an ImportError
    naming them and the installed version if a release moved them."""
    try:
        from tokamax._src.ops.attention import api, base, xla_chunked

        return TokamaxInternals(api.IMPLEMENTATIONS, base.Mask, xla_chunked.XlaChunkedDotProductAttention)
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"tokamax {importlib.metadata.version('tokamax')} lacks the private names pretrain.flash_attention uses "
            "(tokamax._src.ops.attention: api.IMPLEMENTATIONS, base.Mask, "
            f"xla_chunked.XlaChunkedDotProductAttention): {error}. Install the tokamax version pyproject.toml "
            "pins, or update pretrain.flash_attention.tokamax_internals") from error


def resolve_kernels(names: Sequence[str]) -> list[tuple[str, Callable[..., Any]]]:
    """(name, kernel) of each of `names` the installed tokamax has, in order. A name
    it lacks is left out with one warning per process and name: a release that
    renamed a kernel would otherwise quietly hand its work to the next one."""
    table = tokamax_internals().implementations
    for name in names:
        if name not in table and name not in _WARNED_MISSING:
            _WARNED_MISSING.add(name)
            log.warning("flash attention: tokamax %s has no kernel %r; the next kernel in line runs instead",
                        importlib.metadata.version("tokamax"), name)
    return [(name, table[name]) for name in names if name in table]


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

    if not flags.FLAGS.is_parsed():  # tokamax reads its options as absl flags, else parsing sys.argv (a
        flags.FLAGS.mark_as_parsed()  # library call, a test runner): its defaults, not someone else's arguments
    tokamax = tokamax_internals()
    mask = tokamax.Mask(k_start=k_start[:, None, :], k_end=k_end[:, None, :])
    backend = jax.default_backend()
    names = KERNELS_BY_BACKEND.get(backend, ())
    kernels = resolve_kernels(names)
    length = q.shape[1]
    kernels.append((FALLBACK, tokamax.XlaChunked(chunk_size=(_chunk(length), _chunk(length)))))
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
