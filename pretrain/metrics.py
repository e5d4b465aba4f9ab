"""Where training numbers go: metrics.jsonl, TensorBoard event files, the console.

MFU follows the PaLM / MaxText convention: model FLOPs per token are
6 * (non-embedding parameters) + 12 * layers * model_dim * seq_len (the attention
score and value matmuls, forward and backward), and MFU = FLOPs per second
achieved on real tokens / (devices * peak FLOPs per device). The peak is
`config.peak_flops_per_device` when set, else a table entry for known
accelerators, else (CPU) a float32 matmul peak (the median of several trials)
measured once per machine and cached (`peak_cache_path`), so the runs of one
comparison divide by the same number; each run keeps the peak it used, with its
date, in the workdir, so a resumed run divides by it too. The run log says which.
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

# Dense (no sparsity) bfloat16 peak FLOP/s per device, by jax's device_kind. Sources:
# NVIDIA's H100, H200 and A100 datasheets (dense BF16 Tensor Core: H100 SXM and H200
# 989.4 TFLOPS, H100 PCIe 756, A100 312; the datasheets' larger figures assume 2:4
# sparsity); Google Cloud's TPU system-architecture pages (per chip: v4 275, v5e 197,
# v5p 459, v6e Trillium 918 TFLOPS bf16).
KNOWN_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989.4e12,
    "NVIDIA H100": 989.4e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989.4e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def measure_matmul_peak(size: int = 1024, seconds: float = 0.5) -> float:
    """float32 FLOP/s of a square matmul on the default device, over about `seconds`
    (one trial; benchmarks take it inside every round they time)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul(a).block_until_ready()
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def robust_matmul_peak(trials: int = 7, seconds: float = 0.15) -> float:
    """The median of `trials` short `measure_matmul_peak` trials: one trial on a shared
    CPU swings by a factor of three, the median of several much less."""
    return float(np.median([measure_matmul_peak(seconds=seconds) for _ in range(trials)]))


PEAK_FILENAME = "mfu_peak.json"
PEAK_FIX = "set --config.peak_flops_per_device=<FLOP/s per device> to fix it"
PEAK_METHOD = "median of 7 float32 1024x1024 matmul trials"
# The machine's measured peaks live in $PRETRAIN_CACHE_DIR, else $XDG_CACHE_HOME/pretrain,
# else ~/.cache/pretrain; PRETRAIN_REMEASURE_PEAK=1 measures this machine's again.
CACHE_DIR_ENV = "PRETRAIN_CACHE_DIR"
REMEASURE_ENV = "PRETRAIN_REMEASURE_PEAK"
PEAK_CACHE_FILENAME = "peak_flops.json"


def peak_cache_path() -> str:
    """The JSON file that holds each machine's measured peak (`CACHE_DIR_ENV`, else the
    XDG cache directory): one per user, shared by every run on the machine."""
    directory = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pretrain")
    return os.path.join(directory, PEAK_CACHE_FILENAME)


def cpu_model_name() -> str:
    """The host CPU's model name from /proc/cpuinfo; '' where there is none to read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        return ""


def machine_key(device_kind: str) -> str:
    """What a measured peak depends on: the device kind, the CPU model, the cores this
    process may use and JAX's device count (a peak measured under another taskset,
    container limit or device count belongs to another machine)."""
    model = cpu_model_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{device_kind}; {model or 'unknown CPU model'}; {cores} cores; {jax.device_count()} devices"


def _read_json(path: str) -> dict | None:
    """The JSON object in `path`; None when there is none or it cannot be read (warned)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
        if isinstance(value, dict):
            return value
    except (OSError, ValueError):
        pass
    log.warning("%s cannot be read (not a JSON object); it is ignored, and rewritten once the peak is known", path)
    return None


def _write_json(path: str, value: dict) -> None:
    """Writes `value` to `path` atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
    os.replace(temporary, path)


def _usable(record: Any, kind: str) -> bool:
    """Whether `record` is a peak measured on a device of `kind`."""
    try:
        return record.get("device_kind") == kind and float(record["flops_per_device"]) > 0
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


def machine_peak(kind: str, primary: bool = True) -> dict:
    """This machine's measured float32 matmul peak record ({flops_per_device,
    device_kind, measured, method, machine, cache}): the cached one, or (none cached,
    or `REMEASURE_ENV`=1) a new measurement, which the primary process caches. A cache
    that cannot be written costs a warning, never the run."""
    path, key = peak_cache_path(), machine_key(kind)
    cache = _read_json(path) or {}
    if os.environ.get(REMEASURE_ENV, "") not in ("", "0") or not _usable(cache.get(key), kind):
        cache[key] = {"flops_per_device": robust_matmul_peak(), "device_kind": kind,
                      "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "method": PEAK_METHOD}
        if primary:
            try:
                _write_json(path, cache)
            except OSError as error:
                log.warning("cannot cache the measured peak in %s (%s); the next run measures again. Set %s to a "
                            "writable directory to cache it", path, error.strerror or error, CACHE_DIR_ENV)
    return {**cache[key], "machine": key, "cache": path}


def peak_flops_per_device(configured: float = 0.0, workdir: str | os.PathLike | None = None,
                          primary: bool = True) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from): MFU's denominator.

    `configured` > 0 wins; else the dense bfloat16 peak of a known accelerator;
    else (CPU) this machine's measured float32 matmul peak (`machine_peak`: measured
    once, cached for every later run). The run keeps the peak it took, with its date,
    in `workdir/mfu_peak.json` and reads it back on every resume, so its MFU stays
    comparable across restarts even when the machine's peak is measured again (the
    primary process writes it)."""
    if configured > 0:
        return configured, "config.peak_flops_per_device"
    kind = jax.devices()[0].device_kind
    if kind in KNOWN_PEAKS:
        return KNOWN_PEAKS[kind], f"bfloat16 dense peak of {kind}; {PEAK_FIX}"
    path = os.path.join(workdir, PEAK_FILENAME) if workdir is not None else None
    kept = _read_json(path) if path else None
    if _usable(kept, kind):
        return float(kept["flops_per_device"]), (
            f"float32 matmul peak of {kind} measured {kept.get('measured', '?')}, kept in {PEAK_FILENAME} since the "
            f"run's first start; {PEAK_FIX}")
    record = machine_peak(kind, primary)
    if path and primary:
        _write_json(path, record)
    return float(record["flops_per_device"]), (
        f"float32 matmul peak of {kind} measured {record['measured']} ({PEAK_METHOD}), cached for this machine in "
        f"{record['cache']} ({REMEASURE_ENV}=1 measures again){' and kept in ' + PEAK_FILENAME if path else ''}; "
        f"{PEAK_FIX}")


def flops_per_token(non_embedding_params: int, num_layers: int, model_dim: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B)."""
    return 6.0 * non_embedding_params + 12.0 * num_layers * model_dim * seq_len


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

    Only the primary process writes. A run that resumed from `start_step` > 0 drops
    the lines a crash left behind after it (`truncate_after`), so every step
    appears once. A run that starts from step 0 in a workdir that already holds
    metrics (an earlier run that saved no checkpoint) keeps them: `metrics.jsonl`
    and `tensorboard/` are renamed with the time they were set aside
    (`set_aside`), never overwritten.
    """

    def __init__(self, workdir: str | os.PathLike, primary: bool = True, start_step: int = 0):
        self.primary = primary
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.set_aside: list[str] = []  # where an earlier run's metrics went (fresh starts only)
        if primary:
            if start_step == 0:
                self.set_aside = self._set_aside_earlier_run(os.fspath(workdir))
            else:
                self.truncate_after(start_step)
        self._events = EventFileWriter(os.path.join(workdir, "tensorboard")) if primary else None

    def _set_aside_earlier_run(self, workdir: str) -> list[str]:
        """Renames a non-empty metrics.jsonl (and tensorboard/) to names stamped with
        the current time; returns the new paths."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return []
        stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), 1
        while os.path.exists(os.path.join(workdir, f"metrics-{stamp}.jsonl")):  # two fresh starts in one second
            suffix += 1
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
        moved = []
        for name, renamed in (("metrics.jsonl", f"metrics-{stamp}.jsonl"), ("tensorboard", f"tensorboard-{stamp}")):
            source, target = os.path.join(workdir, name), os.path.join(workdir, renamed)
            if os.path.exists(source) and not os.path.exists(target):
                os.rename(source, target)
                moved.append(target)
        return moved

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
