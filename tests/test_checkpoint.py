"""Orbax checkpoints: exact round trip with shardings and iterator state; damaged ones skipped."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain import sharding
from pretrain.checkpoint import Checkpointer
from pretrain.model import create_model, preset
from pretrain.optimizer import make_optimizer


def make_state(seed):
    params = nnx.state(create_model(preset("tiny", vocab_size=64), seed=seed), nnx.Param)
    optimizer = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.asarray(seed, jnp.int32)}


def abstract(state, mesh):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), state)


def assert_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_identical(tmp_path):
    mesh = sharding.make_mesh(-1, 1, 1)
    checkpointer = Checkpointer(tmp_path, keep=2)
    assert checkpointer.restore(abstract(make_state(0), mesh)) is None
    for step in (1, 2, 3):
        checkpointer.save(step, make_state(step), {"parent": {"next_index": step}, "open_rows": [[[step, 0]]]})
    checkpointer.wait()
    assert checkpointer.steps() == [2, 3]  # keep=2
    step, state, data_state = checkpointer.restore(abstract(make_state(0), mesh))
    assert step == 3 and data_state == {"parent": {"next_index": 3}, "open_rows": [[[3, 0]]]}
    assert_identical(state, make_state(3))
    checkpointer.close()


@pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite"])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, damage):
    mesh = sharding.make_mesh(-1, 1, 1)
    checkpointer = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        checkpointer.save(step, make_state(step), {"step": step})
    checkpointer.close()
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(tmp_path / "checkpoints" / "2" / "state")
                   for name in names if os.path.getsize(os.path.join(root, name)) > 64)
    assert files
    for path in files:
        if damage == "truncate":
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
        elif damage == "delete":
            os.remove(path)
        else:
            with open(path, "r+b") as handle:
                handle.write(b"\xff" * 64)
    with caplog.at_level(logging.WARNING):
        step, state, data_state = Checkpointer(tmp_path).restore(abstract(make_state(0), mesh))
    assert step == 1 and data_state == {"step": 1}
    assert_identical(state, make_state(1))
    assert "step 2" in caplog.text
    assert os.path.isdir(tmp_path / "checkpoints" / "2"), "a damaged checkpoint is never deleted"


def test_no_good_checkpoint_is_a_clear_error_and_deletes_nothing(tmp_path):
    mesh = sharding.make_mesh(-1, 1, 1)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(5, make_state(5), {"step": 5})
    checkpointer.close()
    for root, _, names in os.walk(tmp_path / "checkpoints" / "5" / "state"):
        for name in names:
            os.remove(os.path.join(root, name))
    with pytest.raises(RuntimeError, match=r"no checkpoint .* can be restored \(damaged steps \[5\]\); nothing was deleted"):
        Checkpointer(tmp_path).restore(abstract(make_state(0), mesh))
    assert os.path.isdir(tmp_path / "checkpoints" / "5")
