"""Restoring a run's parameters for inference, whichever state layout saved them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain.checkpoint import Checkpointer
from pretrain.inference import restore_params
from pretrain.model import create_model, preset


def test_parameters_come_back_from_a_pmap_state(tmp_path):
    """A pmap trainer saves its state with a leading device axis (the pjit layout, without it, is
    what the evaluation and generation tests restore)."""
    config = preset("tiny", vocab_size=100)
    params = nnx.state(create_model(config, seed=1), nnx.Param)
    state = {"params": params, "step": jnp.zeros((), jnp.int32)}
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (2, *x.shape)), state)
    saver = Checkpointer(tmp_path, async_save=False)
    saver.save(7, state, {"stats": {"real_tokens": 123}})
    saver.close()

    model = create_model(config, seed=2)
    step, data_state = restore_params(tmp_path, model)
    assert step == 7 and data_state == {"stats": {"real_tokens": 123}}
    for got, want in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_checkpoint_of_another_shape_is_named(tmp_path):
    saver = Checkpointer(tmp_path, async_save=False)
    saver.save(3, {"params": nnx.state(create_model(preset("tiny", vocab_size=100)), nnx.Param)}, {})
    saver.close()
    with pytest.raises(ValueError, match=r"checkpoint at step 3 in .* holds a parameter of shape \(100, 64\) where "
                                         r"the run's config.json gives \(120, 64\); was config.json edited\?"):
        restore_params(tmp_path, create_model(preset("tiny", vocab_size=120)))
