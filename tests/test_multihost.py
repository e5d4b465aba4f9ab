"""Multi-host: 2 processes x 4 CPU devices (gloo collectives on localhost) match one 8-device process.

Both runs split the data into 2 shards, so each process reads only its own shard; the
checkpoint's data state, merged over the processes, equals the single process's.

Tolerance: the two runs execute the same partitioned program, but the cross-process
all-reduce (gloo) may sum in another order than the in-process one, so losses and
parameters are compared to rtol=atol=2e-5 in float32 (measured gaps are ~1e-7).
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from pretrain import distributed
from pretrain.checkpoint import Checkpointer
from pretrain.train import Trainer
from tests.test_train import read_metrics, tiny_config, tokenizer_file, workdir_with  # noqa: F401 (fixture)

SETTINGS = {"total_steps": 12, "log_every": 1, "checkpoint_every": 6, "eval_every": 6, "data.shards": 2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def launch_two_processes(workdir):
    """The training command, once per process, as a user would start it on two hosts."""
    config_flags = [f"--config.{k}={v}" for k, v in {**tiny_overrides(), **SETTINGS}.items()]
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "pretrain.train", "--config=configs/pretrain.py:objective=mlm,size=tiny",
             f"--workdir={workdir}", *config_flags, f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={index}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(2)
    ]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=420)[0])
        finally:
            process.kill()
    return [(p.returncode, out) for p, out in zip(processes, outputs)]


def tiny_overrides():
    """The fields tests/test_train.py's tiny_config changes, as command-line overrides."""
    reference = tiny_config()
    return {"seq_len": reference.seq_len, "batch_size": reference.batch_size,
            "tokenizer.vocab_size": reference.tokenizer.vocab_size,
            "optimizer.learning_rate": reference.optimizer.learning_rate,
            "optimizer.warmup_steps": reference.optimizer.warmup_steps}


def test_two_processes_match_one_process_with_eight_devices(tokenizer_file, tmp_path):  # noqa: F811
    assert jax.device_count() == 8
    single = workdir_with(tokenizer_file, tmp_path / "single")
    config = tiny_config(**SETTINGS)
    trainer = Trainer(config, str(single))
    trainer.run()

    multi = workdir_with(tokenizer_file, tmp_path / "multi")
    results = launch_two_processes(multi)
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
