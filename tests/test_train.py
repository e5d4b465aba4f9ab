"""End-to-end training: every objective, exact resume after SIGKILL and SIGTERM (divergence, bad
configs and more faults: tests/test_reliability.py and tests/test_bad_inputs.py)."""

import os
import signal

import jax
import numpy as np
import pytest

from pretrain.train import Trainer
# Shared helpers; tests/test_multihost.py and others import them from here too.
from train_helpers import (OVERRIDES, checkpoint_steps, command, compile_cache_env, final_params,  # noqa: F401
                           read_metrics, restore_newest, shared_corpus, start, tiny_config, tokenizer_file,
                           wait_for_checkpoint, workdir_with)


@pytest.mark.parametrize("objective", ["mlm", "clm", "mass", "unilm", "mlm:1,clm:1,mass:1,unilm:1"])
def test_each_objective_trains_end_to_end(tokenizer_file, tmp_path, objective):
    workdir = workdir_with(tokenizer_file, tmp_path / "run")
    config = tiny_config(objective, total_steps=40, log_every=1)
    assert Trainer(config, str(workdir)).run() == 40
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 41)), "every logged step exactly once"
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.9 * first, (first, last)
    assert all(np.isfinite(r["mfu"]) and r["tokens_per_sec"] > 0 for r in records)
    assert any(key.startswith("eval/loss/") for key in records[-1])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40"]
    events = os.listdir(workdir / "tensorboard")
    assert events and os.path.getsize(workdir / "tensorboard" / events[0]) > 100


@pytest.mark.parametrize("stop", [pytest.param(signal.SIGKILL, id="sigkill", marks=pytest.mark.slow),  # and 24 more
                                  pytest.param(signal.SIGTERM, id="sigterm")])            # in test_reliability.py
def test_interrupted_run_resumes_bit_identically(tokenizer_file, tmp_path_factory, tmp_path, stop):
    """The command stopped after its first checkpoint and run again ends where an
    uninterrupted run ends. tests/test_reliability.py kills it at many more points."""
    total = 60
    flags = {"data.kind": "files", "data.path": str(shared_corpus(tmp_path_factory)), "peak_flops_per_device": 1e12}
    config = tiny_config(total_steps=total, **flags)
    reference = workdir_with(tokenizer_file, tmp_path / "reference")
    trainer = Trainer(config, str(reference))
    trainer.run()

    run = workdir_with(tokenizer_file, tmp_path / "interrupted")
    cache = compile_cache_env(tmp_path / "jax-cache")
    process = start(run, total, env=cache, **flags)
    wait_for_checkpoint(run, 20, process)
    process.send_signal(stop)
    output, _ = process.communicate(timeout=120)
    if stop == signal.SIGTERM:
        assert process.returncode == 0, output
        assert "SIGTERM received" in output
    steps_saved = checkpoint_steps(run)
    assert steps_saved and steps_saved[-1] < total, "the run must have been stopped early"

    rerun = start(run, total, env=cache, **flags)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    step, state, _ = restore_newest(run, config)
    assert step == total
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in read_metrics(run)]
    assert len(steps) == len(set(steps)), "every step is logged once"
    expected = {r["step"]: r["loss"] for r in read_metrics(reference)}
    losses = {r["step"]: r["loss"] for r in read_metrics(run)}
    # SIGTERM also logs the step it stopped at (off the logging cadence); SIGKILL logs nothing extra.
    extra = {steps_saved[-1]} if stop == signal.SIGTERM and steps_saved[-1] % 10 else set()
    assert set(losses) == set(expected) | extra
    assert {s: losses[s] for s in expected} == expected
