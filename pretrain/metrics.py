"""Where training numbers go: metrics.jsonl, TensorBoard event files, the console.

MFU follows the PaLM / MaxText convention: model FLOPs per token are
6 * (non-embedding parameters) + 12 * layers * model_dim * seq_len (the attention
score and value matmuls, forward and backward), and MFU = FLOPs per second
achieved on real tokens / (devices * peak FLOPs per device). The peak is
`config.peak_flops_per_device` when set, else a table entry for known
accelerators, else (CPU) a float32 matmul measured at start-up; the run log says
which.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

log = logging.getLogger(__name__)

# Dense bfloat16 peak FLOP/s per device, by jax device_kind.
KNOWN_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


def measure_matmul_peak(size: int = 1024, seconds: float = 0.5) -> float:
    """float32 FLOP/s of a square matmul on the default device (the CPU peak)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul(a).block_until_ready()
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    if configured > 0:
        return configured, "config.peak_flops_per_device"
    kind = jax.devices()[0].device_kind
    if kind in KNOWN_PEAKS:
        return KNOWN_PEAKS[kind], f"bfloat16 dense peak of {kind}"
    return measure_matmul_peak(), f"measured float32 matmul peak of {kind}"


def flops_per_token(non_embedding_params: int, num_layers: int, model_dim: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B)."""
    return 6.0 * non_embedding_params + 12.0 * num_layers * model_dim * seq_len


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

    Only the primary process writes. On resume, `truncate_after(step)` drops lines
    from steps a crash left behind, so every step appears once.
    """

    def __init__(self, workdir: str | os.PathLike, primary: bool = True):
        self.primary = primary
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._events = EventFileWriter(os.path.join(workdir, "tensorboard")) if primary else None

    def truncate_after(self, step: int) -> None:
        """Keeps only lines with step <= `step` (atomically rewritten)."""
        if not self.primary or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError):
                    continue  # a line cut short by a crash
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(temporary, self.path)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.primary:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=name, simple_value=float(value))
            for name, value in record.items() if name != "step" and isinstance(value, (int, float))])
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "item"):
        return float(np.asarray(value))
    return value
