"""The Transformer every objective trains: one stack steered only by attention masks.

Flax NNX. Token, learned-position and token-type embeddings; pre-LayerNorm blocks
(post-LN for BERT fidelity); multi-head softmax attention under the mask of
`pretrain.attention`; GELU MLP (the layers and how they run, loop or scan, with
rematerialisation: `pretrain.layers`); an
output projection tied to the token embedding, with an optional bias (with an optional
BERT MLM transform head in front); the auxiliary heads its objectives' loss terms train
(`pretrain.heads`, e.g. BERT's sentence-pair classifier); and a KV cache for incremental
left-to-right decoding.

Parameters are float32 and carry logical axis names (`nnx.with_partitioning`),
which `pretrain.sharding` maps to mesh axes; `dtype` sets the compute precision.
Shapes: B batch, L length, D model_dim, H heads, K head_dim, F mlp_dim, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.attention import ATTENTION_CHOICES, attention_mask, key_ranges, visibility
from pretrain.errors import raise_problems
from pretrain.layers import (ACTIVATION_QUANTIZATIONS, GELU_FORMS, REMAT_POLICIES, KeyRanges, gelu, make_blocks,
                             run_blocks)
from pretrain.layers import layer_norm as _layer_norm
from pretrain.layers import param as _param
from pretrain.layers import Attention, Block, MLP, dense  # noqa: F401 (the model's layers, importable from here)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of the Transformer."""

    vocab_size: int = 8000
    num_layers: int = 4
    model_dim: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    max_positions: int = 512  # size of the learned position table
    num_token_types: int = 8  # UniLM uses types 0..5
    dropout_rate: float = 0.0  # on embeddings, attention output and MLP output
    pre_layer_norm: bool = True  # False: BERT's post-LN blocks with an embedding LayerNorm
    mlm_transform_head: bool = False  # BERT's dense + GELU + LayerNorm before the output
    # width of the token, position and type embeddings (0: model_dim). Below model_dim the embeddings are
    # factorised as ELECTRA-Small and ALBERT do: a dense `embedding_projection` maps them up to model_dim, and
    # the MLM transform head maps the hidden states back down to it for the tied vocabulary projection
    embedding_dim: int = 0
    heads: tuple[str, ...] = ()  # auxiliary heads (pretrain.heads) the objectives' loss terms train
    # the width the 'hidden_projection' head maps hidden states to (TinyBERT's distillation into a teacher of
    # another width, pretrain.distillation; pretrain.distill sets it); 0: the model's own width
    hidden_projection_dim: int = 0
    layer_norm_epsilon: float = 1e-6
    gelu: str = "tanh"  # 'tanh': the tanh approximation (GPT-2's gelu_new); 'exact': the erf form (BERT's gelu)
    # a bias on the vocabulary logits: off, as in GPT-2, so the default pre-LN model exports exactly to
    # GPT2LMHeadModel; BERT has one (True: BertForMaskedLM exports it as cls.predictions.bias)
    output_bias: bool = False
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # 'int8': the inputs of the blocks' weight matmuls quantized per token to int8 at run time (qwix; with int8
    # weights, `pretrain.quantization`'s 'int8' scheme); 'none': float
    activation_quantization: str = "none"
    attention: str = "dense"  # 'dense' (the written-out mask), 'flash' (key ranges, fused kernel), 'auto'
    # the blocks' parameters stacked on a leading 'layers' axis and run by one jax.lax.scan (compile time flat in
    # depth); False: a list of blocks, traced one after another. The same numbers either way (pretrain.layers)
    scan_layers: bool = False
    # ALBERT's cross-layer sharing: one block's parameters, applied num_layers times (`blocks` holds that one
    # block); run in a loop, so scan_layers must be False
    share_layers: bool = False
    # the heads each layer keeps after head pruning (`pretrain.pruning`: the others are removed from its
    # parameters); () = num_heads in every layer. A model of pruned layers runs its blocks in a loop
    heads_per_layer: tuple[int, ...] = ()
    # jax.checkpoint of each block: 'none'; 'full' (nothing saved, the forward pass recomputed in the backward);
    # 'dots' (the weight matmuls' outputs saved, attention scores and the rest recomputed)
    remat: str = "none"

    def __post_init__(self) -> None:
        for name in ("heads", "heads_per_layer"):
            if isinstance(getattr(self, name), (list, tuple)):
                object.__setattr__(self, name, tuple(getattr(self, name)))  # a stored config's JSON list
        raise_problems(config_problems(dataclasses.asdict(self)))

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def layer_heads(self, layer: int) -> int:
        """The attention heads layer `layer` has: num_heads, or what pruning kept of them."""
        return self.heads_per_layer[layer] if self.heads_per_layer else self.num_heads

    @property
    def embedding_width(self) -> int:
        """The width of the embedding tables: `embedding_dim`, or model_dim when it is 0."""
        return self.embedding_dim or self.model_dim

    @property
    def factorised_embedding(self) -> bool:
        """Whether the embeddings are narrower than the stack, with a projection between."""
        return self.embedding_width != self.model_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def config_problems(fields: Mapping[str, Any]) -> list[str]:
    """Every problem of a model shape (`config.model` fields), naming field and fix:
    the one home of these rules (the config checks report them before training,
    `TransformerConfig` enforces them)."""
    problems = []
    for name in ("num_layers", "model_dim", "num_heads", "mlp_dim", "max_positions", "num_token_types"):
        if name in fields and not (isinstance(fields[name], int) and fields[name] >= 1):
            problems.append(f"config.model.{name}={fields[name]!r} must be a positive integer")
    dim, heads = fields.get("model_dim"), fields.get("num_heads")
    if isinstance(dim, int) and isinstance(heads, int) and dim >= 1 and heads >= 1 and dim % heads:
        divisors = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
        problems.append(f"config.model.model_dim={dim} is not divisible by config.model.num_heads={heads}; "
                        f"choose num_heads among {divisors} (or change model_dim)")
    embedding_dim = fields.get("embedding_dim", 0)
    if not (isinstance(embedding_dim, int) and not isinstance(embedding_dim, bool) and embedding_dim >= 0):
        problems.append(f"config.model.embedding_dim={embedding_dim!r} must be 0 (the model width) or a positive "
                        "integer (the width of factorised embeddings)")
    elif embedding_dim and embedding_dim != dim and not fields.get("mlm_transform_head", False):
        problems.append(f"config.model.embedding_dim={embedding_dim} differs from config.model.model_dim={dim}: the "
                        "tied vocabulary projection needs hidden states of the embedding width, which BERT's MLM "
                        "transform head gives; set config.model.mlm_transform_head=True (or embedding_dim=0)")
    projection = fields.get("hidden_projection_dim", 0)
    if not (isinstance(projection, int) and not isinstance(projection, bool) and projection >= 0):
        problems.append(f"config.model.hidden_projection_dim={projection!r} must be 0 (the model's width) or the "
                        "positive width of the teacher the 'hidden_projection' head maps into (pretrain.distill "
                        "sets it)")
    if "dropout_rate" in fields and not 0 <= fields["dropout_rate"] < 1:
        problems.append(f"config.model.dropout_rate={fields['dropout_rate']!r} must lie in [0, 1)")
    if "gelu" in fields and fields["gelu"] not in GELU_FORMS:
        problems.append(f"config.model.gelu={fields['gelu']!r} must be one of {GELU_FORMS} ('tanh': the "
                        "approximation GPT-2 uses; 'exact': the erf form BERT uses)")
    if "output_bias" in fields and not isinstance(fields["output_bias"], bool):
        problems.append(f"config.model.output_bias={fields['output_bias']!r} must be True or False")
    if "scan_layers" in fields and not isinstance(fields["scan_layers"], bool):
        problems.append(f"config.model.scan_layers={fields['scan_layers']!r} must be True (the blocks stacked and "
                        "run by one scan) or False (a list of blocks)")
    if "share_layers" in fields and not isinstance(fields["share_layers"], bool):
        problems.append(f"config.model.share_layers={fields['share_layers']!r} must be True (ALBERT's one block "
                        "applied num_layers times) or False")
    elif fields.get("share_layers") and fields.get("scan_layers"):
        problems.append("config.model.share_layers=True runs its one block num_layers times in a loop; set "
                        "config.model.scan_layers=False (there is no stack of layers to scan)")
    kept = fields.get("heads_per_layer", ())
    if kept:
        layers = fields.get("num_layers")
        if not (isinstance(kept, (list, tuple)) and len(kept) == layers and
                all(isinstance(k, int) and 0 <= k <= (heads or 0) for k in kept)):
            problems.append(f"config.model.heads_per_layer={kept!r} must be () or one count per layer "
                            f"({layers}), each between 0 and config.model.num_heads={heads}")
        elif fields.get("scan_layers") or fields.get("share_layers"):
            problems.append("config.model.heads_per_layer (a pruned model) gives its layers different shapes: set "
                            "config.model.scan_layers=False and share_layers=False")
    if "remat" in fields and fields["remat"] not in REMAT_POLICIES:
        problems.append(f"config.model.remat={fields['remat']!r} must be one of {tuple(REMAT_POLICIES)} ('none': "
                        "keep every activation; 'full': recompute each block in the backward pass; 'dots': keep "
                        "only the weight matmuls' outputs)")
    if "attention" in fields and fields["attention"] not in ATTENTION_CHOICES:
        problems.append(f"config.model.attention={fields['attention']!r} must be one of {ATTENTION_CHOICES} "
                        "('dense': the written-out mask; 'flash': a fused kernel over per-query key ranges; "
                        "'auto': flash on accelerators, dense on CPU)")
    if fields.get("activation_quantization", "none") not in ACTIVATION_QUANTIZATIONS:
        problems.append(f"config.model.activation_quantization={fields['activation_quantization']!r} must be one of "
                        f"{ACTIVATION_QUANTIZATIONS}")
    if "dtype" in fields:
        try:
            jnp.dtype(fields["dtype"])
        except TypeError:
            problems.append(f"config.model.dtype={fields['dtype']!r} is not a JAX dtype (e.g. 'float32', 'bfloat16')")
    if "heads" in fields:
        from pretrain.heads import head_names  # a head imports the loss, which imports this module

        given = fields["heads"]
        if not (isinstance(given, (list, tuple)) and all(isinstance(name, str) for name in given)):
            problems.append(f"config.model.heads={given!r} must be a tuple of head names from {head_names()}")
        else:
            unknown = [name for name in given if name not in head_names()]
            if unknown or len(set(given)) != len(given):
                problems.append(f"config.model.heads={tuple(given)!r}: each head once, among {head_names()}; "
                                "an objective's loss terms add the heads they need")
    return problems


# Size presets. `small` is the benchmark shape of the performance issue; `base`
# and `large` are BERT-base and BERT-large.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, model_dim=64, num_heads=4, mlp_dim=256, max_positions=256),
    "small": dict(num_layers=4, model_dim=256, num_heads=4, mlp_dim=1024, max_positions=512),
    "base": dict(num_layers=12, model_dim=768, num_heads=12, mlp_dim=3072, max_positions=512),
    "large": dict(num_layers=24, model_dim=1024, num_heads=16, mlp_dim=4096, max_positions=512),
}


def preset(size: str, **overrides: Any) -> TransformerConfig:
    """The config of size preset `size` ('tiny', 'small', 'base', 'large') with overrides."""
    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(PRESETS)}")
    return TransformerConfig(**{**PRESETS[size], **overrides})


def preset_name(model_fields: Mapping[str, Any]) -> str:
    """The name of the size preset whose shape `model_fields` (a config's `model`
    section) has, or 'custom' when the shape is its own."""
    for name, shape in PRESETS.items():
        if all(model_fields.get(field) == value for field, value in shape.items()):
            return name
    return "custom"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """Keys and values of every layer for incremental decoding.

    Attributes:
      keys, values: [num_layers, B, T, H, K] for a capacity of T tokens.
      segment_ids, attention_kind: [B, T] of the cached tokens (0 / PREFIX where empty).
      length: int32 scalar, the number of slots written (the same for every row;
        rows with shorter prompts carry segment 0 in their unused slots).
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    attention_kind: jax.Array
    length: jax.Array


def uses_flash(config: TransformerConfig) -> bool:
    """Whether the stack runs the fused kernel: 'flash', or 'auto' off the CPU (on
    CPU the dense path is the faster one; the fused path there is the reference
    tokamax runs in plain XLA). Decided when the step is traced."""
    return config.attention == "flash" or (config.attention == "auto" and jax.default_backend() != "cpu")


def attention_kernel(config: TransformerConfig) -> str:
    """The attention kernel a traced stack of this config ran: 'dense' (the written-out
    mask), else the tokamax kernel the latest trace on this backend chose
    (`pretrain.flash_attention.CHOSEN`), so a run can record what produced its
    numbers and a test what it checked."""
    if not uses_flash(config):
        return "dense"
    from pretrain.flash_attention import CHOSEN

    backend = jax.default_backend()
    if backend not in CHOSEN:
        raise RuntimeError(f"no flash attention has been traced on {backend} yet: ask after the first step")
    return CHOSEN[backend]


def tied_logits(hidden: jax.Array, embedding: jax.Array, bias: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Vocabulary logits [..., V] (float32): hidden states [..., E] times the token
    embedding [V, E] (the output projection is tied to it), plus the output bias."""
    return (hidden @ embedding.astype(dtype).T).astype(jnp.float32) + bias


class MLMTransform(nnx.Module):
    """BERT's MLM transform head (dense, GELU, LayerNorm) over the Transformer's own
    variables (shared, not copied)."""

    def __init__(self, model: Transformer):
        self.config = model.config
        self.head_kernel = model.head_kernel
        self.head_bias = model.head_bias
        self.head_norm = model.head_norm

    def __call__(self, hidden: jax.Array) -> jax.Array:
        dtype = self.config.compute_dtype
        hidden = gelu(self.config, hidden @ self.head_kernel[...].astype(dtype) + self.head_bias[...].astype(dtype))
        return self.head_norm(hidden).astype(dtype)


class OutputHead(nnx.Module):
    """Hidden states -> vocabulary logits: BERT's transform head when the model has
    one (`transform`, else None), then `tied_logits`. It holds the Transformer's
    own variables (shared, not copied), so the loss can take the head's parameters
    apart from the stack's."""

    def __init__(self, model: Transformer):
        self.config = model.config
        self.token_embedding = model.token_embedding
        self.output_bias = model.output_bias if model.config.output_bias else None
        self.transform = MLMTransform(model) if model.config.mlm_transform_head else None

    def bias(self) -> jax.Array:
        """The output bias [V], zeros for a model without one (`config.output_bias`)."""
        if self.output_bias is None:
            return jnp.zeros((self.config.vocab_size,), jnp.float32)
        return self.output_bias[...]

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits [..., V] (float32) from hidden states [..., D]."""
        if self.transform is not None:
            hidden = self.transform(hidden)
        return tied_logits(hidden, self.token_embedding[...], self.bias(), self.config.compute_dtype)


class Transformer(nnx.Module):
    """The shared encoder/decoder stack (see module docstring)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, e = config.model_dim, config.embedding_width
        self.token_embedding = _param(rngs, (config.vocab_size, e), ("vocab", "embed"))
        self.position_embedding = _param(rngs, (config.max_positions, e), (None, "embed"))
        self.type_embedding = _param(rngs, (config.num_token_types, e), (None, "embed"))
        self.embedding_norm = None if config.pre_layer_norm else _layer_norm(config, rngs, e)
        self.embedding_dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
        if config.factorised_embedding:
            self.embedding_projection_kernel = _param(rngs, (e, d), ("embed", "embed_out"))
            self.embedding_projection_bias = _param(rngs, (d,), ("embed",), jax.nn.initializers.zeros)
        self.blocks = make_blocks(config, rngs)  # a list, or one block of stacked layers (config.scan_layers)
        self.final_norm = _layer_norm(config, rngs) if config.pre_layer_norm else None
        if config.mlm_transform_head:
            self.head_kernel = _param(rngs, (d, e), ("embed", "embed_out"))
            self.head_bias = _param(rngs, (e,), ("embed",), jax.nn.initializers.zeros)
            self.head_norm = _layer_norm(config, rngs, e)
        if config.output_bias:
            self.output_bias = _param(rngs, (config.vocab_size,), ("vocab",), jax.nn.initializers.zeros)
        if config.heads:  # absent, not empty, without heads: the parameter tree of such models is unchanged
            from pretrain.heads import build_head  # a head imports the loss, which imports this module

            self.heads = nnx.Dict({name: build_head(name, config, rngs) for name in config.heads})

    # -- the stack -------------------------------------------------------------------

    def embed(self, inputs: jax.Array, positions: jax.Array, token_types: jax.Array,
              *, deterministic: bool) -> jax.Array:
        """x [B, L, D]: token + position + token-type embeddings (`embed_tokens`),
        projected up to the model width where the embeddings are factorised."""
        x = self.embed_tokens(inputs, positions, token_types, deterministic=deterministic)
        if not self.config.factorised_embedding:
            return x
        dtype = self.config.compute_dtype
        return (x @ self.embedding_projection_kernel[...].astype(dtype)
                + self.embedding_projection_bias[...].astype(dtype))

    def embed_tokens(self, inputs: jax.Array, positions: jax.Array, token_types: jax.Array,
                     *, deterministic: bool) -> jax.Array:
        """[B, L, E]: token + position + token-type embeddings, normalised (post-LN) and
        dropped out, at the embedding width: the part a head with a stack of its own
        shares (ELECTRA's generator reads the discriminator's embeddings)."""
        x = (
            jnp.take(self.token_embedding[...], inputs, axis=0)
            + jnp.take(self.position_embedding[...], positions, axis=0)
            + jnp.take(self.type_embedding[...], token_types, axis=0)
        )
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.embedding_dropout(x.astype(self.config.compute_dtype), deterministic=deterministic)

    def _finish(self, x: jax.Array) -> jax.Array:
        return x if self.final_norm is None else self.final_norm(x).astype(x.dtype)

    def __call__(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True) -> jax.Array:
        """Hidden states [B, L, D] of a packed batch (`inputs`, `positions`,
        `token_types`, `segment_ids`, `attention_kind`, each [B, L])."""
        return self._stack(batch, deterministic, keep_layers=False)[-1]

    def layer_outputs(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True) -> list[jax.Array]:
        """The states after the embeddings and after each block, num_layers + 1 of
        [B, L, D]; the last is what `__call__` returns (after the final norm).
        ELMo's scalar mix reads them all (`pretrain.transfer.heads.ScalarMix`)."""
        return self._stack(batch, deterministic, keep_layers=True)

    def mask(self, batch: Mapping[str, jax.Array]) -> jax.Array | KeyRanges:
        """What the blocks attend under for a packed batch (`segment_ids`,
        `attention_kind`): the written-out mask, or the flash kernel's key ranges. A head
        with a stack of its own (ELECTRA's generator) runs its blocks under it too."""
        if uses_flash(self.config):
            return KeyRanges(*key_ranges(batch["segment_ids"], batch["attention_kind"]))
        return attention_mask(batch["segment_ids"], batch["attention_kind"])

    def _stack(self, batch: Mapping[str, jax.Array], deterministic: bool, keep_layers: bool) -> list[jax.Array]:
        mask = self.mask(batch)
        embedded = self.embed(batch["inputs"], batch["positions"], batch["token_types"],
                              deterministic=deterministic)
        x, layers, _ = run_blocks(self.blocks, self.config, embedded, mask, deterministic=deterministic,
                                  keep_layers=keep_layers)
        finished = self._finish(x)
        return [embedded, *layers[:-1], finished] if keep_layers else [finished]

    # -- heads -----------------------------------------------------------------------

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits [..., V] (float32) from hidden states [..., D]."""
        return self.output_head()(hidden)

    def output_head(self) -> OutputHead:
        """The vocabulary head as a module of its own over this model's variables
        (the loss differentiates it apart from the stack)."""
        return OutputHead(self)

    def head(self, name: str) -> nnx.Module:
        """The auxiliary head `name` (`pretrain.heads`), or a message naming the model's heads."""
        if name not in self.config.heads:
            raise ValueError(f"this model has no {name!r} head (it has {list(self.config.heads) or 'none'}); "
                             "the heads come from the objectives' loss terms when a run is configured")
        return self.heads[name]

    # -- incremental decoding ----------------------------------------------------------

    def init_cache(self, batch_size: int, capacity: int) -> DecodeCache:
        """An empty cache for `capacity` tokens per row."""
        c = self.config
        if c.heads_per_layer:
            raise ValueError(f"a pruned model (config.model.heads_per_layer={c.heads_per_layer}) has layers of "
                             "different head counts and no incremental decoding; score it, or decode the unpruned one")
        shape = (c.num_layers, batch_size, capacity, c.num_heads, c.head_dim)
        return DecodeCache(
            keys=jnp.zeros(shape, c.compute_dtype),
            values=jnp.zeros(shape, c.compute_dtype),
            segment_ids=jnp.zeros((batch_size, capacity), jnp.int32),
            attention_kind=jnp.zeros((batch_size, capacity), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    def extend(self, cache: DecodeCache, tokens: Mapping[str, jax.Array]) -> tuple[jax.Array, DecodeCache]:
        """Runs T new tokens per row against the cache and appends them.

        `tokens` holds [B, T] `inputs`, `positions`, `token_types`, `segment_ids`
        and `attention_kind`. The first call (on an empty cache) may hold any
        prompt: a PREFIX source followed by L2R tokens, say. Later calls must add
        L2R tokens only, which is what makes caching exact: no cached token may
        see a later one, and under the attention rule only PREFIX tokens see
        tokens after them, and they never see L2R ones. Returns hidden states
        [B, T, D] and the grown cache.
        """
        start = cache.length
        new_len = tokens["inputs"].shape[1]
        segment_ids = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, tokens["segment_ids"], start, 1)
        kinds = jax.lax.dynamic_update_slice_in_dim(cache.attention_kind, tokens["attention_kind"], start, 1)
        query_slots = start + jnp.arange(new_len)
        key_slots = jnp.arange(segment_ids.shape[1])
        mask = visibility(tokens["segment_ids"], tokens["attention_kind"], query_slots,
                          segment_ids, kinds, key_slots)[:, None]
        x = self.embed(tokens["inputs"], tokens["positions"], tokens["token_types"], deterministic=True)
        x, _, (keys, values) = run_blocks(self.blocks, self.config, x, mask, deterministic=True,
                                          cache=(cache.keys, cache.values, start))
        new_cache = DecodeCache(keys, values, segment_ids, kinds, start + new_len)
        return self._finish(x), new_cache


def create_model(config: TransformerConfig, seed: int = 0) -> Transformer:
    """A freshly initialised Transformer (parameters from `seed`)."""
    return Transformer(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def parameter_count(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


EMBEDDING_PARAMETERS = ("token_embedding", "position_embedding", "type_embedding")


def non_embedding_parameter_count(model: Transformer) -> int:
    """Trainable parameters outside the embedding tables: the N of MFU's 6N
    FLOPs per token (PaLM appendix B; `pretrain.metrics.flops_per_token`)."""
    return parameter_count(model) - sum(getattr(model, name).size for name in EMBEDDING_PARAMETERS)
