"""Shared by the training, reliability and bad-input tests: the tiny config, one
tokenizer trained once per session, the training command run as a subprocess, and
reading back what a run left in its workdir."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from configs.pretrain import get_config
from pretrain.checkpoint import Checkpointer
from pretrain.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
TRAIN_COMMAND = [sys.executable, "-m", "pretrain.train"]  # run in ROOT
# The tiny run every training test starts from: config fields and their values, as
# `tiny_config` applies them and as `command` passes them on the command line.
TINY = {"seq_len": 64, "batch_size": 8, "log_every": 10, "checkpoint_every": 20, "eval_every": 0,
        "tokenizer.vocab_size": 400, "tokenizer.sentinels": 16, "optimizer.learning_rate": 0.003,
        "optimizer.warmup_steps": 5,
        "sample_at_end": False}  # the closing example line is tested once (tests/test_run_lifecycle.py)
OVERRIDES = {k: v for k, v in TINY.items() if "." not in k}  # the top-level ones (kept for older imports)
FINISHED_RUN = {"total_steps": 40, "checkpoint_every": 20, "log_every": 10}  # see shared_finished_run
_SHARED: dict[str, Any] = {}


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets 'field' and 'section.field' keys of `overrides` on `config`."""
    for key, value in overrides.items():
        *sections, field = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[field] = value
    return config


def tiny_config(objective: str = "mlm", **overrides: Any) -> ml_collections.ConfigDict:
    """The tiny test config; `overrides` may name nested fields with dots as keywords
    (`**{'optimizer.clip_norm': 0.0}`)."""
    return apply(get_config(f"objective={objective},size=tiny"), {**TINY, **overrides})


def shared_tokenizer(factory: pytest.TempPathFactory) -> Path:
    """A tokenizer for the tiny config, trained once per test session."""
    if "tokenizer" not in _SHARED:
        from pretrain.input_pipeline import build_input_pipeline
        workdir = factory.mktemp("tokenizer")
        build_input_pipeline(tiny_config(), workdir)
        _SHARED["tokenizer"] = workdir / "tokenizer.model"
    return _SHARED["tokenizer"]


def shared_corpus(factory: pytest.TempPathFactory, documents: int = 300) -> Path:
    """A small `.txt` corpus (the first pydocs training documents), so runs started as
    subprocesses skip parsing the Python documentation (`config.data.kind='files'`)."""
    if "corpus" not in _SHARED:
        from pretrain.sources import make_source
        train = make_source("pydocs").split("train")
        path = factory.mktemp("corpus") / "docs.txt"
        path.write_text("".join("\n".join(train[i].sentences) + "\n\n" for i in range(documents)), encoding="utf-8")
        _SHARED["corpus"] = path
    return _SHARED["corpus"]


def shared_finished_run(factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(workdir, final state) of an uninterrupted tiny run of 40 steps with checkpoints
    at steps 20 and 40, made once per session; copy it before changing anything."""
    if "run" not in _SHARED:
        workdir = workdir_with(shared_tokenizer(factory), factory.mktemp("finished") / "run")
        trainer = Trainer(tiny_config(**FINISHED_RUN), str(workdir))
        trainer.run()
        _SHARED["run"] = workdir
        _SHARED["run_state"] = jax.device_get(trainer.state)
    return _SHARED["run"], _SHARED["run_state"]


@pytest.fixture
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared tokenizer (see `shared_tokenizer`)."""
    return shared_tokenizer(tmp_path_factory)


def workdir_with(tokenizer_file: Path, path: Path) -> Path:
    """`path`, created, holding a copy of the tokenizer (so no run trains its own)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_file, path / "tokenizer.model")
    return path


def read_metrics(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def checkpoint_steps(workdir: Path) -> list[int]:
    """The finished checkpoint steps in `workdir/checkpoints`, oldest first."""
    return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


def damage(path: Path | str, kind: str) -> None:
    """Damages a file the three ways a disk or a person does: 'truncate' (to half),
    'delete', or 'overwrite' (16 bytes in its middle inverted)."""
    if kind == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    elif kind == "delete":
        os.remove(path)
    else:
        with open(path, "r+b") as handle:
            handle.seek(os.path.getsize(path) // 2)
            middle = handle.read(16)
            handle.seek(os.path.getsize(path) // 2)
            handle.write(bytes(b ^ 0xFF for b in middle))


def files_of(directory: Path | str) -> list[str]:
    """Every file under `directory`, sorted."""
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names)


def largest_file(directory: Path | str) -> str:
    """The largest file under `directory` (in a checkpoint's state: the array data)."""
    return max(files_of(directory), key=os.path.getsize)


def command(workdir: Path, total_steps: int, objective: str = "mlm", **overrides: Any) -> list[str]:
    """`python -m pretrain.train` for the tiny config with `overrides` (dotted keys)."""
    flags = [f"--config.{k}={v}" for k, v in {**TINY, "total_steps": total_steps, **overrides}.items()]
    return [*TRAIN_COMMAND, f"--config=configs/pretrain.py:objective={objective},size=tiny", f"--workdir={workdir}",
            *flags]


def start(workdir: Path, total_steps: int, devices: int = 8, env: dict[str, str] | None = None,
          **overrides: Any) -> subprocess.Popen:
    """Starts the training command on `devices` simulated CPU devices (8, as in
    tests/conftest.py, so results match in-process runs), stdout and stderr merged."""
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
    return subprocess.Popen(command(workdir, total_steps, **overrides), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=environment)


class Watched:
    """A training subprocess whose merged output a thread collects line by line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.lines, self.started = process, [], time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def logged_step(self) -> int:
        """The newest step this process printed (0: none yet)."""
        steps = [int(line.split()[1].split("/")[0]) for line in list(self.lines) if line.startswith("step ")]
        return max(steps, default=0)

    def output(self) -> str:
        self.process.wait()
        self._reader.join()
        return "".join(self.lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def start_processes(workdir: Path, total_steps: int, processes: int = 2, devices: int = 2,
                    env: dict[str, str] | None = None, **overrides: Any) -> list[Watched]:
    """The training command once per process of a `processes`-process job on
    localhost (gloo), `devices` simulated CPU devices each, as a user starts it on
    several hosts."""
    port = free_port()
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
    return [Watched(subprocess.Popen(
        [*command(workdir, total_steps, **overrides), f"--coordinator_address=localhost:{port}",
         f"--num_processes={processes}", f"--process_id={index}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment))
        for index in range(processes)]


def compile_cache_env(directory: Path) -> dict[str, str]:
    """Environment for subprocesses sharing JAX's persistent compilation cache in
    `directory`: every process after the first starts in seconds, not tens of seconds."""
    return {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def wait_for_checkpoint(workdir: Path, step: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def restore_newest(workdir: Path, config: ml_collections.ConfigDict) -> tuple[int, Any, dict]:
    """(step, state, data-iterator state) of the newest good checkpoint of a run made
    with `config`, restored onto this process's devices."""
    with Trainer(config, str(workdir)) as trainer:
        return Checkpointer(workdir).restore(trainer.abstract_state)


def final_params(workdir: Path, step: int, config: ml_collections.ConfigDict | None = None) -> list[np.ndarray]:
    """The parameters of the newest checkpoint, which must be at `step`."""
    restored_step, state, _ = restore_newest(workdir, config or tiny_config(total_steps=120))
    assert restored_step == step
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state["params"])]
