"""Keep freed host memory inside the process, so that XLA CPU's per-step buffers
are not faulted in from the kernel again on every step.

Why: XLA CPU allocates a step's large temporaries afresh on every call, from a
worker thread. glibc serves big blocks on such threads with `mmap` (a thread's
arena cannot hold them) and hands them back with `munmap` when freed, so the
next step touches brand-new pages: tens of thousands of page faults per step
and a fifth of its CPU time in the kernel for the `small` MLM step
(`benchmarks/profile_step.py --host_memory=default` prints both; README,
Performance).
With one arena, no `mmap` below 1 GiB and no trimming, freed blocks stay in the
heap and the next step reuses them: the step then page-faults not at all.

The cost is that the process keeps its peak host memory until it exits, which
is what a training process does anyway. Set PRETRAIN_KEEP_FREED_MEMORY=0 to
leave glibc's defaults alone.

Only where it was measured: a process whose JAX runs on the CPU. On a GPU or TPU
host the step's buffers live on the device, so the settings are left out there
(`runs_on_cpu`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2**31 - 1))
DISABLE_VARIABLE = "PRETRAIN_KEEP_FREED_MEMORY"


ACCELERATOR_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0")  # CUDA, TPU


def runs_on_cpu(environ: dict[str, str] | None = None, device_files: tuple[str, ...] = ACCELERATOR_DEVICE_FILES
                ) -> bool:
    """Whether JAX will run this process on the CPU, told before JAX starts (asking
    JAX would start it): `JAX_PLATFORMS` when set, else whether the host shows no
    GPU or TPU device file."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(os.path.exists(path) for path in device_files)


def keep_freed_memory() -> bool:
    """Tells glibc to keep freed memory for reuse (see the module docstring).

    Call it first thing in a command, before JAX starts its threads (the arena
    limit only applies to threads created afterwards). Returns whether the
    settings took effect: False off Linux/glibc, on an accelerator host, or when
    PRETRAIN_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get(DISABLE_VARIABLE, "1") == "0" or not sys.platform.startswith("linux") or not runs_on_cpu():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in SETTINGS)
