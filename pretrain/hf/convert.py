"""Parameters between this project's Transformer and `transformers`' BERT and GPT-2.

NumPy only (no torch): a conversion is transposes and reshapes, so HF -> project -> HF
gives bit-identical weights. Parameters are flat dicts keyed by dotted paths
(`blocks.0.attention.qkv_kernel` here, `bert.encoder.layer.0.attention.self.query.weight`
there), the blocks always in the loop layout: a model that scans stacked layers
(`config.model.scan_layers`) is converted at the boundary, `pretrain.hf.models.flat_params`
and `set_flat_params`. The kernels of this project multiply as `x @ kernel` ([in, out]); torch's
`Linear` stores [out, in] (BERT), GPT-2's `Conv1D` [in, out].

What maps to what:

| this project                      | BERT (`BertForMaskedLM` / `BertForPreTraining`) | GPT-2 (`GPT2LMHeadModel`) |
|-----------------------------------|----------------------------------------------|---------------------------|
| token / position embedding        | embeddings.word / position_embeddings         | wte / wpe                 |
| type embedding                    | embeddings.token_type_embeddings              | row 0 added into wpe      |
| embedding_norm (post-LN)          | embeddings.LayerNorm                          | —                         |
| attention qkv, out                | attention.self.query/key/value, output.dense   | attn.c_attn, attn.c_proj |
| attention_norm, mlp_norm          | attention.output.LayerNorm, output.LayerNorm   | ln_1, ln_2               |
| mlp wi, wo                        | intermediate.dense, output.dense               | mlp.c_fc, mlp.c_proj     |
| final_norm (pre-LN)               | —                                             | ln_f                      |
| head_kernel/bias/norm             | cls.predictions.transform                      | —                        |
| output_bias                       | cls.predictions.bias                           | — (must be off or zero)  |
| embedding_projection (factorised) | — (ELECTRA: electra.embeddings_project)        | —                        |
| heads.<name>                      | what the head's `to_hf` writes (pair_classifier: bert.pooler.dense, cls.seq_relationship) | — |

ELECTRA's discriminator (`ElectraForPreTraining`, written only) is the BERT column under
`electra.` instead of `bert.`, without `cls.predictions`, plus the heads whose
`hf_architecture` is 'electra'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Params = dict[str, np.ndarray]
ARCHITECTURES = ("bert", "gpt2")  # converted both ways
# Written only: ELECTRA's discriminator (`ElectraForPreTraining`), a BERT body under `electra.` with
# `embeddings_project` where the embeddings are narrower than the stack, and no vocabulary head.
EXPORT_ARCHITECTURES = (*ARCHITECTURES, "electra", "albert")
# Written only as well: ALBERT (`AlbertForMaskedLM`): BERT's layer under other names, one layer group of one
# layer (`model.share_layers`), the embeddings always mapped up to the stack (identity where widths are equal).
ALBERT_LAYER = "albert.encoder.albert_layer_groups.0.albert_layers.0."
ALBERT_NAMES = {"attention.self.": "attention.", "attention.output.dense.": "attention.dense.",
                "attention.output.LayerNorm.": "attention.LayerNorm.", "intermediate.dense.": "ffn.",
                "output.dense.": "ffn_output.", "output.LayerNorm.": "full_layer_layer_norm."}
BODY_PREFIXES = {"bert": "bert.", "electra": "electra."}
HEADS = "heads."


def _norm(params: Mapping[str, np.ndarray], ours: str) -> tuple[np.ndarray, np.ndarray]:
    return params[f"{ours}.scale"], params[f"{ours}.bias"]


def exported_heads(heads: Sequence[str], architecture: str) -> tuple[str, ...]:
    """The auxiliary heads (`pretrain.heads`) among `heads` whose counterpart is in
    `architecture`'s pretraining model; the others stay behind on export."""
    from pretrain.heads import hf_architecture

    return tuple(name for name in heads if hf_architecture(name) == architecture)


def to_hf(params: Mapping[str, np.ndarray], architecture: str) -> Params:
    """This project's parameters as the state dict of `architecture` (one of
    `EXPORT_ARCHITECTURES`), with every auxiliary head that has a counterpart there."""
    if architecture == "gpt2":
        out = _to_gpt2(params)
    elif architecture == "albert":
        out = _to_albert(params)
    elif architecture in BODY_PREFIXES:
        out = _to_bert_body(params, BODY_PREFIXES[architecture])
        if architecture == "bert":
            out.update(_to_bert_mlm_head(params))
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {EXPORT_ARCHITECTURES}")
    heads = sorted({key[len(HEADS):].split(".")[0] for key in params if key.startswith(HEADS)})
    for name in exported_heads(heads, architecture):
        from pretrain.heads import head_class

        prefix = f"{HEADS}{name}."
        out.update(head_class(name).to_hf({key[len(prefix):]: value for key, value in params.items()
                                           if key.startswith(prefix)}))
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


def from_hf(state: Mapping[str, np.ndarray], architecture: str, *, num_heads: int) -> Params:
    """The state dict of a `transformers` `architecture` model as this project's parameters."""
    if architecture == "bert":
        return _from_bert(state, num_heads)
    if architecture == "gpt2":
        return _from_gpt2(state, num_heads)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")


def num_layers(params: Mapping[str, np.ndarray], prefix: str, marker: str) -> int:
    """How many layers a flat dict holds (`prefix<i>.<marker>...` keys)."""
    found = {int(key[len(prefix):].split(".")[0]) for key in params if key.startswith(prefix) and marker in key}
    return len(found)


# -- BERT --------------------------------------------------------------------------------

def _to_bert_body(params: Mapping[str, np.ndarray], prefix: str) -> Params:
    """Embeddings (and their projection, if any) and encoder layers under `prefix`."""
    out: Params = {
        f"{prefix}embeddings.word_embeddings.weight": params["token_embedding"],
        f"{prefix}embeddings.position_embeddings.weight": params["position_embedding"],
        f"{prefix}embeddings.token_type_embeddings.weight": params["type_embedding"],
    }
    out[f"{prefix}embeddings.LayerNorm.weight"], out[f"{prefix}embeddings.LayerNorm.bias"] = _norm(
        params, "embedding_norm")
    if "embedding_projection_kernel" in params:
        out[f"{prefix}embeddings_project.weight"] = params["embedding_projection_kernel"].T
        out[f"{prefix}embeddings_project.bias"] = params["embedding_projection_bias"]
    for i in range(num_layers(params, "blocks.", "qkv_kernel")):
        ours, theirs = f"blocks.{i}", f"{prefix}encoder.layer.{i}"
        qkv, qkv_bias = params[f"{ours}.attention.qkv_kernel"], params[f"{ours}.attention.qkv_bias"]
        d = qkv.shape[0]
        for index, name in enumerate(("query", "key", "value")):
            out[f"{theirs}.attention.self.{name}.weight"] = qkv[:, index].reshape(d, -1).T
            out[f"{theirs}.attention.self.{name}.bias"] = qkv_bias[index].reshape(-1)
        out_kernel = params[f"{ours}.attention.out_kernel"]
        out[f"{theirs}.attention.output.dense.weight"] = out_kernel.reshape(-1, d).T
        out[f"{theirs}.attention.output.dense.bias"] = params[f"{ours}.attention.out_bias"]
        (out[f"{theirs}.attention.output.LayerNorm.weight"],
         out[f"{theirs}.attention.output.LayerNorm.bias"]) = _norm(params, f"{ours}.attention_norm")
        out[f"{theirs}.intermediate.dense.weight"] = params[f"{ours}.mlp.wi"].T
        out[f"{theirs}.intermediate.dense.bias"] = params[f"{ours}.mlp.bi"]
        out[f"{theirs}.output.dense.weight"] = params[f"{ours}.mlp.wo"].T
        out[f"{theirs}.output.dense.bias"] = params[f"{ours}.mlp.bo"]
        out[f"{theirs}.output.LayerNorm.weight"], out[f"{theirs}.output.LayerNorm.bias"] = _norm(
            params, f"{ours}.mlp_norm")
    return out


def _to_albert(params: Mapping[str, np.ndarray]) -> Params:
    """`AlbertForMaskedLM`'s state dict: BERT's body and MLM head under ALBERT's names."""
    out: Params = {}
    for key, value in _to_bert_body(params, "albert.").items():
        if key.startswith("albert.encoder.layer.0."):
            rest = key[len("albert.encoder.layer.0."):]
            old = next(prefix for prefix in ALBERT_NAMES if rest.startswith(prefix))
            out[ALBERT_LAYER + ALBERT_NAMES[old] + rest[len(old):]] = value
        elif key.startswith("albert.embeddings_project."):
            out["albert.encoder.embedding_hidden_mapping_in." + key.rsplit(".", 1)[1]] = value
        else:
            out[key] = value
    if "embedding_projection_kernel" not in params:  # equal widths: ALBERT's mapping is then the identity
        width = params["token_embedding"].shape[1]
        out["albert.encoder.embedding_hidden_mapping_in.weight"] = np.eye(width, dtype=np.float32)
        out["albert.encoder.embedding_hidden_mapping_in.bias"] = np.zeros(width, np.float32)
    head = _to_bert_mlm_head(params)
    out["predictions.dense.weight"] = head["cls.predictions.transform.dense.weight"]
    out["predictions.dense.bias"] = head["cls.predictions.transform.dense.bias"]
    out["predictions.LayerNorm.weight"] = head["cls.predictions.transform.LayerNorm.weight"]
    out["predictions.LayerNorm.bias"] = head["cls.predictions.transform.LayerNorm.bias"]
    out["predictions.bias"] = out["predictions.decoder.bias"] = head["cls.predictions.bias"]
    out["predictions.decoder.weight"] = params["token_embedding"]
    return out


def _to_bert_mlm_head(params: Mapping[str, np.ndarray]) -> Params:
    """BERT's MLM transform head and output bias (`cls.predictions`)."""
    out = {"cls.predictions.transform.dense.weight": params["head_kernel"].T,
           "cls.predictions.transform.dense.bias": params["head_bias"]}
    out["cls.predictions.transform.LayerNorm.weight"], out["cls.predictions.transform.LayerNorm.bias"] = _norm(
        params, "head_norm")
    vocab = params["token_embedding"].shape[0]
    out["cls.predictions.bias"] = params.get("output_bias", np.zeros(vocab, np.float32))
    return out


def _from_bert(state: Mapping[str, np.ndarray], num_heads: int) -> Params:
    params: Params = {
        "token_embedding": state["bert.embeddings.word_embeddings.weight"],
        "position_embedding": state["bert.embeddings.position_embeddings.weight"],
        "type_embedding": state["bert.embeddings.token_type_embeddings.weight"],
        "embedding_norm.scale": state["bert.embeddings.LayerNorm.weight"],
        "embedding_norm.bias": state["bert.embeddings.LayerNorm.bias"],
    }
    for i in range(num_layers(state, "bert.encoder.layer.", "attention.self.query.weight")):
        ours, theirs = f"blocks.{i}", f"bert.encoder.layer.{i}"
        weights = [state[f"{theirs}.attention.self.{name}.weight"] for name in ("query", "key", "value")]
        biases = [state[f"{theirs}.attention.self.{name}.bias"] for name in ("query", "key", "value")]
        d = weights[0].shape[1]
        head_dim = weights[0].shape[0] // num_heads
        params[f"{ours}.attention.qkv_kernel"] = np.stack([w.T.reshape(d, num_heads, head_dim) for w in weights], 1)
        params[f"{ours}.attention.qkv_bias"] = np.stack([b.reshape(num_heads, head_dim) for b in biases])
        params[f"{ours}.attention.out_kernel"] = state[f"{theirs}.attention.output.dense.weight"].T.reshape(
            num_heads, head_dim, -1)
        params[f"{ours}.attention.out_bias"] = state[f"{theirs}.attention.output.dense.bias"]
        params[f"{ours}.attention_norm.scale"] = state[f"{theirs}.attention.output.LayerNorm.weight"]
        params[f"{ours}.attention_norm.bias"] = state[f"{theirs}.attention.output.LayerNorm.bias"]
        params[f"{ours}.mlp.wi"] = state[f"{theirs}.intermediate.dense.weight"].T
        params[f"{ours}.mlp.bi"] = state[f"{theirs}.intermediate.dense.bias"]
        params[f"{ours}.mlp.wo"] = state[f"{theirs}.output.dense.weight"].T
        params[f"{ours}.mlp.bo"] = state[f"{theirs}.output.dense.bias"]
        params[f"{ours}.mlp_norm.scale"] = state[f"{theirs}.output.LayerNorm.weight"]
        params[f"{ours}.mlp_norm.bias"] = state[f"{theirs}.output.LayerNorm.bias"]
    params["head_kernel"] = state["cls.predictions.transform.dense.weight"].T
    params["head_bias"] = state["cls.predictions.transform.dense.bias"]
    params["head_norm.scale"] = state["cls.predictions.transform.LayerNorm.weight"]
    params["head_norm.bias"] = state["cls.predictions.transform.LayerNorm.bias"]
    params["output_bias"] = state["cls.predictions.bias"]
    from pretrain.heads import head_class, head_names, hf_architecture

    for name in head_names():
        own = head_class(name).from_hf(state) if hf_architecture(name) == "bert" else None
        params.update({f"{HEADS}{name}.{key}": value for key, value in (own or {}).items()})
    return {key: np.ascontiguousarray(value) for key, value in params.items()}


# -- GPT-2 -------------------------------------------------------------------------------

def _to_gpt2(params: Mapping[str, np.ndarray]) -> Params:
    # GPT-2 embeds no token types: the run's only type row joins the position table.
    out: Params = {
        "transformer.wte.weight": params["token_embedding"],
        "transformer.wpe.weight": params["position_embedding"] + params["type_embedding"][0],
    }
    for i in range(num_layers(params, "blocks.", "qkv_kernel")):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        qkv = params[f"{ours}.attention.qkv_kernel"]
        d = qkv.shape[0]
        out[f"{theirs}.ln_1.weight"], out[f"{theirs}.ln_1.bias"] = _norm(params, f"{ours}.attention_norm")
        out[f"{theirs}.attn.c_attn.weight"] = qkv.reshape(d, -1)
        out[f"{theirs}.attn.c_attn.bias"] = params[f"{ours}.attention.qkv_bias"].reshape(-1)
        out[f"{theirs}.attn.c_proj.weight"] = params[f"{ours}.attention.out_kernel"].reshape(-1, d)
        out[f"{theirs}.attn.c_proj.bias"] = params[f"{ours}.attention.out_bias"]
        out[f"{theirs}.ln_2.weight"], out[f"{theirs}.ln_2.bias"] = _norm(params, f"{ours}.mlp_norm")
        out[f"{theirs}.mlp.c_fc.weight"] = params[f"{ours}.mlp.wi"]
        out[f"{theirs}.mlp.c_fc.bias"] = params[f"{ours}.mlp.bi"]
        out[f"{theirs}.mlp.c_proj.weight"] = params[f"{ours}.mlp.wo"]
        out[f"{theirs}.mlp.c_proj.bias"] = params[f"{ours}.mlp.bo"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = _norm(params, "final_norm")
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


def _from_gpt2(state: Mapping[str, np.ndarray], num_heads: int) -> Params:
    d = state["transformer.wte.weight"].shape[1]
    params: Params = {
        "token_embedding": state["transformer.wte.weight"],
        "position_embedding": state["transformer.wpe.weight"],
        "type_embedding": np.zeros((1, d), np.float32),
        "final_norm.scale": state["transformer.ln_f.weight"],
        "final_norm.bias": state["transformer.ln_f.bias"],
    }
    head_dim = d // num_heads
    for i in range(num_layers(state, "transformer.h.", "attn.c_attn.weight")):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        params[f"{ours}.attention_norm.scale"] = state[f"{theirs}.ln_1.weight"]
        params[f"{ours}.attention_norm.bias"] = state[f"{theirs}.ln_1.bias"]
        params[f"{ours}.attention.qkv_kernel"] = state[f"{theirs}.attn.c_attn.weight"].reshape(d, 3, num_heads,
                                                                                                 head_dim)
        params[f"{ours}.attention.qkv_bias"] = state[f"{theirs}.attn.c_attn.bias"].reshape(3, num_heads, head_dim)
        params[f"{ours}.attention.out_kernel"] = state[f"{theirs}.attn.c_proj.weight"].reshape(num_heads, head_dim, d)
        params[f"{ours}.attention.out_bias"] = state[f"{theirs}.attn.c_proj.bias"]
        params[f"{ours}.mlp_norm.scale"] = state[f"{theirs}.ln_2.weight"]
        params[f"{ours}.mlp_norm.bias"] = state[f"{theirs}.ln_2.bias"]
        params[f"{ours}.mlp.wi"] = state[f"{theirs}.mlp.c_fc.weight"]
        params[f"{ours}.mlp.bi"] = state[f"{theirs}.mlp.c_fc.bias"]
        params[f"{ours}.mlp.wo"] = state[f"{theirs}.mlp.c_proj.weight"]
        params[f"{ours}.mlp.bo"] = state[f"{theirs}.mlp.c_proj.bias"]
    return {key: np.ascontiguousarray(value) for key, value in params.items()}
