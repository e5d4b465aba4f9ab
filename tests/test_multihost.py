"""Multi-host: 2 processes x 4 CPU devices (gloo collectives on localhost) match one 8-device process.

Both runs split the data into 2 shards, so each process reads only its own shard; the
checkpoint's data state, merged over the processes, equals the single process's.

Tolerance: the two runs execute the same partitioned program, but the cross-process
all-reduce (gloo) may sum in another order than the in-process one, so losses and
parameters are compared to rtol=atol=2e-5 in float32 (measured gaps are ~1e-7).
"""

import signal
import time

import jax
import numpy as np
import pytest

from pretrain import distributed
from pretrain.checkpoint import Checkpointer
from pretrain.train import Trainer
from train_helpers import (checkpoint_steps, read_metrics, start_processes, tiny_config, tokenizer_file,  # noqa: F401
                           workdir_with)

SETTINGS = {"total_steps": 12, "log_every": 1, "checkpoint_every": 6, "eval_every": 6, "data.shards": 2}
FLAGS = {k: v for k, v in SETTINGS.items() if k != "total_steps"}


def test_two_processes_match_one_process_with_eight_devices(tokenizer_file, tmp_path):  # noqa: F811
    """The 2-process run also meets a SIGTERM sent to process 1 alone: both processes save
    one agreed step and exit 0, and the rerun of both continues to the same result."""
    assert jax.device_count() == 8
    single = workdir_with(tokenizer_file, tmp_path / "single")
    config = tiny_config(**SETTINGS)
    trainer = Trainer(config, str(single))
    trainer.run()

    multi = workdir_with(tokenizer_file, tmp_path / "multi")
    first = start_processes(multi, SETTINGS["total_steps"], devices=4, **FLAGS)
    deadline = time.monotonic() + 300
    while first[0].logged_step() < 4:
        assert all(p.process.poll() is None for p in first) and time.monotonic() < deadline, first[0].output()
        time.sleep(0.01)
    first[1].process.send_signal(signal.SIGTERM)  # to one process only
    outputs = [p.output() for p in first]
    assert [p.process.returncode for p in first] == [0, 0], outputs
    stopped = {line for out in outputs for line in out.splitlines() if line.startswith("stopped at step")}
    assert len(stopped) == 1 and "SIGTERM received" in outputs[1], outputs  # one agreed step on both
    agreed = int(stopped.pop().split()[3].rstrip(";"))
    assert 4 <= agreed < 12 and checkpoint_steps(multi)[-1] == agreed

    results = [(p.process.wait(), p.output()) for p in start_processes(multi, SETTINGS["total_steps"], devices=4,
                                                                          **FLAGS)]
    for index, (returncode, output) in enumerate(results):
        assert returncode == 0, f"process {index} failed:\n{output}"
    assert "process 1 of 2: 4 local devices, 8 in all" in results[1][1]
    assert "step 12/12" in results[0][1] and "step 12/12" not in results[1][1], "only process 0 reports"

    expected, got = read_metrics(single), read_metrics(multi)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 13))
    for key in ("loss", "loss/mlm", "accuracy/mlm", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in expected], rtol=2e-5, atol=2e-5)
    for step in (6, 12):
        e = next(r for r in expected if r["step"] == step)
        g = next(r for r in got if r["step"] == step)
        np.testing.assert_allclose(g["eval/loss"], e["eval/loss"], rtol=2e-5)

    restored = Checkpointer(str(multi)).restore(trainer.abstract_state)
    assert restored[0] == 12
    single_data_state = Checkpointer(str(single)).restore(trainer.abstract_state)[2]
    assert sorted(restored[2]["shards"]) == ["0", "1"], "the checkpoint holds both processes' shards"
    assert restored[2] == single_data_state
    for a, b in zip(jax.tree.leaves(restored[1]["params"]), jax.tree.leaves(trainer.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "Cloud TPU pod"),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_environment_detection(environ, expected):
    assert distributed.cluster_environment(environ) == expected


def test_coordinator_flags_go_together():
    with pytest.raises(ValueError, match="--coordinator_address, --num_processes and --process_id go together"):
        distributed.initialize("localhost:1234", None, None)
    with pytest.raises(ValueError, match=r"--process_id=2 must be in 0\.\.1"):
        distributed.initialize("localhost:1234", 2, 2)


def test_single_process_needs_no_initialization(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
