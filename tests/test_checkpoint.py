"""Orbax checkpoints: exact round trip with shardings and iterator state; damaged ones
skipped (every file of a checkpoint, three kinds of damage), foreign ones refused, no pickle."""

import json
import logging
import os
import pickle
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain import sharding
from pretrain.checkpoint import CheckpointMismatch, Checkpointer, array_checksums
from pretrain.model import create_model, preset
from pretrain.optimizer import make_optimizer
from train_helpers import damage, files_of, largest_file


def make_state(seed, vocab_size=64, clip_norm=1.0):
    params = nnx.state(create_model(preset("tiny", vocab_size=vocab_size), seed=seed), nnx.Param)
    optimizer = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, clip_norm=clip_norm)
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


def two_checkpoints(path):
    """Checkpoints of make_state(1) at step 1 and make_state(2) at step 2 under `path`."""
    checkpointer = Checkpointer(path, keep=3)
    for step in (1, 2):
        checkpointer.save(step, make_state(step), {"step": step})
    checkpointer.close()
    return path / "checkpoints"


@pytest.mark.parametrize("kind", ["truncate", "delete", "overwrite"])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, kind):
    """The largest file holds the arrays; overwriting bytes inside it is the damage Orbax
    itself does not notice (it restores the changed values), the checksums do."""
    mesh = sharding.make_mesh(-1, 1, 1)
    directory = two_checkpoints(tmp_path)
    damage(largest_file(directory / "2" / "state"), kind)
    with caplog.at_level(logging.WARNING):
        step, state, data_state = Checkpointer(tmp_path).restore(abstract(make_state(0), mesh))
    assert step == 1 and data_state == {"step": 1}
    assert_identical(state, make_state(1))
    assert "checkpoint at step 2 in" in caplog.text and "is damaged" in caplog.text
    assert os.path.isdir(directory / "2"), "a damaged checkpoint is never deleted"


@pytest.mark.slow
def test_any_damage_to_any_file_never_restores_different_values(tmp_path, caplog):
    """Every file of a checkpoint, each of the three kinds of damage: the newest
    checkpoint restores exactly as saved (the file was not needed) or is skipped for
    the previous one, with a warning; never different values, never an exception."""
    mesh = sharding.make_mesh(-1, 1, 1)
    pristine = two_checkpoints(tmp_path / "pristine")
    target = abstract(make_state(0), mesh)
    outcomes = {}
    for path in files_of(pristine / "2"):
        for kind in ("truncate", "delete", "overwrite"):
            copy = tmp_path / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(pristine.parent, copy)
            damage(copy / "checkpoints" / os.path.relpath(path, pristine), kind)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                step, state, _ = Checkpointer(copy).restore(target)
            assert_identical(state, make_state(step))
            assert (step == 1) == ("checkpoint at step 2 in" in caplog.text)
            outcomes[os.path.relpath(path, pristine), kind] = step
    assert outcomes[os.path.relpath(largest_file(pristine / "2" / "state"), pristine), "overwrite"] == 1
    assert outcomes["2/meta/metadata", "delete"] == 1


def test_edited_data_state_or_meta_is_damage(tmp_path, caplog):
    """A JSON item edited so that it still parses fails its checksum."""
    mesh = sharding.make_mesh(-1, 1, 1)
    directory = two_checkpoints(tmp_path)
    for item, edit in (("data", lambda d: {**d, "step": 7}),
                       ("meta", lambda m: {**m, "body": {**m["body"], "data_sha256": "0" * 64}})):
        path = directory / "2" / item / "metadata"
        original = path.read_text()
        path.write_text(json.dumps(edit(json.loads(original))))
        with caplog.at_level(logging.WARNING):
            assert Checkpointer(tmp_path).restore(abstract(make_state(0), mesh))[0] == 1
        path.write_text(original)
    assert "the data-iterator state differs from its checksum" in caplog.text
    assert "its meta item does not match its own checksum" in caplog.text
    assert Checkpointer(tmp_path).restore(abstract(make_state(0), mesh))[0] == 2


def test_checksums_see_any_single_changed_word_whatever_the_sharding():
    mesh = sharding.make_mesh(-1, 1, 1)
    x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert array_checksums({"x": x}) == array_checksums({"x": sharded})
    assert array_checksums({"x": x}) != array_checksums({"x": x.at[3, 5].set(-0.0)})
    assert array_checksums({"x": x}) != array_checksums({"x": x.T.reshape(64, 8)}), "order matters"


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=80), r"params/token_embedding/value is \(64, 64\) float32 there and \(80, 64\) float32 now"),
    (dict(clip_norm=0.0), r"opt_state/.* is missing from the checkpoint|is in the checkpoint but not in the model"),
])
def test_checkpoint_of_another_shape_is_refused_not_skipped(tmp_path, change, message):
    mesh = sharding.make_mesh(-1, 1, 1)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(3, make_state(3), {"step": 3})
    checkpointer.close()
    with pytest.raises(CheckpointMismatch, match=r"checkpoint at step 3 in .* was written by a different model "
                                                 r"or optimizer configuration: arrays: .*" + message):
        Checkpointer(tmp_path).restore(abstract(make_state(0, **change), mesh))


def test_run_description_differences(tmp_path, caplog):
    """What wrote a checkpoint is compared: another tokenizer is refused even when every
    array fits; a changed learning rate is a warning, and the run goes on."""
    mesh = sharding.make_mesh(-1, 1, 1)
    run = {"model": {"num_layers": 2}, "optimizer": {"learning_rate": 0.001}, "tokenizer_sha256": "a" * 64}
    checkpointer = Checkpointer(tmp_path, run_info=run)
    checkpointer.save(3, make_state(3), {"step": 3})
    checkpointer.close()
    with pytest.raises(CheckpointMismatch, match=r"written by a different tokenizer: tokenizer_sha256 is 'a+' there "
                                                 r"and 'b+' now.*pass a new --workdir"):
        Checkpointer(tmp_path, run_info={**run, "tokenizer_sha256": "b" * 64}).restore(abstract(make_state(0), mesh))
    with caplog.at_level(logging.WARNING):
        step, _, _ = Checkpointer(tmp_path, run_info={**run, "optimizer": {"learning_rate": 0.0005}}).restore(
            abstract(make_state(0), mesh))
    assert step == 3
    assert "(optimizer.learning_rate is 0.001 there and 0.0005 now); continuing with the current ones" in caplog.text


def test_set_aside_moves_newer_steps_and_deletes_nothing(tmp_path):
    directory = two_checkpoints(tmp_path)
    files = [os.path.relpath(p, directory / "2") for p in files_of(directory / "2")]
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.set_aside_newer_than(1) == [str(tmp_path / "damaged_checkpoints" / "2")]
    assert checkpointer.steps() == [1]
    assert [os.path.relpath(p, tmp_path / "damaged_checkpoints" / "2")
            for p in files_of(tmp_path / "damaged_checkpoints" / "2")] == files
    checkpointer.save(2, make_state(5), {"step": 5})  # the step can be saved again
    checkpointer.close()
    assert Checkpointer(tmp_path).steps() == [1, 2]


_UNPICKLING: list[str] = []


def _audit(event, args):
    if event == "pickle.find_class" and _UNPICKLING is not None:
        _UNPICKLING.append(f"{args[0]}.{args[1]}")


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records


def test_restoring_never_unpickles(tmp_path, monkeypatch):
    """No pickle runs while a checkpoint loads: pickle's loaders raise if called, and
    the interpreter's audit hook sees no class looked up by an unpickler."""
    mesh = sharding.make_mesh(-1, 1, 1)
    checkpointer = Checkpointer(tmp_path, run_info={"model": {"num_layers": 2}})
    checkpointer.save(4, make_state(4), {"next_index": 4})
    checkpointer.close()

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while restoring a checkpoint")

    for module in (pickle, sys.modules.get("_pickle")):
        for name in ("load", "loads", "Unpickler"):
            if module is not None and hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    pickle.loads  # noqa: B018 — the patched one
    with pytest.raises(AssertionError, match="pickle used"):
        pickle.loads(b"")
    _UNPICKLING.clear()
    step, state, data_state = Checkpointer(tmp_path, run_info={"model": {"num_layers": 2}}).restore(
        abstract(make_state(0), mesh))
    assert (step, data_state) == (4, {"next_index": 4}) and _UNPICKLING == []
    assert_identical(state, make_state(4))


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
