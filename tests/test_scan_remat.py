"""Scan over layers and rematerialisation (`config.model.scan_layers`, `config.model.remat`):
the same numbers as the loop of blocks, and states that convert between the layouts.

Every comparison runs the same parameters (converted by `pretrain.layers.to_layout`),
compiled, in float32 on the CPU, dropout off unless a test says otherwise. The bound
asserted is 1e-6 (absolute). Measured on the 2-core development machine (jax 0.10.2,
XLA CPU): logits, losses, gradients, layer outputs and decoded states of every scan and
remat layout were bit-identical to the loop's; whole training runs of remat='full' too,
while the scan run's losses drifted from the loop run's by at most 4.8e-7 over 6 steps
(XLA compiles the two programs differently, and AdamW's normalisation turns last-bit
gradient differences in near-zero coordinates into visible parameter differences, so
parameters of two runs are compared through their losses, not element by element).
Conversions and checkpoint restores are exact: they are asserted bit for bit.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import objectives
from objectives.example import TextChunk
from pretrain import sharding
from pretrain.inference import model_config, read_run_config, restore_params, run_tokenizer
from pretrain.layers import REMAT_POLICIES, layout_alternatives, layout_of, to_layout
from pretrain.loss import batch_loss
from pretrain.model import TransformerConfig, create_model, preset
from pretrain.optimizer import make_optimizer
from pretrain.packing import pack
from pretrain.train import Trainer
from pretrain.train_step import make_train_step
from train_helpers import read_metrics, restore_newest, shared_tokenizer, tiny_config, workdir_with

TOLERANCE = dict(rtol=0, atol=1e-6)
VOCAB_SIZE, SEQ_LEN, BATCH = 64, 32, 8
POST_LN = dict(pre_layer_norm=False, mlm_transform_head=True, heads=("pair_classifier",), output_bias=True,
               gelu="exact")
# (scan_layers, remat) of every layout compared with the loop without remat
LAYOUTS = [(False, "full"), (False, "dots"), (True, "none"), (True, "full"), (True, "dots")]
LAYOUT_IDS = [f"{'scan' if scan else 'loop'}-{remat}" for scan, remat in LAYOUTS]


def config(scan: bool = False, remat: str = "none", **overrides) -> TransformerConfig:
    return preset("tiny", vocab_size=VOCAB_SIZE, num_layers=3, scan_layers=scan, remat=remat, **overrides)


def packed_batches(spec: str = "mlm:1,clm:1,mass:1,unilm:1", steps: int = 1) -> list[dict]:
    """`steps` packed batches of BATCH rows mixing the objectives of `spec` (with NSP pairs)."""
    mixture = objectives.build_mixture(spec, objectives.Vocabulary(VOCAB_SIZE), {"mlm": {"nsp": True}})
    rng = np.random.default_rng(0)
    examples = []
    while len(examples) < 60 * steps:
        tokens = rng.integers(7, VOCAB_SIZE, size=int(rng.integers(4, 14)))
        examples.append(mixture(TextChunk(tokens, [0, len(tokens) // 2], tokens[::-1].copy()), rng))
    rows = pack(examples, SEQ_LEN, strategy="first_fit", term_fields=mixture.term_fields)
    return [{k: jnp.asarray(v[s * BATCH:(s + 1) * BATCH]) for k, v in rows.items()} for s in range(steps)]


BATCH_OF_ALL = packed_batches()[0]
TERMS = objectives.build_mixture("mlm", objectives.Vocabulary(VOCAB_SIZE), {"mlm": {"nsp": True}}).loss_terms
NUM_OBJECTIVES = 7


def same_model(model_config: TransformerConfig, like: nnx.Module) -> nnx.Module:
    """A model of `model_config` holding `like`'s parameters, converted to its layout."""
    model = create_model(model_config, seed=1)  # another seed: every number must come from `like`
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, to_layout(nnx.to_pure_dict(nnx.state(like, nnx.Param)),
                                               model_config.scan_layers))
    nnx.update(model, params)
    return model


def compiled(model: nnx.Module, method: str, *args):
    """`model.<method>(*args)` compiled (both sides of a comparison run XLA's program,
    not one of them op by op)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))(state, *args)


def loss_and_gradients(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
    """(logits, loss, gradients in the loop layout) of the project's loss, compiled."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        merged = nnx.merge(graphdef, params, rest)
        return batch_loss(merged, batch, NUM_OBJECTIVES, terms=TERMS if merged.config.heads else ())[0]

    @jax.jit
    def run(params):
        merged = nnx.merge(graphdef, params, rest)
        return merged.logits(merged(batch)), jax.value_and_grad(loss)(params)

    logits, (value, grads) = run(params)
    return logits, value, to_layout(nnx.to_pure_dict(grads), scan=False)


def assert_trees_close(a, b, **tolerance) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tolerance or TOLERANCE))


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- configuration and layout ------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("scan_layers", "yes", r"config.model.scan_layers='yes' must be True \(the blocks stacked and run by one "
                           r"scan\) or False \(a list of blocks\)"),
    ("remat", "minimal", r"config.model.remat='minimal' must be one of \('none', 'full', 'dots'\)"),
])
def test_a_bad_value_is_one_message_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        preset("tiny", **{field: value})


def test_the_loop_layout_keeps_its_parameter_paths():
    """Checkpoints and Hugging Face conversions of existing runs read these paths."""
    paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in
             jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(create_model(config()), nnx.Param)))[0]]
    block = ["attention/out_bias", "attention/out_kernel", "attention/qkv_bias", "attention/qkv_kernel",
             "attention_norm/bias", "attention_norm/scale", "mlp/bi", "mlp/bo", "mlp/wi", "mlp/wo",
             "mlp_norm/bias", "mlp_norm/scale"]
    assert paths == [f"blocks/{i}/{name}" for i in range(3) for name in block] + [
        "final_norm/bias", "final_norm/scale", "position_embedding", "token_embedding", "type_embedding"]


def test_the_scan_layout_is_the_loop_layout_stacked_and_its_layer_axis_is_replicated():
    loop, scan = create_model(config(), seed=5), create_model(config(scan=True), seed=5)
    loop_params = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
    scan_params = nnx.to_pure_dict(nnx.state(scan, nnx.Param))
    assert scan_params["blocks"]["attention"]["qkv_kernel"].shape == (3, 64, 3, 4, 16)
    for layer in range(3):  # the same seed gives the same numbers in either layout
        np.testing.assert_array_equal(scan_params["blocks"]["mlp"]["wi"][layer],
                                      loop_params["blocks"][layer]["mlp"]["wi"])
    assert_trees_equal(to_layout(loop_params, scan=True), scan_params)
    specs = nnx.get_partition_spec(nnx.state(scan, nnx.Param))
    assert specs["blocks"]["attention"]["qkv_kernel"].get_value() == PartitionSpec("layers", "embed", None, "heads",
                                                                             "head_dim")
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.mesh_spec(specs["blocks"]["mlp"]["wi"].get_value(), (3, 64, 256), mesh) == PartitionSpec(
        None, "fsdp", "tensor")


def test_conversion_round_trips_bit_for_bit_in_every_form():
    """States, pure dicts with int or digit-string keys (as a checkpoint gives them),
    NumPy arrays, a pmap state's leading device axis, and abstract arrays whose
    shardings gain and lose the replicated layer dimension."""
    loop = nnx.state(create_model(config(**POST_LN), seed=2), nnx.Param)
    scan = to_layout(loop, scan=True)
    assert (layout_of(loop), layout_of(scan), layout_of({"step": 1})) == (False, True, None)
    assert_trees_equal(to_layout(scan, scan=False), loop)
    assert_trees_equal(to_layout(scan, scan=True), scan)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(loop))
    stringly = {**pure, "blocks": {str(k): v for k, v in pure["blocks"].items()}}
    assert_trees_equal(to_layout(to_layout(stringly, True), False), pure)
    assert_trees_equal(to_layout(stringly, True), jax.tree.map(np.asarray, nnx.to_pure_dict(scan)))
    replicated = jax.tree.map(lambda x: np.stack([x, x + 1]), pure)  # [devices, ...]
    stacked = to_layout(replicated, True, axis=1)
    assert stacked["blocks"]["mlp"]["wi"].shape == (2, 3, 64, 256)
    np.testing.assert_array_equal(stacked["blocks"]["mlp"]["wi"][1, 2], pure["blocks"][2]["mlp"]["wi"] + 1)
    assert_trees_equal(to_layout(stacked, False, axis=1), replicated)
    mesh = sharding.make_mesh(2, 2, 2)
    abstract = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))),
        pure)}
    stacked = to_layout(abstract, True)["params"]["blocks"]["mlp"]["wi"]
    assert (stacked.shape, stacked.sharding.spec) == ((3, 64, 256), PartitionSpec(None, "fsdp"))
    assert to_layout(to_layout(abstract, True), False) == abstract


# -- the same numbers ----------------------------------------------------------------------

_REFERENCES: dict[str, tuple] = {}


@pytest.mark.parametrize("norm, scan, remat", [
    *(pytest.param("pre_ln", scan, remat, id=f"pre_ln-{name}") for (scan, remat), name in zip(LAYOUTS, LAYOUT_IDS)),
    *(pytest.param("post_ln", scan, remat, id=f"post_ln-{name}") for (scan, remat), name in zip(LAYOUTS, LAYOUT_IDS)
      if scan)])
def test_scan_and_remat_give_the_loops_logits_loss_and_gradients(norm, scan, remat):
    """Pre-LN with every layout; post-LN (BERT's, with its heads) with the scan ones."""
    norm = POST_LN if norm == "post_ln" else {}
    reference = create_model(config(**norm), seed=3)
    key = str(norm)
    if key not in _REFERENCES:
        _REFERENCES[key] = loss_and_gradients(reference, BATCH_OF_ALL)
    logits, loss, grads = _REFERENCES[key]
    other_logits, other_loss, other_grads = loss_and_gradients(same_model(config(scan, remat, **norm), reference),
                                                               BATCH_OF_ALL)
    np.testing.assert_allclose(np.asarray(other_logits), np.asarray(logits), **TOLERANCE)
    np.testing.assert_allclose(float(other_loss), float(loss), **TOLERANCE)
    assert_trees_close(other_grads, grads)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # gradients worth comparing


@pytest.mark.parametrize("scan, remat", [(True, "none"), (True, "dots")], ids=["scan-none", "scan-dots"])
def test_layer_outputs_and_cached_decoding_are_the_loops(scan, remat):
    reference = create_model(config(), seed=4)
    other = same_model(config(scan, remat), reference)
    outputs, other_outputs = (compiled(model, "layer_outputs", BATCH_OF_ALL) for model in (reference, other))
    assert len(outputs) == len(other_outputs) == 4
    assert_trees_close(other_outputs, outputs)

    prompt, steps = 5, 6  # a PREFIX-free causal row: the prompt, then one token at a time
    row = {"inputs": jnp.asarray(np.random.default_rng(1).integers(7, VOCAB_SIZE, (2, prompt + steps))),
           "positions": jnp.tile(jnp.arange(prompt + steps), (2, 1)), "token_types": jnp.zeros((2, prompt + steps),
                                                                                               jnp.int32),
           "segment_ids": jnp.ones((2, prompt + steps), jnp.int32),
           "attention_kind": jnp.full((2, prompt + steps), objectives.example.L2R, jnp.int32)}

    def decode(model):
        graphdef, state = nnx.split(model)
        extend = jax.jit(lambda cache, tokens: nnx.merge(graphdef, state).extend(cache, tokens))
        cache = model.init_cache(2, prompt + steps)
        hidden, cache = extend(cache, {k: v[:, :prompt] for k, v in row.items()})
        states = [hidden]
        for t in range(prompt, prompt + steps):
            hidden, cache = extend(cache, {k: v[:, t:t + 1] for k, v in row.items()})
            states.append(hidden)
        return jnp.concatenate(states, axis=1), cache

    (states, cache), (other_states, other_cache) = decode(reference), decode(other)
    assert other_cache.keys.shape == cache.keys.shape == (3, 2, prompt + steps, 4, 16)
    assert_trees_close((other_states, other_cache), (states, cache))
    # and the cache is exact: the full forward pass (README, Model: within 1e-5)
    np.testing.assert_allclose(np.asarray(states), np.asarray(compiled(reference, "__call__", row)), rtol=0,
                               atol=1e-5)


def test_dropout_draws_per_layer_streams_the_same_in_either_layout():
    """Each layer keeps its own dropout stream (stacked in the scan layout); both
    layouts draw the same masks, and each call advances every layer's count."""
    def two_calls(model: nnx.Module) -> tuple[jax.Array, jax.Array, nnx.State]:
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state):
            model = nnx.merge(graphdef, state)
            first, again = model(BATCH_OF_ALL, deterministic=False), model(BATCH_OF_ALL, deterministic=False)
            return first, again, nnx.state(model.blocks, nnx.RngCount)

        return run(state)

    loop = create_model(config(dropout_rate=0.3), seed=6)
    scan = create_model(config(True, "full", dropout_rate=0.3), seed=6)
    first, again, _ = two_calls(loop)
    assert float(jnp.abs(first - again).max()) > 0.1  # the masks changed
    scan_first, scan_again, counts = two_calls(scan)
    assert_trees_close([scan_first, scan_again], [first, again])
    np.testing.assert_array_equal(counts["dropout"]["rngs"]["count"][...], [4, 4, 4])  # 2 dropouts x 2 calls
    keys = jax.random.key_data(nnx.state(scan.blocks, nnx.RngKey)["dropout"]["rngs"]["key"][...])
    assert len({tuple(np.asarray(k)) for k in keys}) == 3  # one stream per layer


def test_flash_key_ranges_run_through_the_scan():
    batch = packed_batches("mlm:1,clm:1,unilm:1")[0]
    reference = create_model(config(attention="flash"), seed=7)
    scan = same_model(config(True, "dots", attention="flash"), reference)
    assert_trees_close(compiled(scan, "__call__", batch), compiled(reference, "__call__", batch))


def test_remat_policies_keep_less_for_the_backward_pass():
    """Temporary bytes of the compiled gradient (scan layout, where XLA CPU's buffer
    reuse does not hide the difference): full < dots < none."""
    temp = {}
    for remat in REMAT_POLICIES:
        graphdef, params, rest = nnx.split(create_model(config(True, remat)), nnx.Param, ...)
        loss = lambda p: batch_loss(nnx.merge(graphdef, p, rest), BATCH_OF_ALL, NUM_OBJECTIVES)[0]  # noqa: E731
        temp[remat] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["dots"] < temp["none"], temp


# -- pjit and pmap ---------------------------------------------------------------------------

OPTIMIZER = make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=10)


def train_losses(model_config: TransformerConfig, parallelism: str, batches: list[dict]) -> tuple[list, dict]:
    """Losses and final parameters (loop layout) of len(batches) AdamW steps, pjit over
    a (data 2, fsdp 2, tensor 2) mesh with the state created sharded, or pmap."""
    graphdef, params, rest = nnx.split(create_model(model_config, seed=8), nnx.Param, ...)
    initial = lambda p: {"params": p, "opt_state": OPTIMIZER.init(p), "step": jnp.zeros((), jnp.int32)}  # noqa
    if parallelism == "pmap":
        devices = jax.device_count()
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (devices, *x.shape)), initial(params))
        step = jax.pmap(make_train_step(graphdef, rest, OPTIMIZER, NUM_OBJECTIVES, axis_name="devices", terms=TERMS),
                        axis_name="devices")
        place = lambda batch: {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batch.items()}  # noqa: E731
    else:
        mesh = sharding.make_mesh(2, 2, 2)
        param_shardings = sharding.tree_shardings(nnx.get_partition_spec(params), params, mesh)
        shardings = {"params": param_shardings, "opt_state": optax.tree_map_params(
            OPTIMIZER, lambda _, s: s, jax.eval_shape(OPTIMIZER.init, params), param_shardings,
            transform_non_params=lambda _: sharding.replicated(mesh)), "step": sharding.replicated(mesh)}
        state = jax.jit(initial, out_shardings=shardings)(params)
        step = jax.jit(make_train_step(graphdef, rest, OPTIMIZER, NUM_OBJECTIVES, terms=TERMS),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)))
        place = lambda batch: jax.device_put(batch, sharding.batch_sharding(mesh))  # noqa: E731
        if model_config.scan_layers:
            assert state["params"]["blocks"]["mlp"]["wi"][...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    losses = []
    for batch in batches:
        state, metrics = step(state, place(batch))
        losses.append(float(np.ravel(metrics["loss"])[0]))
    params = jax.device_get(state["params"])
    if parallelism == "pmap":
        params = jax.tree.map(lambda x: x[0], params)
    return losses, to_layout(nnx.to_pure_dict(params), scan=False)


@pytest.mark.parametrize("parallelism", ["pjit", "pmap"])
def test_sharded_and_replicated_training_steps_are_the_loops(parallelism):
    batches = packed_batches(steps=3)
    losses, params = train_losses(config(heads=("pair_classifier",)), parallelism, batches)
    scan_losses, scan_params = train_losses(config(True, "full", heads=("pair_classifier",)), parallelism, batches)
    np.testing.assert_allclose(scan_losses, losses, **TOLERANCE)
    # AdamW turns last-bit gradient differences in near-zero coordinates into ~1e-6 parameter differences:
    # the parameters agree to tests/test_parallel.py's bound for the same reason
    assert_trees_close(scan_params, params, rtol=1e-4, atol=2e-5)


# -- whole runs, checkpoints and export ----------------------------------------------------

RUNS = {"loop": {}, "scan": {"model.scan_layers": True}, "remat": {"model.remat": "full"}}
STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: workdir} of tiny causal-LM runs of STEPS steps (a checkpoint after every
    step) that differ only in layout: the loop, the scan, and the loop under remat='full'."""
    tokenizer = shared_tokenizer(tmp_path_factory)
    out = {}
    for name, overrides in RUNS.items():
        workdir = workdir_with(tokenizer, tmp_path_factory.mktemp(name) / "run")
        Trainer(run_config(**overrides), str(workdir)).run()
        out[name] = workdir
    return out


def run_config(**overrides):
    return tiny_config("clm", **{"total_steps": STEPS, "checkpoint_every": 1, "keep_checkpoints": STEPS,
                                 "log_every": 1, "optimizer.warmup_steps": 2, "peak_flops_per_device": 1e12,
                                 **overrides})


def test_training_runs_give_the_loops_losses(runs):
    losses = {name: [r["loss"] for r in read_metrics(workdir)] for name, workdir in runs.items()}
    assert len(losses["loop"]) == STEPS
    np.testing.assert_allclose(losses["scan"], losses["loop"], **TOLERANCE)
    np.testing.assert_allclose(losses["remat"], losses["loop"], **TOLERANCE)


def test_a_checkpoint_restores_into_a_model_of_the_other_layout(runs):
    """restore_params (evaluation, export, fine-tuning) converts: the loop run into a
    scan model and the scan run into a loop model, with the logits of the original."""
    logits = {}
    for run in ("loop", "scan"):
        for scan in (False, True):
            shape = model_config(read_run_config(runs[run]), run_tokenizer(runs[run]).vocab_size)
            assert shape.scan_layers is False  # what reads a trained body gets a list of blocks
            model = create_model(dataclasses.replace(shape, scan_layers=scan), seed=9)
            assert restore_params(runs[run], model)[0] == STEPS
            logits[run, scan] = np.asarray(compiled(model, "logits", compiled(model, "__call__", BATCH_OF_ALL)))
    for run in ("loop", "scan"):  # bit for bit: the conversion only stacks and indexes
        np.testing.assert_array_equal(logits[run, True], logits[run, False])


def test_a_run_resumes_in_the_other_layout(runs, tmp_path):
    """The loop run's checkpoint of step 3 restores into a scan run bit for bit
    (parameters and optimizer moments converted, placed on the run's shardings, the
    change logged), and the run goes on with the loop run's losses."""
    workdir = tmp_path / "resumed"
    shutil.copytree(runs["loop"], workdir)
    for later in range(4, STEPS + 1):
        shutil.rmtree(workdir / "checkpoints" / str(later))
    step, loop_state, _ = restore_newest(workdir, run_config(total_steps=3))
    assert step == 3
    scan = {"model.scan_layers": True}
    with Trainer(run_config(total_steps=3, **scan), str(workdir)) as trainer:
        assert trainer.run() == 3  # restored, and nothing left to train
        assert layout_of(trainer.state) is True
        moments = [(path, leaf, want) for (path, leaf), want in zip(
            jax.tree_util.tree_flatten_with_path(trainer.state)[0], jax.tree.leaves(trainer.abstract_state))
            if "mu/blocks/mlp/wi" in jax.tree_util.keystr(path, simple=True, separator="/")]
        [(_, wi, want)] = moments  # Adam's first moment of the stacked MLP kernels, where the run wants it
        assert wi.shape == (2, 64, 256) and wi.sharding == want.sharding
        assert_trees_equal(to_layout(jax.device_get(trainer.state), scan=False), jax.device_get(loop_state))
    assert Trainer(run_config(**scan), str(workdir)).run() == STEPS
    resumed = {r["step"]: r["loss"] for r in read_metrics(workdir)}
    original = {r["step"]: r["loss"] for r in read_metrics(runs["loop"])}
    np.testing.assert_allclose([resumed[s] for s in range(4, STEPS + 1)],
                               [original[s] for s in range(4, STEPS + 1)], **TOLERANCE)


def test_the_other_layout_is_offered_to_restore_only_for_model_states():
    params = nnx.state(create_model(config()), nnx.Param)
    [(other, back)] = layout_alternatives({"params": params})
    assert layout_of(other) is True and layout_of(back(other)) is False
    assert layout_alternatives({"step": jax.ShapeDtypeStruct((), jnp.int32)}) == []


def test_hugging_face_export_and_import_of_a_scan_model_are_the_loops(runs, tmp_path):
    """A scan run exports the loop run's files (at a step where both hold the same
    numbers), and a scan model's parameters cross the Hugging Face boundary in the
    loop layout, both ways, bit for bit."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    from pretrain import export
    from pretrain.hf import convert
    from pretrain.hf.models import flat_params, set_flat_params

    for name in ("loop", "scan"):  # step 1 ran at learning rate 0 (warmup): both runs hold the seed's numbers
        export.export_run(str(runs[name]), str(tmp_path / name), step=1)
    loop_file, scan_file = (load_file(tmp_path / name / "model.safetensors") for name in ("loop", "scan"))
    assert loop_file.keys() == scan_file.keys() and "transformer.h.1.mlp.c_fc.weight" in loop_file
    assert_trees_equal(scan_file, loop_file)
    # the boundary itself: flat (loop-layout) parameters out of and into a scan model, bit for bit
    loop = create_model(config(**POST_LN), seed=10)
    scan = create_model(config(True, **POST_LN), seed=11)
    set_flat_params(scan, flat_params(loop))
    assert_trees_equal(flat_params(scan), flat_params(loop))
    assert_trees_equal(convert.to_hf(flat_params(scan), "bert"), convert.to_hf(flat_params(loop), "bert"))
