"""A trained model out of a run directory, for evaluation and generation.

    trained = load_trained("runs/mlm")        # newest loadable checkpoint
    trained.model, trained.tokenizer, trained.config, trained.step

A run directory (`pretrain.train`) holds `config.json`, `tokenizer.model` and
`checkpoints/<step>/`. Only the parameters are needed here, so the checkpoint is
read against the structure it was saved with (Orbax metadata) rather than against
a rebuilt trainer state: whatever else the trainer keeps in its state, and
whichever parallelism saved it (a pmap state has a leading device axis), the
parameters come back onto one device. Missing pieces get one message that names
the path and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from objectives import parse_mixture_spec, registered_names
from pretrain.checkpoint import Checkpointer
from pretrain.layers import BLOCKS, to_layout
from pretrain.model import Transformer, TransformerConfig, create_model, parameter_count
from pretrain.tokenizer import MODEL_FILENAME, Tokenizer, load_workdir_tokenizer

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"


def train_hint(workdir: str | os.PathLike) -> str:
    """The command that trains a run in `workdir`, as the fix of a message about a
    directory that is not one: its objective is the directory's name when that names
    registered objectives (runs/clm -> clm), else a placeholder."""
    name = os.path.basename(os.path.normpath(os.fspath(workdir)))
    try:
        known = set(parse_mixture_spec(name)) <= set(registered_names())
    except ValueError:
        known = False
    return (f"train one first: python -m pretrain.train --config=configs/pretrain.py:objective="
            f"{name if known else '<objective>'} --workdir={os.fspath(workdir)}")


def missing_run(workdir: str | os.PathLike, flag: str) -> str:
    """The message for a run directory the user named with `flag` (`--workdir`,
    `--config.init`, ...) that does not exist: the flag as they passed it, the existing
    directories beside it with close names (a typo), and the command that makes a run."""
    path = os.fspath(workdir)
    parent, name = os.path.split(os.path.normpath(path))
    try:
        siblings = [entry for entry in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent, entry))]
    except OSError:
        siblings = []
    scored = sorted((-difflib.SequenceMatcher(None, name, entry).ratio(), entry) for entry in siblings)
    close = [os.path.join(parent, entry) for score, entry in scored if -score >= 0.6][:3]
    guess = f" (did you mean {' or '.join(f'{flag}={c}' for c in close)}?)" if close else ""
    return f"{flag}={path} does not exist{guess}; pass a training run's directory, or {train_hint(path)}"


@dataclasses.dataclass
class TrainedModel:
    """A model restored from a run directory, with what produced it."""

    model: Transformer
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict  # the run's training config (config.json)
    step: int  # the checkpoint's step
    workdir: str
    data_state: dict  # the input iterator state saved with the checkpoint

    @property
    def parameters(self) -> int:
        """Number of trainable parameters."""
        return parameter_count(self.model)

    @property
    def tokens_seen(self) -> int | None:
        """Real (non-padding) tokens the run trained on, from the packer's counters."""
        stats = self.data_state.get("stats") if isinstance(self.data_state, dict) else None
        return int(stats["real_tokens"]) if stats and "real_tokens" in stats else None

    @property
    def trained_objectives(self) -> tuple[str, ...]:
        """The registered objective names the run trained with (its mixture spec)."""
        return tuple(parse_mixture_spec(self.config.objective))


def read_run_config(workdir: str | os.PathLike, flag: str = "--workdir") -> ml_collections.ConfigDict:
    """The training config a run wrote to `workdir/config.json`; `flag` is the option
    the user named the directory with, which the messages about a missing run name."""
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(missing_run(workdir, flag))
    path = os.path.join(workdir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing, so {flag}={workdir} is not a training run (pretrain.train writes "
                                f"it when it starts); {train_hint(workdir)}")
    try:
        with open(path, encoding="utf-8") as handle:
            fields = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged (not JSON: {error}); the training command rewrites it each time it "
                         "starts, so rerun the run's training command (it writes the file, then resumes, or "
                         "stops at once when the run is complete), or restore the file from a backup") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(fields).__name__}, not the run's config); rerun the "
                         "run's training command to rewrite it, or restore it from a backup")
    return ml_collections.ConfigDict(_with_current_fields(fields, path))


# Fields whose default changed, with the value every run had before the field existed:
# a config that lacks one was written then, so it takes that value, not today's default.
FORMER_VALUES = {
    "model.output_bias": True,  # every model had an output bias before the option existed
}


FREE_FORM_RECORDS = ("distill",)  # config groups whose fields another program owns (pretrain.distill)


def _with_current_fields(fields: dict, path: str) -> dict:
    """A run config written by another version of this project, read by this one:
    fields it lacks take today's defaults (or, for a field in FORMER_VALUES, the value
    runs had before it existed), objective settings this version no longer has are
    dropped (they could not be applied), other unknown fields are kept and ignored;
    one warning lists both."""
    from configs.pretrain import get_config  # the schema; imported late, as configs import pretrain

    missing, unknown = [], []

    def merge(default: dict, given: dict, prefix: str, drop_unknown: bool) -> dict:
        merged = {}
        for key, value in given.items():
            if key not in default:
                unknown.append(prefix + key)
                if drop_unknown:
                    continue
            elif prefix == "" and key in FREE_FORM_RECORDS:  # kept whole: its own program reads it
                pass
            elif isinstance(default[key], dict) and isinstance(value, dict):
                value = merge(default[key], value, f"{prefix}{key}.", drop_unknown or prefix == "objectives.")
            merged[key] = value
        for key, value in default.items():
            if key not in given:
                merged[key] = FORMER_VALUES.get(prefix + key, value)
                if prefix != "objectives.":  # an objective registered since: nothing to report
                    missing.append(prefix + key)
        return merged

    merged = merge(get_config().to_dict(), fields, "", False)
    former = [f"{key}={FORMER_VALUES[key]!r}" for key in missing if key in FORMER_VALUES]
    missing = [key for key in missing if key not in FORMER_VALUES]
    if missing or unknown or former:
        log.warning("%s was written by another version of this project: %s", path, "; ".join(
            part for part in (f"fields it lacks take today's defaults ({', '.join(missing)})" if missing else "",
                              f"fields it lacks from before they existed take the value runs then had "
                              f"({', '.join(former)})" if former else "",
                              f"fields this version does not know are ignored ({', '.join(unknown)})" if unknown
                              else "") if part))
    return merged


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
    """The Transformer shape of a run config (the vocabulary is the tokenizer's).

    Its attention is the dense path: a trained model may be scored, prompted or
    fine-tuned under any objective's layout, and only the dense mask runs every
    layout (`pretrain.attention.has_key_ranges`); the parameters are the same. Its
    blocks are a list (`scan_layers=False`) whatever layout trained them: what reads a
    trained body walks its layers one by one (fine-tuning's layer-wise learning rates
    and unfreezing, `pretrain.transfer.heads.parameter_depths`), and `restore_params`
    converts a scan run's checkpoint; the numbers are the same."""
    fields = {field.name for field in dataclasses.fields(TransformerConfig)} - {"vocab_size", "attention",
                                                                                "scan_layers"}
    return TransformerConfig(**{k: v for k, v in config.model.items() if k in fields}, vocab_size=vocab_size)


def _abstract_from_metadata(checkpointer: Checkpointer, steps: list[int]) -> Any:
    """Shapes and dtypes of the saved state (of the newest step whose metadata reads),
    placed on the first device."""
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    reader = ocp.CheckpointManager(checkpointer.directory, item_handlers=handlers,
                                   options=ocp.CheckpointManagerOptions(create=False))
    metadata = None
    try:
        for step in reversed(steps):
            try:
                metadata = reader.item_metadata(step)["state"]
                break
            except Exception:  # noqa: BLE001 — a damaged step; Checkpointer.restore reports it
                continue
    finally:
        reader.close()
    if metadata is None:
        raise ValueError(f"no checkpoint in {checkpointer.directory} can be read (steps {steps}); restore the "
                         "directory from a backup or retrain")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), metadata)


def _strip_variable_boxes(tree: Any) -> Any:
    """The saved NNX state nests each array as {'value': array}; plain arrays here."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {key: _strip_variable_boxes(value) for key, value in tree.items()}
    return tree


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the run's finished checkpoints, oldest first; none is an error that says what to do."""
    workdir = os.fspath(workdir)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} has no checkpoints/ directory: the run has not saved a checkpoint yet; "
                                "let it reach config.checkpoint_every (or its end), or " + train_hint(workdir))
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        steps = checkpointer.steps()
    finally:
        checkpointer.close()
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint; let the run reach "
                                "config.checkpoint_every (or its end), or " + train_hint(workdir))
    return steps


# The TransformerConfig fields that decide parameter shapes.
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_dim", "max_positions", "num_token_types",
                "pre_layer_norm", "mlm_transform_head", "embedding_dim", "heads", "output_bias",
                "hidden_projection_dim", "share_layers", "heads_per_layer")


def _check_shape(workdir: str | os.PathLike, checkpointer: Checkpointer, step: int, config: TransformerConfig) -> None:
    """Refuses a model whose shape differs from the one that wrote the checkpoint of
    `step` (as its meta item records it), naming each differing field."""
    stored = (checkpointer.written_by(step) or {}).get("model") or {}
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))  # as stored: tuples are lists
    changed = [f"model.{field} is {stored[field]!r} there and {wanted[field]!r} here" for field in SHAPE_FIELDS
               if field in stored and stored[field] != wanted[field]]
    if changed:
        raise ValueError(f"the checkpoint at step {step} in {os.fspath(workdir)} was written by a model of another "
                         f"shape: {'; '.join(changed)}. The body's shape comes from {CONFIG_FILENAME} and "
                         f"tokenizer.model in that directory: restore them as the run wrote them")


def restore_params(workdir: str | os.PathLike, model: Transformer, step: int | None = None) -> tuple[int, dict]:
    """Loads the newest loadable checkpoint's parameters (or those of `step`) into
    `model` (in place), whichever layer layout wrote them (`pretrain.layers.to_layout`).

    Returns (step, data_state). A damaged newest checkpoint falls back to an
    older one (pretrain.checkpoint reports it); a damaged `step` is an error.
    """
    steps = checkpoint_steps(workdir)
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        _check_shape(workdir, checkpointer, steps[-1] if step is None else step, model.config)
    finally:
        checkpointer.close()
    return restore_into(workdir, model, step, scan=model.config.scan_layers)


def restore_into(workdir: str | os.PathLike, module: nnx.Module, step: int | None = None, *,
                 scan: bool = False) -> tuple[int, dict]:
    """Loads the parameters of a run's newest loadable checkpoint (or of `step`) into
    `module` (in place): any module whose parameters the run trained (a Transformer, a
    fine-tuned task model), with its blocks in the scan layout when `scan`; a state
    saved by pmap (one copy per device) gives its first copy. Returns (step, data_state)."""
    steps = checkpoint_steps(workdir)
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        restored = checkpointer.restore(_abstract_from_metadata(checkpointer, steps), step)
        if restored is None:
            raise ValueError(f"the checkpoint of step {step} in {checkpointer.directory} is damaged; use another "
                             f"step (checkpoints at {steps})")
        step, state, data_state = restored
    finally:
        checkpointer.close()
    directory = checkpointer.directory
    params = nnx.state(module, nnx.Param)
    expected = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params))
    stored = _strip_variable_boxes(state["params"])
    replicas = _replica_axes(expected, stored)  # 1: pmap's leading device axis
    nnx.replace_by_pure_dict(params, to_layout(stored, scan, axis=replicas))

    def unreplicate(want: jax.ShapeDtypeStruct, got: jax.Array) -> jax.Array:
        if got.shape != want.shape and got.shape[1:] == want.shape:  # pmap: a leading device axis
            got = got[0]
        if got.shape != want.shape:
            raise ValueError(f"checkpoint at step {step} in {directory} holds a parameter of shape {got.shape} where "
                             f"the run's config.json gives {want.shape}; was config.json edited?")
        return got

    nnx.replace_by_pure_dict(params, jax.tree.map(unreplicate, expected, nnx.to_pure_dict(params)))
    nnx.update(module, params)
    return step, data_state


def _replica_axes(expected: Any, stored: Any) -> int:
    """How many leading axes (0, or pmap's device axis) the stored parameters have beyond
    the module's, read off a parameter outside the blocks (whose layer axis depends on
    the layout)."""
    for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
        keys = [getattr(key, "key", getattr(key, "idx", key)) for key in path]
        if BLOCKS in keys:
            continue
        got = stored
        for key in keys:
            got = got[key] if key in got else got[str(key)]  # a saved list's indices come back as strings
        return max(np.ndim(got) - len(want.shape), 0)
    return 0


def run_tokenizer(workdir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a run directory (its SentencePiece model, or the tokenizer.json
    of the Hugging Face model it started from); its absence is one message saying what
    to do."""
    from pretrain.hf.imported_tokenizer import FILENAME as IMPORTED, ImportedTokenizer

    imported = os.path.join(os.fspath(workdir), IMPORTED)
    if os.path.isfile(imported):
        return ImportedTokenizer(imported)
    path = os.path.join(os.fspath(workdir), MODEL_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the run's tokenizer is needed to read its "
                                "checkpoints; restore it, or " + train_hint(workdir))
    return load_workdir_tokenizer(path)


def load_trained(workdir: str | os.PathLike) -> TrainedModel:
    """The newest checkpoint of a run directory as a ready-to-use model."""
    workdir = os.fspath(workdir)
    config = read_run_config(workdir)
    checkpoint_steps(workdir)  # before the tokenizer: "no checkpoint" is the likelier news
    tokenizer = run_tokenizer(workdir)
    model = create_model(model_config(config, tokenizer.vocab_size), seed=0)
    step, data_state = restore_params(workdir, model)
    return TrainedModel(model, tokenizer, config, step, workdir, data_state)

