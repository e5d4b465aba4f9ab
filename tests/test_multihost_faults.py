"""Faults of a multi-process run: 2 processes x 2 CPU devices (gloo on localhost), the
training command started once per process as on two hosts.

- SIGTERM to one process only: both agree on one step, both save it and exit 0, and the
  rerun continues exactly, bit for bit against an uninterrupted run (the default suite
  runs the agreement inside tests/test_multihost.py).
- SIGKILL of one process mid-run (slow): the survivor exits within a bounded time naming
  the lost process; rerunning both resumes, bit-identical to an uninterrupted run.
- SIGKILL of one process during a multi-process asynchronous save (slow): the next start
  finds the previous checkpoint or the complete new one, never a half-written one.

Every slow case prints what it injected and measured (`-s` shows it); the figures in the
README's fault table come from these lines.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pretrain.peers import EXIT_PEER_LOST
from train_helpers import (checkpoint_steps, compile_cache_env, read_metrics, restore_newest, shared_corpus,
                           start_processes, tiny_config, workdir_with)

PEER_TIMEOUT = 5.0  # seconds; the production default is 60
EXIT_BOUND = 60.0  # seconds a survivor may take to exit after its peer is killed (timeout + JAX's own margins)


def settings(corpus: Path, total: int, every: int) -> dict:
    return {"data.kind": "files", "data.path": str(corpus), "data.shards": 2, "checkpoint_every": every,
            "log_every": 1, "peak_flops_per_device": 1e12, "peer_timeout_seconds": PEER_TIMEOUT}


def run_both(workdir: Path, total: int, flags: dict, env: dict, timeout: float = 400) -> list[str]:
    """Runs the 2-process job to its end; both must exit 0. Returns both outputs."""
    processes = start_processes(workdir, total, env=env, **flags)
    deadline = time.monotonic() + timeout
    for watched in processes:
        while watched.process.poll() is None:
            assert time.monotonic() < deadline, "the 2-process run hangs:\n" + "".join(watched.lines)
            time.sleep(0.05)
    outputs = [watched.output() for watched in processes]
    for index, (watched, output) in enumerate(zip(processes, outputs)):
        assert watched.process.returncode == 0, f"process {index}:\n{output}"
    return outputs


def wait_until(condition, processes, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for index, watched in enumerate(processes):
            assert watched.process.poll() is None, f"process {index} ended before {what}:\n" + "".join(watched.lines)
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.005)


def terminate_one(workdir: Path, total: int, flags: dict, env: dict, target: int, at_step: int) -> int:
    """Starts both processes, sends SIGTERM to process `target` alone once process 0
    logged `at_step`; both must save one agreed step and exit 0. Returns that step."""
    processes = start_processes(workdir, total, env=env, **flags)
    wait_until(lambda: processes[0].logged_step() >= at_step, processes, f"step {at_step}")
    processes[target].process.send_signal(signal.SIGTERM)
    outputs = [watched.output() for watched in processes]
    for index, (watched, output) in enumerate(zip(processes, outputs)):
        assert watched.process.returncode == 0, f"process {index}:\n{output}"
    stopped = [int(line.split()[3].rstrip(";")) for output in outputs for line in output.splitlines()
               if line.startswith("stopped at step")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], outputs  # one agreed step
    step = stopped[0]
    assert at_step <= step < total
    assert checkpoint_steps(workdir)[-1] == step, "both saved the agreed step"
    return step


# -- slow: kills, against an uninterrupted 2-process run ----------------------------------------

KILL_TOTAL, KILL_EVERY = 30, 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process run of KILL_TOTAL steps and its final state."""
    from train_helpers import shared_tokenizer

    corpus = shared_corpus(tmp_path_factory)
    flags = settings(corpus, KILL_TOTAL, KILL_EVERY)
    env = compile_cache_env(tmp_path_factory.mktemp("jax-cache"))
    workdir = workdir_with(shared_tokenizer(tmp_path_factory), tmp_path_factory.mktemp("reference") / "run")
    run_both(workdir, KILL_TOTAL, flags, env)
    return workdir, flags, env, restore_newest(workdir, tiny_config(total_steps=KILL_TOTAL, **flags))


def assert_same_run(workdir: Path, reference_run) -> None:
    """The finished run equals the uninterrupted one: step, parameters, optimizer
    state and data state bit for bit, and every step's logged loss."""
    reference_dir, flags, _, want = reference_run
    got = restore_newest(workdir, tiny_config(total_steps=KILL_TOTAL, **flags))
    assert got[0] == want[0] == KILL_TOTAL
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got[2] == want[2], "data-iterator state"
    losses = [(r["step"], r["loss"]) for r in read_metrics(workdir)]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(reference_dir)]


def kill_one(workdir: Path, reference_run, victim: int, when) -> tuple[float, int, str]:
    """Starts both processes, SIGKILLs `victim` once `when(processes)` holds; the
    survivor must exit on its own within EXIT_BOUND. Returns (seconds it took, its
    exit code, its output)."""
    _, flags, env, _ = reference_run
    processes = start_processes(workdir, KILL_TOTAL, env=env, **flags)
    wait_until(lambda: when(processes), processes, "the kill point")
    processes[victim].process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = processes[1 - victim]
    while survivor.process.poll() is None:
        assert time.monotonic() - killed < EXIT_BOUND, "the survivor hangs:\n" + "".join(survivor.lines)
        time.sleep(0.01)
    seconds = time.monotonic() - killed
    assert processes[victim].process.wait() == -signal.SIGKILL
    return seconds, survivor.process.returncode, survivor.output()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_sigkill_of_one_process_the_survivor_names_it_and_the_rerun_loses_nothing(reference, tmp_path,
                                                                                   tmp_path_factory, victim):
    from train_helpers import shared_tokenizer

    workdir = workdir_with(shared_tokenizer(tmp_path_factory), tmp_path / "run")
    seconds, code, output = kill_one(workdir, reference, victim, lambda ps: ps[0].logged_step() >= 13)
    if victim == 1:  # our peer watch names it
        assert f"error: process 0 of 2: process 1 sent no sign of life for {PEER_TIMEOUT:g} s" in output, output
        assert code == EXIT_PEER_LOST
    else:  # the coordination service went with process 0: JAX's own abort names the leader, or our watch does
        assert ("lost the coordination service on process 0" in output
                or "the leader task was preempted/died" in output), output
    print(f"\nSIGKILL process {victim} at step >= 13: survivor exited (code {code}) after {seconds:.1f} s")
    run_both(workdir, KILL_TOTAL, reference[1], reference[2])
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigkill_during_a_multi_process_async_save_leaves_the_previous_or_the_complete_checkpoint(
        reference, tmp_path, tmp_path_factory):
    from train_helpers import shared_tokenizer

    workdir = workdir_with(shared_tokenizer(tmp_path_factory), tmp_path / "run")
    checkpoints = workdir / "checkpoints"

    def saving(processes) -> bool:  # step 20's temporary directory exists: the save is in flight
        names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
        return any(name.startswith(f"{2 * KILL_EVERY}.orbax-checkpoint-tmp") for name in names)

    seconds, code, output = kill_one(workdir, reference, 1, saving)
    assert code == EXIT_PEER_LOST and "process 1 sent no sign of life" in output, output
    finalised = checkpoint_steps(workdir)
    assert finalised in ([KILL_EVERY], [KILL_EVERY, 2 * KILL_EVERY]), finalised
    print(f"\nSIGKILL process 1 mid-save of step {2 * KILL_EVERY}: finalised checkpoints {finalised}, "
          f"survivor exited after {seconds:.1f} s")
    run_both(workdir, KILL_TOTAL, reference[1], reference[2])
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigterm_to_one_process_then_rerun_equals_the_uninterrupted_run(reference, tmp_path, tmp_path_factory):
    from train_helpers import shared_tokenizer

    workdir = workdir_with(shared_tokenizer(tmp_path_factory), tmp_path / "run")
    _, flags, env, _ = reference
    step = terminate_one(workdir, KILL_TOTAL, flags, env, target=1, at_step=7)
    print(f"\nSIGTERM to process 1 at step >= 7: both saved step {step} and exited 0")
    run_both(workdir, KILL_TOTAL, flags, env)
    assert_same_run(workdir, reference)
