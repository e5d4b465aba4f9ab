"""Pretraining config: `--config=configs/pretrain.py:objective=mlm,size=small`.

Variants (comma-separated `key=value` in the argument):
  objective  an objective spec: 'mlm', 'clm', 'mass', 'unilm', or a mixture such as
             'mlm:1,clm:1' (see objectives.parse_mixture_spec).
  size       model preset the `config.model` fields start from: tiny, small, base,
             large. It is a variant, not a field: `--config.model.num_layers=...`
             and the other `config.model` fields change the shape after it.
  data       corpus: 'pydocs' (built in, the default), 'files' (set --config.data.path)
             or 'tfds' (set --config.data.tfds_name).
  platform   'cpu' (the default: float32, the dense attention path) or
             'accelerator' (GPU/TPU: bfloat16 compute with float32 parameters,
             optimizer state, softmax statistics and loss; attention 'auto', the
             fused kernel wherever the objectives' layout allows it).

Every objective's settings live under `config.objectives.<name>` with the
paper defaults, so any number can be overridden from the command line
(`--config.objectives.mlm.mask_rate=0.2`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

import objectives
from pretrain.model import PRESETS, TransformerConfig

DEFAULT_VARIANTS = {"objective": "mlm", "size": "small", "data": "pydocs", "platform": "cpu"}
DATA_KINDS = ("pydocs", "files", "tfds")
PLATFORMS = {"cpu": {}, "accelerator": {"dtype": "bfloat16", "attention": "auto"}}  # config.model fields each sets


def parse_variants(arg: str | None) -> dict[str, str]:
    """'objective=mlm,size=tiny' -> {'objective': 'mlm', 'size': 'tiny'}; mixture
    specs keep their own commas ('objective=mlm:1,clm:1,size=tiny')."""
    variants = dict(DEFAULT_VARIANTS)
    key = None
    for part in filter(None, (arg or "").split(",")):
        name, sep, value = part.partition("=")
        if sep:
            key = name.strip()
            if key not in DEFAULT_VARIANTS:
                raise ValueError(
                    f"unknown config variant {key!r} in {arg!r}; variants: {', '.join(DEFAULT_VARIANTS)}")
            variants[key] = value.strip()
        elif key == "objective":
            variants[key] += "," + part.strip()
        else:
            raise ValueError(f"config variant {part!r} in {arg!r} is not of the form key=value")
    return variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = parse_variants(arg)
    if variants["size"] not in PRESETS:
        raise ValueError(f"unknown size {variants['size']!r}; choose one of {', '.join(PRESETS)}")
    if variants["data"] not in DATA_KINDS:
        raise ValueError(f"unknown data {variants['data']!r}; choose one of {', '.join(DATA_KINDS)}")
    if variants["platform"] not in PLATFORMS:
        raise ValueError(f"unknown platform {variants['platform']!r}; choose one of {', '.join(PLATFORMS)}")
    config = ml_collections.ConfigDict()
    config.objective = variants["objective"]  # objective spec: name, or 'name:rate,...' mixture
    config.objectives = ml_collections.ConfigDict(  # settings of every registered objective
        {name: objectives.default_settings(name) for name in objectives.registered_names()})
    model_defaults = dataclasses.asdict(TransformerConfig(**PRESETS[variants["size"]], **PLATFORMS[variants["platform"]]))
    del model_defaults["vocab_size"]  # always the tokenizer's (config.tokenizer.vocab_size)
    config.model = ml_collections.ConfigDict(model_defaults)  # TransformerConfig fields, from the `size` variant
    config.seq_len = 128  # tokens per packed row
    config.batch_size = 32  # global batch, in packed rows, across all hosts
    config.seed = 0  # parameter initialisation and example sampling
    config.init = ml_collections.ConfigDict()  # where the parameters start (empty: random, from config.seed)
    # a local Hugging Face BertForMaskedLM / BertForPreTraining / GPT2LMHeadModel directory: the run starts from
    # its weights, takes its shape (config.model) and its own tokenizer (tokenizer.json); README, Interop
    config.init.hf = ""

    config.total_steps = 1000  # optimizer steps
    config.accumulation_steps = 1  # micro-batches per step (batch_size must divide by it)
    config.parallelism = "pjit"  # 'pjit' (jax.jit over the mesh) or 'pmap'
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # pjit mesh; data=-1: the rest
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,  # peak learning rate
        warmup_steps=100,  # linear warmup from 0
        schedule="cosine",  # 'cosine', 'linear' or 'constant' after warmup
        end_factor=0.0,  # final learning rate / peak
        b1=0.9, b2=0.999, eps=1e-8,  # Adam
        weight_decay=0.01,  # decoupled; not on LayerNorm scales and biases
        clip_norm=1.0,  # global gradient-norm clipping (0: off)
    ))
    config.log_every = 10  # steps between metric lines
    config.eval_every = 200  # steps between held-out evaluations (0: only at the end)
    config.checkpoint_every = 200  # steps between checkpoints (and one at the end)
    config.keep_checkpoints = 3  # newest checkpoints kept
    config.peak_flops_per_device = 0.0  # MFU denominator; 0: known table or measured
    config.nonfinite = "stop"  # NaN/inf loss or gradients: 'stop' the run, or 'skip' the step (update not applied)
    config.max_consecutive_skips = 10  # nonfinite='skip': stop once this many steps in a row were skipped
    # multi-process: a process that shows no sign of life for this long is lost; the others name it and exit
    # (code 75) instead of waiting in a collective forever; 0: leave it to JAX's own heartbeat (100 s, then an abort)
    config.peer_timeout_seconds = 60.0
    config.sample_at_end = True  # at the end, print one line of what the model does (a continuation or a fill)
    # what a distilled run learned from (its teacher and the loss weights): set by pretrain.distill and recorded in
    # config.json; empty for a run trained by pretrain.train
    config.distill = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.kind = variants["data"]  # 'pydocs' (built in, no download), 'files' or 'tfds'
    config.data.path = ""  # files: a .txt/.jsonl file, directory or glob
    config.data.text_field = "text"  # files: the .jsonl field; tfds: the text feature
    config.data.tfds_name = ""  # tfds: dataset name, e.g. 'c4/en' or 'wikipedia/20230601.en'
    config.data.tfds_data_dir = ""  # tfds: where the prepared ArrayRecord data lives
    config.data.tfds_train_split = "train"  # tfds: split (or slice) used for training
    config.data.tfds_heldout_split = "validation"  # tfds: split (or slice) held out
    config.data.heldout_fraction = 0.02  # pydocs/files: documents held out, by text hash
    config.data.packing = "best_fit"  # 'best_fit' or 'first_fit'
    config.data.open_rows = 16  # rows the streaming packer keeps open
    config.data.num_threads = 2  # threads making examples (0: the thread reading batches makes them)
    # virtual shards of the document stream, each packed on its own (batch_size must divide by it); a host reads,
    # tokenizes and packs only the shards of its rows (shards/hosts of them), so make it a multiple of the most
    # hosts the run will use (e.g. 256). It fixes the batches: a run resumes on any host count, not another value
    config.data.shards = 1

    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.vocab_size = 8000  # SentencePiece vocabulary (>= 264 with byte fallback)
    config.tokenizer.model_type = "unigram"  # 'unigram' or 'bpe'
    config.tokenizer.model_path = ""  # a user .model to use instead of training one
    config.tokenizer.sample_documents = 20000  # training documents the tokenizer learns from
    config.tokenizer.sentinels = 100  # T5's sentinel tokens [S0].. reserved (span corruption, UL2); 0: none
    return config
