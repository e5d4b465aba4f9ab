"""Faults lose nothing: damaged checkpoints, workdir problems, a second process, divergence
(stop or skip), and, under the `slow` marker, SIGKILL at seeded points of a run.

    python -m pytest -m slow tests/test_reliability.py    # the SIGKILL suite (a few minutes)
    KILL_SEED=3 python -m pytest -m slow tests/test_reliability.py    # other kill points
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain.input_pipeline import build_input_pipeline, take
from pretrain.model import TransformerConfig, create_model
from pretrain.optimizer import make_optimizer
from pretrain.train import NonFiniteLoss, Trainer, skip_nonfinite_updates
from pretrain.train_step import make_train_step
from pretrain.workdir import WorkdirError, WorkdirLock, WorkdirLocked, check_free_space, prepare_workdir
from train_helpers import (FINISHED_RUN, ROOT, checkpoint_steps, compile_cache_env, damage,  # noqa: F401
                           largest_file, read_metrics, restore_newest, shared_corpus, shared_finished_run, start,
                           tiny_config, tokenizer_file, workdir_with)


def snapshot(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`, except paths starting with `skip`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if not relative.startswith(skip):
                out[relative] = hashlib.sha256(Path(root, name).read_bytes()).hexdigest()
    return out


def assert_same_state(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- damaged checkpoints, end to end ---------------------------------------------------------

RUN = FINISHED_RUN


@pytest.fixture
def finished_run(tmp_path_factory):
    return shared_finished_run(tmp_path_factory)


def saved_checksums(workdir: Path, step: int) -> dict[str, int]:
    """The array checksums a checkpoint recorded when it was written (see pretrain.checkpoint)."""
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())["body"]["checksums"]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in ("tokens_per_sec", "mfu")} for record in records]


@pytest.mark.parametrize("kind", ["truncate", "delete", "overwrite"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(finished_run, tmp_path, caplog, kind):
    """Step 40's array file truncated, deleted, or with bytes overwritten: the rerun
    warns naming step 40, resumes from 20, moves 40 aside (deleting nothing) and ends
    bit-identical to the uninterrupted run, every step logged once."""
    reference, final_state = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    damage(largest_file(workdir / "checkpoints" / "40" / "state"), kind)
    damaged = snapshot(workdir / "checkpoints" / "40")
    trainer = Trainer(tiny_config(**RUN), str(workdir))
    with caplog.at_level(logging.WARNING):
        assert trainer.run() == 40
    assert f"checkpoint at step 40 in {workdir / 'checkpoints'} is damaged" in caplog.text
    assert "restored step 20; damaged checkpoints at steps [40] were skipped and not deleted" in caplog.text
    assert snapshot(workdir / "damaged_checkpoints" / "40") == damaged, "set aside, not deleted"
    assert checkpoint_steps(workdir) == [20, 40]
    assert_same_state(trainer.state, final_state)
    assert saved_checksums(workdir, 40) == saved_checksums(reference, 40), "the rewritten checkpoint holds the same"
    assert without_timings(read_metrics(workdir)) == without_timings(read_metrics(reference))


def test_no_good_checkpoint_is_a_clear_error_and_deletes_nothing(finished_run, tmp_path):
    reference, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    damage(largest_file(workdir / "checkpoints" / "40" / "state"), "overwrite")
    damage(workdir / "checkpoints" / "20" / "state" / "_METADATA", "truncate")
    before = snapshot(workdir, skip=("train.lock", "tensorboard"))
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* can be restored \(damaged steps \[40, 20\]\); "
                                           r"nothing was deleted. Move the directory aside to start afresh"):
        Trainer(tiny_config(**RUN), str(workdir)).run()
    assert snapshot(workdir, skip=("train.lock", "tensorboard")) == before


# -- divergence: stop, or skip ---------------------------------------------------------------

def test_divergence_stops_and_keeps_the_last_good_checkpoint(tokenizer_file, tmp_path):
    """Learning rate 1e9 without clipping: the first update makes step 2's loss NaN."""
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    config = tiny_config(total_steps=30, checkpoint_every=1, log_every=1, **{
        "optimizer.clip_norm": 0.0, "optimizer.learning_rate": 1e9, "optimizer.warmup_steps": 0})
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss nan at step 2 \(objective\(s\): mlm; gradient norm nan\);"
                                            r" the last good checkpoint in .* is intact. Lower "
                                            r"config.optimizer.learning_rate"):
        Trainer(config, str(workdir)).run()
    assert checkpoint_steps(workdir) == [1]
    step, state, _ = restore_newest(workdir, config)
    assert step == 1 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def poisoned(batches: Iterable[int]) -> Callable[[dict], dict]:
    """A map over the training stream that puts inf into the loss weights of the given
    batches (counted from 0): a real bad batch, whose loss and gradients are not finite."""
    bad, seen = set(batches), iter(range(10**9))
    return lambda batch: {**batch, "weights": np.where(next(seen) in bad, np.inf, batch["weights"]).astype(np.float32)}


def test_skipped_step_leaves_parameters_and_optimizer_state_unchanged(tokenizer_file, tmp_path):
    """The skip is a select inside the compiled step: a bad batch returns the state it
    was given, bit for bit, but for the step counter; the next good batch trains."""
    config = tiny_config(**{"optimizer.warmup_steps": 0})  # so the first update is not zero
    pipeline = build_input_pipeline(config, workdir_with(tokenizer_file, tmp_path / "run"))
    graphdef, params, rest = nnx.split(create_model(TransformerConfig(**config.model, vocab_size=400)), nnx.Param, ...)
    optimizer = make_optimizer(total_steps=config.total_steps, **config.optimizer)
    step = jax.jit(skip_nonfinite_updates(make_train_step(graphdef, rest, optimizer, 1)))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    good, bad = take(pipeline.train.map(poisoned([1])), 2)

    after_bad, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(after_bad["step"]) == 1
    assert_same_state({k: after_bad[k] for k in ("params", "opt_state")}, {k: state[k] for k in ("params", "opt_state")})
    after_good, metrics = step(after_bad, good)
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x != y).any()), after_good["params"], params)))


def test_skip_policy_counts_skipped_steps_and_stops_after_too_many_in_a_row(tokenizer_file, tmp_path):
    """One bad batch is skipped and counted and the run goes on; three in a row
    (config.max_consecutive_skips=3) stop it, keeping the last good checkpoint."""
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    config = tiny_config(total_steps=16, log_every=4, checkpoint_every=4, nonfinite="skip", max_consecutive_skips=3)
    trainer = Trainer(config, str(workdir))
    trainer.train_data = trainer.train_data.map(poisoned([2, 9, 10, 11]))  # steps 3, 10, 11, 12
    with pytest.raises(NonFiniteLoss, match=r"by step 12, 3 steps in a row had a non-finite loss, gradient or update "
                                            r"and were skipped \(config.nonfinite='skip', "
                                            r"config.max_consecutive_skips=3; .* is intact. Lower"):
        trainer.run()
    assert [(r["step"], r["skipped_steps"]) for r in read_metrics(workdir)] == [(4, 1), (8, 0)]
    assert all(np.isfinite(r["loss"]) for r in read_metrics(workdir))
    assert checkpoint_steps(workdir) == [4, 8]


def test_pmap_run_saves_often_without_hanging_and_skips_like_pjit(tokenizer_file, tmp_path):
    """The classic pmap loop saving every other step (the finiteness check of the
    parameters, once an eager reduction per array over pmap arrays, deadlocked XLA's
    CPU collectives by the third save), and a bad batch skipped under pmap."""
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    config = tiny_config(total_steps=6, checkpoint_every=2, log_every=2, parallelism="pmap", nonfinite="skip")
    trainer = Trainer(config, str(workdir))
    trainer.train_data = trainer.train_data.map(poisoned([2]))  # step 3
    assert trainer.run() == 6
    assert [(r["step"], r["skipped_steps"]) for r in read_metrics(workdir)] == [(2, 0), (4, 1), (6, 0)]
    assert checkpoint_steps(workdir) == [2, 4, 6]


# -- the workdir -----------------------------------------------------------------------------

@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot create files in: read-only permissions, and for
    root (whom permissions do not stop) the immutable attribute."""
    path = tmp_path / "readonly"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        (path / "probe").touch()
        (path / "probe").unlink()
        pytest.skip("cannot make a directory unwritable here")
    except OSError:
        pass
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def test_unwritable_workdir_is_reported_before_training(unwritable_dir):
    with pytest.raises(WorkdirError, match=rf"workdir {unwritable_dir} is not writable \(.*\); fix its permissions "
                                           r"\(e.g. chmod u\+w .*\) or pass a --workdir on a writable disk"):
        prepare_workdir(unwritable_dir)


def test_workdir_that_cannot_be_created_is_reported(unwritable_dir, tmp_path):
    blocked = unwritable_dir / "runs" / "mlm"
    with pytest.raises(WorkdirError, match=rf"cannot create workdir {blocked}: {unwritable_dir} does not allow "
                                           r"creating runs/mlm in it .* Create it yourself \(mkdir -p"):
        prepare_workdir(blocked)
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match=rf"cannot create workdir {tmp_path}/file/run: {tmp_path}/file is a file, "
                                           rf"not a directory, so nothing can be created under it. Pass a --workdir "
                                           rf"whose parents are directories, or move {tmp_path}/file out of the way$"):
        prepare_workdir(tmp_path / "file" / "run")
    assert prepare_workdir(tmp_path / "new" / "parents" / "run") == str(tmp_path / "new" / "parents" / "run")


def test_too_little_space_for_one_checkpoint_is_reported_before_the_model_exists(tokenizer_file, tmp_path):
    """The estimate comes from the state's shapes (parameters and Adam moments), so a
    model too big for the disk is refused before a byte of it is allocated."""
    stats = os.statvfs(tmp_path)
    with pytest.raises(WorkdirError, match=r"not enough free space in .* for one checkpoint: .* free, a checkpoint of "
                                           r"this model and optimizer state needs about .*\. Free space"):
        check_free_space(tmp_path, stats.f_bavail * stats.f_frsize + 1)
    huge = tiny_config(**{"model.model_dim": 2**17, "model.mlp_dim": 2**19, "model.num_heads": 64})  # 4e11 parameters
    with pytest.raises(WorkdirError, match=r"a checkpoint of this model and optimizer state needs about \d+\.\d TiB"):
        Trainer(huge, str(workdir_with(tokenizer_file, tmp_path / "run")))


def test_second_process_on_a_workdir_refuses_and_changes_nothing(tokenizer_file, tmp_path):
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    with Trainer(tiny_config(), str(workdir)):
        before = snapshot(workdir)
        second = start(workdir, 20, devices=1)
        output, _ = second.communicate(timeout=300)
        assert second.returncode != 0
        assert f"error: workdir {workdir} is in use by another training process (pid {os.getpid()} on host" in output
        assert "Wait for it to finish or stop it, or pass another --workdir" in output
        assert snapshot(workdir) == before
    with Trainer(tiny_config(), str(workdir)):  # released when the first one closed
        pass


def test_a_killed_holder_does_not_leave_a_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pretrain.workdir import WorkdirLock; "
                               "lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
                               str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(WorkdirLocked, match=rf"\(pid {holder.pid} on host"):
            WorkdirLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WorkdirLock(tmp_path):  # the kernel released the flock with the process
        pass


# -- SIGKILL anywhere (slow) -----------------------------------------------------------------

KILL_SEED = int(os.environ.get("KILL_SEED", "7"))  # other kill points: KILL_SEED=3 python -m pytest -m slow
KILL_TOTAL, KILL_EVERY, KILL_DEVICES = 80, 5, 2


@dataclasses.dataclass(frozen=True)
class KillPoint:
    """When to SIGKILL the training process: `seconds` after it starts ('startup'), when
    it has logged step `step` ('step'), while its checkpoint of `step` is being written
    ('saving': the Orbax temporary directory exists), or as soon as that checkpoint is
    final ('saved')."""

    kind: str
    step: int = 0
    seconds: float = 0.0

    def reached(self, lines: list[str], started: float, checkpoints: Path) -> bool:
        if self.kind == "startup":
            return time.monotonic() - started >= self.seconds
        if self.kind == "step":
            return any(line.startswith(f"step {self.step}/") for line in lines)
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        final = str(self.step) in names
        if self.kind == "saving":  # also fires when the save was too quick to catch: reported below
            return final or any(name.startswith(f"{self.step}.orbax-checkpoint-tmp") for name in names)
        return final


def kill_points(seed: int, total: int, every: int) -> list[KillPoint]:
    """Twelve points in run order, three of each kind, drawn with `seed`: step and
    checkpoint points move forward, so each one is reached by the rerun that follows
    the previous kill."""
    rng = random.Random(seed)
    kinds = ["startup", "step", "saving", "saved"] * 3
    rng.shuffle(kinds)
    points, progress = [], 0
    for kind in kinds:
        if kind == "startup":  # anywhere in start-up: imports, data, restore, compilation
            points.append(KillPoint(kind, seconds=round(rng.uniform(0.5, 4.0), 2)))
            continue
        step = rng.randint(progress + 1, progress + every - 1) if kind == "step" else (progress // every + 1) * every
        points.append(KillPoint(kind, step=step))
        progress = step
    assert progress < total
    return points


class Watched:
    """A training subprocess whose merged output a thread collects line by line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.lines, self.started = process, [], time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        self.process.wait()
        self._reader.join()
        return "".join(self.lines)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["pjit", "pmap"])
def test_sigkill_anywhere_then_rerunning_the_command_loses_nothing(tmp_path_factory, tmp_path, parallelism):
    """The same command (pjit, or pmap) is killed (SIGKILL) at twelve seeded points,
    including while an asynchronous checkpoint save is in flight, and rerun each time; it ends with the
    parameters, optimizer state, data-iterator state and tokenizer of an uninterrupted
    run, bit for bit, and metrics.jsonl holds every step once, with the same losses."""
    corpus = shared_corpus(tmp_path_factory)
    flags = {"checkpoint_every": KILL_EVERY, "log_every": 1, "parallelism": parallelism, "data.kind": "files",
             "data.path": str(corpus), "peak_flops_per_device": 1e12}
    cache = compile_cache_env(tmp_path / "jax-cache")
    # A pmap state holds one copy per device, and the comparison below restores onto
    # this process's 8 devices; a pjit state restores onto any device count.
    devices = 8 if parallelism == "pmap" else KILL_DEVICES

    def launch(workdir: Path) -> Watched:
        return Watched(start(workdir, KILL_TOTAL, devices=devices, env=cache, **flags))

    reference = launch(tmp_path / "reference")  # trains its own tokenizer, as the killed run does
    assert reference.process.wait() == 0, reference.output()

    workdir, report = tmp_path / "killed", []
    for point in kill_points(KILL_SEED, KILL_TOTAL, KILL_EVERY):
        run = launch(workdir)
        while not point.reached(run.lines, run.started, workdir / "checkpoints") and run.process.poll() is None:
            assert time.monotonic() - run.started < 600, f"{point}: the run hangs"  # a guard, not a timing check
            time.sleep(0.001)
        assert run.process.poll() is None, f"{point} was never reached:\n{run.output()}"
        run.process.send_signal(signal.SIGKILL)
        assert run.process.wait() == -signal.SIGKILL
        names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
        mid_save = any(name.startswith(f"{point.step}.orbax-checkpoint-tmp") for name in names)
        report.append((point, mid_save, checkpoint_steps(workdir) if names else []))
    final = launch(workdir)
    assert final.process.wait() == 0, final.output()
    print("\n".join(f"{point}: mid-save {mid_save}, checkpoints {steps}" for point, mid_save, steps in report))

    assert len(report) >= 10
    assert any(mid_save for point, mid_save, _ in report if point.kind == "saving"), "no kill landed mid-save"
    assert (workdir / "tokenizer.model").read_bytes() == (tmp_path / "reference" / "tokenizer.model").read_bytes()
    config = tiny_config(total_steps=KILL_TOTAL, **flags)
    got, want = (restore_newest(path, config) for path in (workdir, tmp_path / "reference"))
    assert got[0] == want[0] == KILL_TOTAL
    assert_same_state(got[1], want[1])
    assert got[2] == want[2], "data-iterator state"
    losses = [(r["step"], r["loss"]) for r in read_metrics(workdir)]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "reference")]
    assert [step for step, _ in losses] == list(range(1, KILL_TOTAL + 1))
