"""Fine-tuning config: `--config=configs/finetune.py:task=pydocs_topic,method=full`.

    python -m pretrain.finetune --config=configs/finetune.py:task=pydocs_topic,method=full \
        --config.init=runs/mlm --workdir=runs/mlm-topic

Variants (comma-separated `key=value`):
  task    pydocs_topic, pydocs_sentence_topic, pydocs_same_module, pydocs_code_spans,
          pydocs_qa (built in), files (set
          --config.task_path) or tfds (set --config.task_tfds_name, e.g. glue/sst2).
  method  full, probe, discriminative, stlr, gradual_unfreezing, aux_lm, or several
          joined by '+' (ULMFiT: discriminative+stlr+gradual_unfreezing).

Every number of every method is a field under `config.methods.<name>`, read only
when `config.method` names that method.
"""

from __future__ import annotations

import ml_collections

from configs import variants as variants_lib

DEFAULT_VARIANTS = {"task": "pydocs_topic", "method": "full"}


def parse_variants(arg: str | None) -> dict[str, str]:
    """'task=files,method=probe' -> {'task': 'files', 'method': 'probe'}."""
    return variants_lib.parse(arg, DEFAULT_VARIANTS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = parse_variants(arg)
    config = ml_collections.ConfigDict()
    # What is fine-tuned.
    config.init = ""  # pretraining run directories, comma-separated (several: fusion); '' = random initialisation
    config.shape_from = ""  # init='': the run whose model shape and tokenizer a randomly initialised body takes
    config.layout = "auto"  # 'bidirectional', 'causal', or 'auto': a body's own (causal if pretrained all L2R)
    config.pooling = "auto"  # 'first' (BERT), 'last' (GPT), 'mean', 'concat' (ULMFiT), or 'auto' (mean: see README)
    config.fusion = "gate"  # several bodies: 'concat' their pooled features, or mix them by a learned 'gate'
    config.packed = True  # several task examples per row (the mask keeps them apart); False: one per row

    # The task (pretrain/transfer/tasks.py).
    config.task = variants["task"]
    config.task_path = ""  # task='files': a directory with train/dev/test .jsonl or .tsv files
    config.task_kind = "auto"  # task='files': 'auto' (the rows tell) or a kind of pretrain/transfer/kinds/ (pair, ...)
    config.task_metric = ""  # the dev metric that selects the step; '' = the task's own (accuracy, span_f1, ...)
    config.task_tfds_name = ""  # task='tfds': e.g. 'glue/sst2', prepared as ArrayRecord
    config.task_tfds_data_dir = ""  # task='tfds': where it was prepared
    config.task_min_words = 5  # built-in tasks: shortest docstring or sentence kept, in words
    config.task_min_examples = 30  # pydocs_topic: packages with fewer docstrings are left out
    config.task_max_examples = 0  # > 0: built-in tasks keep N evenly spaced examples of each split (quick runs)
    config.dev_fraction = 0.1  # built-in and TFDS tasks: the dev share of the non-test examples, by hash
    config.test_fraction = 0.1  # built-in tasks when the body did not pretrain on pydocs: the held-out share

    # How (pretrain/transfer/methods.py).
    config.method = variants["method"]
    config.methods = ml_collections.ConfigDict(dict(
        probe=dict(scalar_mix=False),  # ELMo's learned mix of all layers instead of the last
        discriminative=dict(decay=1 / 2.6, head_gap=0),  # lr * decay**depth; ULMFiT 1/2.6, ELECTRA 0.8 (head_gap=1)
        stlr=dict(cut_frac=0.1, ratio=32.0),  # ULMFiT's slanted triangular schedule
        gradual_unfreezing=dict(every_steps=0),  # one more layer group every N steps; 0: evenly over the run
        aux_lm=dict(objective="", start=0.2, end=0.1, decay_steps=0),  # SiATL; objective '' = the body's own
    ))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-4,  # peak
        warmup_fraction=0.1,  # BERT: linear warmup over the first 10% of the steps, then linear decay
        weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-6,
    ))
    # Compression while fine-tuning (pretrain.quantization, pretrain.distillation).
    config.quantize = "none"  # quantization-aware fine-tuning: 'int8_weights', or 'int8' (weights and matmul inputs)
    config.distill_from = ""  # a fine-tuning run (its workdir, or a seed_<s> in it): its logits are soft targets
    # DistilBERT's task-time defaults (its code's run_squad_w_distillation.py: alpha_ce 0.5, alpha_squad 0.5, T 2)
    config.distill = ml_collections.ConfigDict(dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5))
    config.seeds = (0, 1, 2)  # one full fine-tuning run per seed; tables report mean ± std
    config.seed = 0  # the seed of one run (set per run from `seeds`)

    # The loop (the pretraining trainer's fields).
    config.total_steps = 300  # used when epochs = 0
    config.epochs = 0.0  # > 0: total_steps = epochs passes over the training split (packed batches), at least min_steps
    config.min_steps = 0  # with epochs: the fewest steps of a run (few labels still train long enough to converge)
    config.evaluations = 0  # > 0: dev and test scored this many times, evenly, instead of every eval_every steps
    config.batch_size = 32  # packed rows per step
    config.seq_len = 128
    config.accumulation_steps = 1
    config.log_every = 10
    config.eval_every = 50  # dev and test scores every N steps and at the end; dev picks the step
    config.checkpoint_every = 100
    config.keep_checkpoints = 1
    config.parallelism = "pjit"
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.nonfinite = "stop"
    config.max_consecutive_skips = 10
    config.peak_flops_per_device = 0.0
    config.peer_timeout_seconds = 60.0  # multi-process: a process silent this long is lost (pretrain/peers.py)
    config.sample_at_end = False  # not used by fine-tuning (the trainer's field)
    return config
