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
import re
import shutil
import signal
import subprocess
import sys
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
from pretrain.loop import NonFiniteLoss, skip_nonfinite_updates
from pretrain.train import Trainer
from pretrain.train_step import make_train_step
from pretrain.workdir import WorkdirError, WorkdirLock, WorkdirLocked, check_free_space, prepare_workdir
from train_helpers import (FINISHED_RUN, ROOT, checkpoint_steps, compile_cache_env, damage,  # noqa: F401
                           largest_file, read_metrics, restore_newest, shared_corpus, shared_finished_run, start,
                           tiny_config, tokenizer_file, Watched, workdir_with)


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


# -- a workdir damaged, left by an older version, or by a stopped save; a full disk ------------

@pytest.mark.parametrize("kind", ["truncate", "overwrite"])
def test_a_damaged_tokenizer_in_the_workdir_is_one_message_and_changes_nothing(finished_run, tmp_path, kind):
    """tokenizer.model truncated, or 16 bytes of it inverted: resuming refuses in one
    message (unreadable: it names the file; readable but different: the checkpoint's
    tokenizer checksum names the change), never retraining over it; evaluation's
    loader says the same."""
    from pretrain.inference import run_tokenizer

    reference, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    damage(workdir / "tokenizer.model", kind)
    before = snapshot(workdir, skip=("train.lock",))
    unreadable = rf"the run's tokenizer {workdir}/tokenizer.model is damaged or not this project's \(.*\); its " \
                 r"checkpoints were trained with it, so it is not retrained over: restore it from a backup"
    different = r"checkpoint at step 40 in .* was written by a different tokenizer"
    with pytest.raises(ValueError, match=f"{unreadable}|{different}") as raised:
        Trainer(tiny_config(**RUN), str(workdir)).run()
    assert "\n" not in str(raised.value)
    if re.search(unreadable, str(raised.value)):
        with pytest.raises(ValueError, match=unreadable):
            run_tokenizer(workdir)
    assert snapshot(workdir, skip=("train.lock",)) == before


def test_a_damaged_config_json_is_one_message_and_the_training_command_rewrites_it(finished_run, tmp_path):
    from pretrain.inference import read_run_config

    reference, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    damage(workdir / "config.json", "truncate")
    with pytest.raises(ValueError, match=rf"{workdir}/config.json is damaged \(not JSON: .*\); the training command "
                                         r"rewrites it each time it starts, so rerun the run's training command"):
        read_run_config(workdir)
    assert Trainer(tiny_config(**RUN), str(workdir)).run() == 40  # complete: it trains nothing, rewrites the file
    assert read_run_config(workdir) == read_run_config(reference)


def test_a_workdir_of_an_older_version_still_loads_with_one_warning(finished_run, tmp_path, caplog):
    """config.json with a field this version does not know, an objective setting it no
    longer has and fields it added since; a checkpoint without the checksum item (as
    written before checksums existed): the run resumes (restored unverified, said once)
    and the trained model loads for evaluation."""
    from pretrain.inference import load_trained, read_run_config

    reference, final_state = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["retired_option"] = 3
    config["objectives"]["mlm"]["retired_setting"] = 0.5
    del config["model"]["attention"], config["data"]["shards"]
    (workdir / "config.json").write_text(json.dumps(config))
    shutil.rmtree(workdir / "checkpoints" / "40" / "meta")
    with caplog.at_level(logging.WARNING):
        trained = load_trained(workdir)
    assert trained.step == 40 and trained.config.data.shards == 1 and "retired_setting" not in trained.config.objectives.mlm
    assert_same_state(nnx.state(trained.model, nnx.Param), final_state["params"])
    assert (f"{workdir}/config.json was written by another version of this project: fields it lacks take today's "
            "defaults (model.attention, data.shards); fields this version does not know are ignored "
            "(objectives.mlm.retired_setting, retired_option)") in caplog.text
    assert "checkpoint at step 40 in" in caplog.text and "has no checksum item (written by an older version" in \
        caplog.text
    assert read_run_config(workdir).retired_option == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert Trainer(tiny_config(**RUN), str(workdir)).run() == 40  # resumes: complete
    assert "has no checksum item" in caplog.text


def test_a_config_from_before_output_bias_existed_reads_as_the_bias_every_model_then_had(finished_run, tmp_path,
                                                                                           caplog):
    """model.output_bias came with the default True, which later became False: a config.json
    without the field was written when every model had the bias, so it reads True (not
    today's default), and a checkpoint that disagrees is refused naming the field."""
    from pretrain.inference import load_trained, read_run_config

    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    config = json.loads((workdir / "config.json").read_text())
    del config["model"]["output_bias"]
    (workdir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        assert read_run_config(workdir).model.output_bias is True
    assert (f"{workdir}/config.json was written by another version of this project: fields it lacks from before they "
            "existed take the value runs then had (model.output_bias=True)") in caplog.text
    with pytest.raises(ValueError) as refused:  # this run (today's) has none
        load_trained(workdir)
    assert str(refused.value) == (
        f"the checkpoint at step 40 in {workdir} was written by a model of another shape: model.output_bias is False "
        "there and True here. The body's shape comes from config.json and tokenizer.model in that directory: restore "
        "them as the run wrote them")


def test_only_an_unfinished_save_starts_afresh_and_keeps_it(finished_run, tmp_path, caplog):
    """A run stopped while writing its first checkpoint leaves only Orbax's temporary
    directory: the rerun says so, leaves it in place, trains from step 0, and ends
    bit-identical to the uninterrupted run."""
    reference, final_state = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / "40")
    unfinished = workdir / "checkpoints" / "20.orbax-checkpoint-tmp-1764500000000000"
    os.rename(workdir / "checkpoints" / "20", unfinished)
    kept = snapshot(unfinished)
    trainer = Trainer(tiny_config(**RUN), str(workdir))
    with caplog.at_level(logging.WARNING):
        assert trainer.run() == 40
    assert ("holds unfinished saves (20.orbax-checkpoint-tmp-1764500000000000) of a run stopped while writing them: "
            "they are ignored and left in place (delete them when no longer needed); there is no finished "
            "checkpoint, so the run starts from step 0") in caplog.text
    assert snapshot(unfinished) == kept and checkpoint_steps(workdir) == [20, 40]
    assert_same_state(trainer.state, final_state)


def test_a_full_disk_during_a_save_stops_the_run_and_keeps_the_previous_checkpoint(finished_run, tmp_path):
    """The save of step 40 fails with ENOSPC (a stubbed Orbax save, the way a full disk
    fails it): the run stops with one message naming the step, the cause and the intact
    checkpoint; the rerun resumes from step 20 and ends bit-identical to the reference.
    A failure that surfaces later, when the asynchronous write is awaited, is reported
    the same way."""
    import errno

    from pretrain.checkpoint import CheckpointWriteFailed

    reference, final_state = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / "40")  # the run resumes from 20 and saves 40 onto a full disk
    trainer = Trainer(tiny_config(**RUN), str(workdir))
    save = trainer.checkpointer.manager.save

    def full_disk(step, *args, **kwargs):
        if step == 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(step, *args, **kwargs)

    trainer.checkpointer.manager.save = full_disk
    with pytest.raises(CheckpointWriteFailed, match=rf"^writing the checkpoint of step 40 to {workdir}/checkpoints "
                                                    r"failed: No space left on device. The checkpoints of steps \[20\] "
                                                    r"are intact; free space on that disk, then rerun the command to "
                                                    r"resume from step 20$"):
        trainer.run()
    resumed = Trainer(tiny_config(**RUN), str(workdir))
    assert resumed.run() == 40
    assert_same_state(resumed.state, final_state)

    from pretrain.checkpoint import Checkpointer

    checkpointer = Checkpointer(tmp_path / "async")
    checkpointer._pending = 60  # a save of step 60 was started; awaiting it reports the full disk
    checkpointer.manager.wait_until_finished = lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))
    with pytest.raises(CheckpointWriteFailed, match=r"writing the checkpoint of step 60 .* failed: No space left on "
                                                    r"device. The checkpoints of steps \[\] are intact; free space on "
                                                    r"that disk, then rerun the command to start again"):
        checkpointer.wait()


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
    trainer.program.train_data = trainer.program.train_data.map(poisoned([2, 9, 10, 11]))  # steps 3, 10, 11, 12
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
    trainer.program.train_data = trainer.program.train_data.map(poisoned([2]))  # step 3
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
EXTRA_SAVING_KILLS = 10  # tries for a kill that lands mid-save, when the planned ones all came too late


@dataclasses.dataclass
class Kill:
    """One SIGKILL: planned from the step the run resumes from, and where it landed.

    kind 'startup': `target` seconds after the start (imports, data, restore,
    compilation); 'step': once the run has logged step `target`; 'saving': while the
    checkpoint of step `target` is being written (its Orbax temporary directory
    exists; a save too quick to catch is reported as landing after it); 'saved': as
    soon as that checkpoint is final; 'body': once a fine-tuning run says it is
    restoring its pretrained body. Step points lie after `resumed` and before the
    run's end, so every point is reached; one that would not be (its checkpoint at
    or past the end) is redrawn as a start-up kill."""

    kind: str
    target: float
    resumed: int
    redrawn: bool = False
    landed_step: int = -1  # the newest step the run had logged when the signal landed
    mid_save: bool = False
    checkpoints: tuple[int, ...] = ()
    earlier: frozenset[str] = frozenset()  # what the checkpoint directory held at launch (old unfinished saves)

    def saving_now(self, names: list[str]) -> bool:
        """Whether a save of the target step is in flight: a temporary directory of it
        that was not there when this run started (one an earlier kill left is not)."""
        prefix = f"{int(self.target)}.orbax-checkpoint-tmp"
        return any(name.startswith(prefix) and name not in self.earlier for name in names)

    def reached(self, run: Watched, checkpoints: Path) -> bool:
        if self.kind == "startup":
            return time.monotonic() - run.started >= self.target
        if self.kind == "step":
            return run.logged_step() >= self.target
        if self.kind == "body":
            return any("restoring the pretrained body" in line for line in list(run.lines))
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        final = str(int(self.target)) in names
        if self.kind == "saving":
            return final or self.saving_now(names)
        return final

    def __str__(self) -> str:
        planned = f"{self.target:g} s" if self.kind == "startup" else f"step {self.target:g}"
        if self.kind == "body":
            planned = "the body restore"
        note = " (redrawn: its step lay past the run's end)" if self.redrawn else ""
        landed = f"logged step {self.landed_step}" + (", mid-save" if self.mid_save else "")
        return (f"{self.kind:<7} planned at {planned} after resuming from step {self.resumed}{note}; landed at "
                f"{landed}; checkpoints then {list(self.checkpoints)}")


def plan_kill(kind: str, rng: random.Random, resumed: int, total: int, every: int) -> Kill:
    """A kill point the run that resumes from step `resumed` always reaches."""
    startup = lambda redrawn=False: Kill("startup", round(rng.uniform(0.5, 4.0), 2), resumed, redrawn)  # noqa: E731
    if kind == "startup":
        return startup()
    if kind == "body":
        return Kill("body", 0, resumed)
    target = resumed + rng.randint(1, every - 1) if kind == "step" else (resumed // every + 1) * every
    return Kill(kind, target, resumed) if target < total else startup(redrawn=True)


def newest_checkpoint(checkpoints: Path) -> int:
    """The step the next run resumes from: the newest final checkpoint (0: none)."""
    steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()] if checkpoints.is_dir() else []
    return max(steps, default=0)


def kill_repeatedly(launch: Callable[[], Watched], checkpoints: Path, kinds: list[str], total: int, every: int,
                    seed: int) -> list[Kill]:
    """Runs the command and SIGKILLs it at a point of each kind in `kinds`, in order,
    each planned from where the run resumes; then, until one lands mid-save, more
    'saving' kills (at most EXTRA_SAVING_KILLS). Returns the kills as they landed."""
    rng, report = random.Random(seed), []

    def kill(kind: str) -> Kill:
        point = plan_kill(kind, rng, newest_checkpoint(checkpoints), total, every)
        point.earlier = frozenset(os.listdir(checkpoints) if checkpoints.is_dir() else [])
        run = launch()
        while not point.reached(run, checkpoints):
            assert run.process.poll() is None, f"{point}: the run ended first (a harness bug):\n{run.output()}"
            assert time.monotonic() - run.started < 600, f"{point}: the run hangs"  # a guard, not a timing check
            time.sleep(0.001)
        run.process.send_signal(signal.SIGKILL)
        assert run.process.wait() == -signal.SIGKILL, run.output()
        point.landed_step = run.logged_step()
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        point.mid_save = point.kind == "saving" and point.saving_now(names)
        point.checkpoints = tuple(sorted(int(name) for name in names if name.isdigit()))
        report.append(point)
        return point

    for kind in kinds:
        kill(kind)
    for _ in range(EXTRA_SAVING_KILLS):
        if any(point.mid_save for point in report):
            break
        kill("saving")
    print("\n" + "\n".join(f"kill {i + 1:>2}: {point}" for i, point in enumerate(report)))
    assert any(point.mid_save for point in report), "no kill landed mid-save"
    return report


def kill_kinds(seed: int, extra: tuple[str, ...] = ()) -> list[str]:
    """Three kills of each kind (plus `extra`), in a seeded order."""
    kinds = ["startup", "step", "saving", "saved"] * 3 + list(extra)
    random.Random(seed).shuffle(kinds)
    return kinds


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

    workdir = tmp_path / "killed"
    report = kill_repeatedly(lambda: launch(workdir), workdir / "checkpoints", kill_kinds(KILL_SEED), KILL_TOTAL,
                             KILL_EVERY, KILL_SEED)
    final = launch(workdir)
    assert final.process.wait() == 0, final.output()

    assert len(report) >= 12
    assert (workdir / "tokenizer.model").read_bytes() == (tmp_path / "reference" / "tokenizer.model").read_bytes()
    config = tiny_config(total_steps=KILL_TOTAL, **flags)
    got, want = (restore_newest(path, config) for path in (workdir, tmp_path / "reference"))
    assert got[0] == want[0] == KILL_TOTAL
    assert_same_state(got[1], want[1])
    assert got[2] == want[2], "data-iterator state"
    losses = [(r["step"], r["loss"]) for r in read_metrics(workdir)]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "reference")]
    assert [step for step, _ in losses] == list(range(1, KILL_TOTAL + 1))


def test_kill_points_are_always_ahead_of_the_resumed_run():
    """Wherever the previous kill landed, the next point lies after the step the run
    resumes from and before its end, or is redrawn as a start-up kill."""
    rng = random.Random(0)
    for resumed in range(0, KILL_TOTAL + 1, 1):
        for kind in ("startup", "step", "saving", "saved"):
            point = plan_kill(kind, rng, resumed, KILL_TOTAL, KILL_EVERY)
            if point.kind == "startup":
                assert 0.5 <= point.target <= 4.0 and (kind == "startup" or point.redrawn)
            else:
                assert resumed < point.target < KILL_TOTAL and point.kind == kind
                assert kind == "step" or point.target % KILL_EVERY == 0
