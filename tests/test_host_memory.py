"""pretrain.host_memory: with freed memory kept, repeated XLA CPU calls stop
page-faulting their temporaries in; with glibc's defaults they fault every call.

Each case runs in a fresh interpreter (the allocator settings are per process
and must precede JAX's threads)."""

import os
import subprocess
import sys

import pytest

PROGRAM = """
import resource
from pretrain.host_memory import keep_freed_memory
kept = keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 128), jnp.float32)
product_sum = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum())  # a 64 MiB [4096, 4096] temporary
for _ in range(3):
    product_sum(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    product_sum(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(kept, faults)
"""

TEMPORARY_PAGES = 64 * 2**20 // 4096


def faults_per_call(keep: str) -> tuple[bool, float]:
    """(whether the settings took effect, minor page faults per call)."""
    env = {**os.environ, "PRETRAIN_KEEP_FREED_MEMORY": keep, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120,
                            check=True)
    kept, faults = result.stdout.split()[-2:]
    return kept == "True", float(faults)


def huge_pages_always() -> bool:
    """Whether the kernel backs large anonymous mappings with 2 MiB pages by default."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as handle:
            return "[always]" in handle.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    kept, kept_faults = faults_per_call("1")
    default_on, default_faults = faults_per_call("0")
    assert kept and not default_on
    # glibc's default maps the 64 MiB temporary afresh on every call: a fault per page
    # (per 2 MiB page where transparent huge pages are always on).
    assert default_faults >= (16 if huge_pages_always() else 0.9 * TEMPORARY_PAGES)
    # Kept: the heap already holds it; a few pages at most (Python's own objects).
    assert kept_faults < 0.02 * TEMPORARY_PAGES


@pytest.mark.parametrize("environ, device_files, expected", [
    ({"JAX_PLATFORMS": "cpu"}, ("/dev/null",), True),  # told: the CPU, whatever the host shows
    ({"JAX_PLATFORMS": "cuda,cpu"}, (), False),
    ({"JAX_PLATFORMS": "tpu"}, (), False),
    ({}, (), True),  # no accelerator device on the host
    ({}, ("/dev/null",), False),  # a device file of an accelerator is there (stands in for /dev/nvidia0)
])
def test_the_allocator_settings_apply_only_to_a_cpu_process(environ, device_files, expected):
    from pretrain.host_memory import runs_on_cpu

    assert runs_on_cpu(environ, device_files) is expected
