"""Model configs between this project and `transformers`, and whole models both ways.

`hf_config` describes a project model as the `config.json` of `GPT2LMHeadModel`
(pre-LN) or `BertForMaskedLM` / `BertForPreTraining` (post-LN), or `ElectraForPreTraining`
(post-LN with ELECTRA's replaced-token detector; export only); `transformer_config`
reads such a `config.json` back. `load_hf_model` builds this project's Transformer
from a local `transformers` directory (`model.safetensors`), through
`pretrain.hf.convert`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from pretrain.hf import convert
from pretrain.layers import layout_of, to_layout
from pretrain.model import Transformer, TransformerConfig, create_model

GELU_NAMES = {"tanh": "gelu_new", "exact": "gelu"}  # model.gelu -> transformers' activation name
GELU_FROM_HF = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
CLASSES = {"gpt2": ("GPT2LMHeadModel",), "bert": ("BertForMaskedLM", "BertForPreTraining")}


def declared_architectures(config: TransformerConfig) -> list[str]:
    """The `transformers` architectures other than BERT that the model's auxiliary heads
    belong to (`pretrain.heads.hf_architecture`), sorted: ['electra'] for ELECTRA's
    replaced-token detector."""
    from pretrain.heads import hf_architecture

    return sorted({hf_architecture(name) for name in config.heads} - {None, "bert"})


def architecture_of(config: TransformerConfig) -> str:
    """'gpt2' for a pre-LN model; for a post-LN one the architecture its heads belong to
    ('electra'), else 'albert' where its layers are shared, else 'bert'."""
    if config.pre_layer_norm:
        return "gpt2"
    declared = declared_architectures(config)
    return declared[0] if declared else "albert" if config.share_layers else "bert"


def hf_config(config: TransformerConfig, special_ids: Mapping[str, int]) -> dict[str, Any]:
    """The `config.json` of the `transformers` model `config` exports to;
    `special_ids` are the tokenizer's ('[PAD]', '[BOS]', '[EOS]' ...)."""
    if architecture_of(config) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_positions": config.max_positions, "n_embd": config.model_dim, "n_layer": config.num_layers,
                "n_head": config.num_heads, "n_inner": config.mlp_dim,
                "activation_function": GELU_NAMES[config.gelu], "layer_norm_epsilon": config.layer_norm_epsilon,
                "resid_pdrop": config.dropout_rate, "embd_pdrop": config.dropout_rate,
                "attn_pdrop": config.dropout_rate, "initializer_range": 0.02, "scale_attn_weights": True,
                "tie_word_embeddings": True, "bos_token_id": special_ids["[BOS]"],
                "eos_token_id": special_ids["[EOS]"], "pad_token_id": special_ids["[PAD]"], "dtype": "float32"}
    if architecture_of(config) == "albert":
        shape = {"architectures": ["AlbertForMaskedLM"], "model_type": "albert",
                 "embedding_size": config.embedding_width, "num_hidden_groups": 1, "inner_group_num": 1,
                 "position_embedding_type": "absolute", "classifier_dropout_prob": 0.1}
    elif architecture_of(config) == "electra":
        shape = {"architectures": ["ElectraForPreTraining"], "model_type": "electra",
                 "embedding_size": config.embedding_width, "summary_type": "first", "summary_use_proj": True,
                 "summary_activation": "gelu", "summary_last_dropout": 0.1, "position_embedding_type": "absolute"}
    else:
        shape = {"architectures": ["BertForPreTraining" if "pair_classifier" in config.heads else "BertForMaskedLM"],
                 "model_type": "bert"}
    return {**shape, "vocab_size": config.vocab_size, "hidden_size": config.model_dim,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "intermediate_size": config.mlp_dim, "hidden_act": GELU_NAMES[config.gelu],
            "max_position_embeddings": config.max_positions, "type_vocab_size": config.num_token_types,
            "layer_norm_eps": config.layer_norm_epsilon, "hidden_dropout_prob": config.dropout_rate,
            "attention_probs_dropout_prob": config.dropout_rate, "initializer_range": 0.02,
            "tie_word_embeddings": True, "pad_token_id": special_ids["[PAD]"], "dtype": "float32"}


def transformer_config(described: Mapping[str, Any], path: str) -> tuple[str, TransformerConfig]:
    """(architecture, this project's config) of a `transformers` `config.json` (read
    from `path`); a model this project cannot represent exactly is refused."""
    kind = described.get("model_type")
    classes = described.get("architectures") or []
    if kind not in CLASSES or not any(name in CLASSES[kind] for name in classes):
        known = ", ".join(name for names in CLASSES.values() for name in names)
        raise ValueError(f"{path}: model_type {kind!r} with architectures {classes} is not one this project imports; "
                         f"give a directory of {known} (save_pretrained writes one)")
    activation = described.get("activation_function" if kind == "gpt2" else "hidden_act", "gelu_new")
    if activation not in GELU_FROM_HF:
        raise ValueError(f"{path}: activation {activation!r} has no counterpart here; this project's model.gelu "
                         f"takes {', '.join(sorted(GELU_FROM_HF))}")
    if kind == "gpt2":
        d = described["n_embd"]
        config = TransformerConfig(
            vocab_size=described["vocab_size"], num_layers=described["n_layer"], model_dim=d,
            num_heads=described["n_head"], mlp_dim=described.get("n_inner") or 4 * d,
            max_positions=described["n_positions"], num_token_types=1, pre_layer_norm=True,
            layer_norm_epsilon=described.get("layer_norm_epsilon", 1e-5), gelu=GELU_FROM_HF[activation],
            output_bias=False)
    else:
        config = TransformerConfig(
            vocab_size=described["vocab_size"], num_layers=described["num_hidden_layers"],
            model_dim=described["hidden_size"], num_heads=described["num_attention_heads"],
            mlp_dim=described["intermediate_size"], max_positions=described["max_position_embeddings"],
            num_token_types=described["type_vocab_size"], pre_layer_norm=False, mlm_transform_head=True,
            heads=("pair_classifier",) if "BertForPreTraining" in classes else (), layer_norm_epsilon=described.get("layer_norm_eps", 1e-12),
            gelu=GELU_FROM_HF[activation], output_bias=True)
    return kind, config


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """A model's parameters as float32 NumPy arrays keyed by dotted paths, its blocks
    in the loop layout (`blocks.0.mlp.wi`) whichever layout it runs: the paths
    `pretrain.hf.convert` maps."""
    pure = to_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), scan=False)
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {_dotted(path): np.asarray(leaf, np.float32) for path, leaf in leaves}


def set_flat_params(model: nnx.Module, params: Mapping[str, np.ndarray]) -> None:
    """Puts `params` (dotted paths in the loop layout, as `flat_params` gives them)
    into `model`, in the model's own layer layout; every parameter must be given,
    with its shape."""
    state = nnx.state(model, nnx.Param)
    own = nnx.to_pure_dict(state)
    pure = to_layout(own, scan=False)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    missing = [_dotted(path) for path, _ in leaves if _dotted(path) not in params]
    extra = sorted(set(params) - {_dotted(path) for path, _ in leaves})
    if missing or extra:
        raise ValueError(f"the converted parameters do not fit the model: missing {missing[:5]}, extra {extra[:5]}")
    values = []
    for path, leaf in leaves:
        value = np.asarray(params[_dotted(path)], np.float32)
        if value.shape != leaf.shape:
            raise ValueError(f"parameter {_dotted(path)} has shape {value.shape}, the model wants {leaf.shape}")
        values.append(value)
    filled = jax.tree_util.tree_unflatten(treedef, values)
    nnx.replace_by_pure_dict(state, to_layout(filled, scan=bool(layout_of(own))))
    nnx.update(model, state)


SHAPE_FIELDS = ("num_layers", "model_dim", "num_heads", "mlp_dim", "max_positions", "num_token_types",
                "pre_layer_norm", "mlm_transform_head", "embedding_dim", "heads", "layer_norm_epsilon", "gelu", "output_bias")


def is_hf_directory(directory: str) -> bool:
    """Whether `directory` holds a `transformers` model (a `config.json` with a
    `model_type`) rather than one of this project's runs."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            return "model_type" in json.load(handle)
    except (OSError, ValueError):
        return False


def hf_directory_problems(directory: str) -> list[str]:
    """Why `config.init.hf` cannot be imported, or nothing (each names the file)."""
    if not os.path.isdir(directory):
        return [f"config.init.hf={directory!r} is not a directory; give a local Hugging Face model directory "
                "(save_pretrained writes one; nothing is downloaded)"]
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [name for name in needed if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        return [f"config.init.hf={directory!r} lacks {', '.join(missing)}; save the model and its tokenizer there "
                "with save_pretrained (safetensors weights, a fast tokenizer)"]
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            _, config = transformer_config(json.load(handle), os.path.join(directory, "config.json"))
    except (ValueError, KeyError) as error:
        return [f"config.init.hf: {error}"]
    from tokenizers import Tokenizer as HFTokenizer

    pieces = HFTokenizer.from_file(os.path.join(directory, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if pieces != config.vocab_size:
        return [f"config.init.hf={directory!r}: its model embeds {config.vocab_size} tokens and its tokenizer.json has "
                f"{pieces}; this project sizes the embedding by the tokenizer, so give a directory where they agree"]
    return []


def adopt_shape(model_fields: Any, directory: str) -> None:
    """Sets a run's `config.model` shape fields to those of the Hugging Face model in
    `directory` (dropout and dtype stay the run's own)."""
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
        _, config = transformer_config(json.load(handle), directory)
    for field in SHAPE_FIELDS:
        model_fields[field] = getattr(config, field)


# UniLM's code grows BERT's two-row token-type table: L2R (2), R2L (3) and the seq2seq
# source (4) start from type 0, the seq2seq target (5) and type 6 from type 1.
GROWN_TYPE_SOURCES = {2: 0, 3: 0, 4: 0, 5: 1, 6: 1}


def grow_token_types(table: np.ndarray, rows: int) -> np.ndarray:
    """`table` [T, D] with rows added up to `rows`, each a copy of the row UniLM's code
    copies (`GROWN_TYPE_SOURCES`; type 0 for any beyond); unchanged if it is long enough."""
    if rows <= len(table):
        return table
    added = [table[GROWN_TYPE_SOURCES.get(index, 0)] for index in range(len(table), rows)]
    return np.concatenate([table, np.stack(added)]).astype(table.dtype)


def hf_params(directory: str, num_heads: int) -> tuple[str, dict[str, np.ndarray]]:
    """(architecture, this project's parameters) of the Hugging Face model in `directory`."""
    from safetensors.numpy import load_file

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
        architecture, _ = transformer_config(json.load(handle), directory)
    return architecture, convert.from_hf(load_file(os.path.join(directory, "model.safetensors")), architecture,
                                         num_heads=num_heads)


def load_hf_model(directory: str | os.PathLike) -> tuple[str, Transformer]:
    """(architecture, model) of a local `transformers` BERT or GPT-2 directory."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: give a directory that transformers' save_pretrained wrote")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} is missing: this project reads safetensors weights; save the model "
                                "with save_pretrained(dir) (safetensors is its default)")
    with open(config_path, encoding="utf-8") as handle:
        architecture, config = transformer_config(json.load(handle), config_path)
    model = create_model(config)
    set_flat_params(model, hf_params(directory, config.num_heads)[1])
    return architecture, model


def _dotted(path: tuple) -> str:
    return ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
