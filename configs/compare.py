"""Objective comparison: `--config=configs/compare.py:preset=objectives,size=tiny` (steps from the token budget).

    python -m pretrain.compare --config=configs/compare.py --workdir=runs/compare

Every run trains the same model on the same data for the same number of steps and
packed tokens (`config.budget`, a whole `configs/pretrain.py` config); a run only
names its objective (or mixture) and, optionally, overrides of budget fields.
Variants (comma-separated `key=value`):
  preset  which runs: 'objectives' (mlm, clm, mass, unilm), 'mixtures' (mlm, clm
          and their 1:1 mixture), 't5' (T5's objective study, Raffel et al. 2020
          tables 4-5, in one stack: mlm, mass, span_corruption, prefix_lm, clm),
          'literature' (mlm, span_corruption, prefix_lm, clm: the directions the
          literature agrees on, checked by benchmarks/literature.py),
          'ul2' (UL2's comparison, Tay et al. 2022: ul2 against span_corruption and
          clm), 'extended' (the 'objectives' runs and ELECTRA), 'electra' (ELECTRA's
          small-compute comparison, Clark et al. 2020 table 1: electra against mlm and
          clm), 'mass_span' (MASS at span fractions 0.3 / 0.5 / 0.7), 'mlm_rate'
          (MLM at masking rates 0.1 / 0.15 / 0.3) or 'compression' (MLM, and MLM
          distilled, int8-quantized and head-pruned: `config.compression`).
  size    model preset of the budget: tiny, small, base, large.
  steps   optimizer steps of every run; by default derived from
          `config.budget_tokens_per_parameter` (Chinchilla's 20 tokens per
          parameter), so every size gets a compute-optimal budget.

Any field is a flag: `--config.budget.batch_size=32`, `--config.runs.mlm.objective=...`,
`--config.sweep.grid='(0.2,0.4)'`.
"""

from __future__ import annotations

import ml_collections

from configs import finetune, pretrain
from configs import variants as variants_lib

DEFAULT_VARIANTS = {"preset": "objectives", "size": "tiny", "steps": ""}
# preset -> the downstream tasks it fine-tunes on by default
# (document- and short-text topic classification: pydocs_code_spans, a tagging task, is
# lexical enough that a body trained from scratch on it matches a pretrained one at this
# size, measured in the README, so it is not a default; --config.downstream.tasks adds it)
TOPICS = "pydocs_topic,pydocs_sentence_topic"
DOWNSTREAM_TASKS = {"objectives": TOPICS, "literature": TOPICS, "mixtures": "pydocs_topic", "t5": TOPICS, "ul2": TOPICS,
                    "extended": TOPICS, "electra": TOPICS, "mass_span": "", "mlm_rate": "", "compression": TOPICS}

# preset -> (runs: name -> objective spec, sweep: (run, budget field, values) or None)
PRESETS = {
    "objectives": ({"mlm": "mlm", "clm": "clm", "mass": "mass", "unilm": "unilm"}, None),
    "literature": ({"mlm": "mlm", "span_corruption": "span_corruption", "prefix_lm": "prefix_lm", "clm": "clm"},
                   None),
    "mixtures": ({"mlm": "mlm", "clm": "clm", "mlm+clm": "mlm:1,clm:1"}, None),
    "t5": ({"mlm": "mlm", "mass": "mass", "span_corruption": "span_corruption", "prefix_lm": "prefix_lm",
            "clm": "clm"}, None),
    "ul2": ({"ul2": "ul2", "span_corruption": "span_corruption", "clm": "clm"}, None),
    "extended": ({"mlm": "mlm", "clm": "clm", "mass": "mass", "unilm": "unilm", "electra": "electra"}, None),
    "electra": ({"mlm": "mlm", "clm": "clm", "electra": "electra"}, None),
    "mass_span": ({"mass": "mass"}, ("mass", "objectives.mass.span_fraction", (0.3, 0.5, 0.7))),
    "mlm_rate": ({"mlm": "mlm"}, ("mlm", "objectives.mlm.mask_rate", (0.1, 0.15, 0.3))),
    "compression": ({"mlm": "mlm"}, None),
}
# preset -> the compression techniques it reports (config.compression.techniques)
COMPRESSION = {"compression": "distil,int8_weights,int8,prune"}


def parse_variants(arg: str | None) -> dict[str, str]:
    """'preset=objectives,steps=300' -> {'preset': 'objectives', 'size': 'tiny', 'steps': '300'}."""
    variants = variants_lib.parse(arg, DEFAULT_VARIANTS)
    if variants["preset"] not in PRESETS:
        raise ValueError(f"unknown comparison preset {variants['preset']!r}; choose one of {', '.join(PRESETS)}")
    return variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = parse_variants(arg)
    steps = int(variants["steps"] or 0)  # 0: derived from budget_tokens_per_parameter (pretrain.compare)
    runs, sweep = PRESETS[variants["preset"]]

    budget = pretrain.get_config(f"objective=mlm,size={variants['size']}")  # `objective` is set per run
    budget.seq_len = 128  # tokens per packed row
    budget.batch_size = 16  # packed rows per step
    budget.total_steps = steps  # optimizer steps of every run (0: from the token budget)
    budget.optimizer.warmup_steps = max(1, steps // 10) if steps else 0  # 0: a tenth of the steps
    budget.optimizer.learning_rate = 3e-3 if variants["size"] == "tiny" else 1e-3  # tiny models take a higher peak
    budget.log_every = 10  # points of the training-loss curves
    budget.eval_every = 0  # held-out evaluation only at the end (the matrix is the comparison)
    budget.checkpoint_every = max(1, steps // 3) if steps else 0  # 0: a third of the steps; resumes from here
    budget.keep_checkpoints = 1
    budget.tokenizer.vocab_size = 4000  # shared by every run (trained once into the workdir)
    budget.data.heldout_fraction = 0.1  # the pydocs held-out split is also the built-in tasks' test split

    config = ml_collections.ConfigDict()
    config.budget = budget  # everything the runs share: model, data, tokenizer, optimizer, steps, batch
    config.budget_tokens = 0  # > 0: total_steps = ceil(budget_tokens / (batch_size * seq_len)) instead
    # budget.total_steps = 0 and budget_tokens = 0: the steps that give each run this many
    # training tokens per model parameter (Hoffmann et al. 2022: about 20 is compute-optimal;
    # far below it an MLM body is still on its plateau, a worse start than random weights).
    config.budget_tokens_per_parameter = 20.0
    config.runs = ml_collections.ConfigDict({  # run name -> objective spec and budget overrides
        name: ml_collections.ConfigDict({"objective": spec, "overrides": ml_collections.ConfigDict()})
        for name, spec in runs.items()})
    config.sweep = ml_collections.ConfigDict()  # one budget field swept for one run (T5-style tables)
    config.sweep.run = sweep[0] if sweep else ""  # the run it replaces with one run per value
    config.sweep.field = sweep[1] if sweep else ""  # dotted budget field, e.g. 'objectives.mass.span_fraction'
    config.sweep.grid = sweep[2] if sweep else ()  # the values
    config.evaluation = ml_collections.ConfigDict()  # the held-out matrix (pretrain.evaluate)
    config.evaluation.objectives = ""  # comma-separated registered objectives; '' = the trained ones; 'all'
    config.evaluation.seed = 0  # fixed: every run is scored on the same held-out batches
    config.evaluation.batch_size = 16  # rows per evaluation batch
    config.evaluation.max_documents = 0  # 0: every held-out document
    config.pretrain_seeds = (0,)  # several: every run pretrained once per seed, the matrix shows mean ± std

    # Downstream (pretrain/transfer/comparison.py): every run, a random-init control and
    # an optional fusion, fine-tuned on every task with every method, once per seed.
    config.downstream = ml_collections.ConfigDict()
    config.downstream.tasks = DOWNSTREAM_TASKS[variants["preset"]]  # comma-separated tasks; '' = no downstream phase
    config.downstream.methods = "full,probe"  # comma-separated methods (each may join several with '+'); fusion: probe
    config.downstream.seeds = (0, 1, 2)  # fine-tuning seeds per cell: mean ± std
    config.downstream.control = True  # add the random-init control row (same shape and tokenizer)
    # the control's layout: a Transformer encoder trained from scratch reads its examples
    # bidirectionally (the strongest from-scratch baseline); 'auto': the first run's layout
    config.downstream.control_layout = "bidirectional"
    config.downstream.fusion = "mlm,clm" if variants["preset"] in ("objectives", "extended") else ""  # runs fused into one row
    # (probe: a gate and head over frozen bodies; full: the bodies fine-tuned jointly with them)
    # BERT's protocol (appendix A.3): seed 0 at every rate, the dev-best rate for the other
    # seeds, per cell (the control included); pretrain/transfer/comparison.py
    config.downstream.learning_rates = (1e-3, 3e-3, 1e-2) if variants["size"] == "tiny" else (3e-5, 1e-4, 3e-4)
    # methods that freeze the bodies (probe) train a linear head alone: a grid ten times higher
    config.downstream.frozen_learning_rates = tuple(10 * rate for rate in config.downstream.learning_rates)
    # nested, stratified subsets of each task's training split: pretraining's value is in few labels
    config.downstream.label_fractions = (0.05, 1.0)
    config.downstream.subset_seed = 0  # orders the examples each fraction keeps
    tune = finetune.get_config()  # the fine-tuning budget every cell shares (task, method, init are set per cell)
    tune.batch_size = 16  # packed rows of 128 tokens: about 64 examples per step
    tune.epochs = 2.0  # passes over the cell's training split (BERT fine-tunes 2-4) ...
    tune.min_steps = 50  # ... but at least this many steps (a few labels still get a converged run)
    tune.evaluations = 8  # dev scored 8 times over the run; it selects the step whose test score is reported
    tune.optimizer.learning_rate = config.downstream.learning_rates[1]  # pretrain.finetune's; the grid overrides it
    # a probe reads ELMo's learned mix of every layer (Peters et al. 2018; Tenney et al.
    # 2019), not the top layer alone, which an objective specialises for its own predictions
    tune.methods.probe.scalar_mix = True
    config.downstream.finetune = tune

    # Compression (pretrain/transfer/compression.py): every pretrained row also reported compressed, on the
    # downstream cells above, with its parameters, bytes on disk, inference tokens/s and retained score.
    config.compression = ml_collections.ConfigDict()
    # comma-separated: distil, int8_weights, int8, prune ('' = none)
    config.compression.techniques = COMPRESSION.get(variants["preset"], "")
    config.compression.distill_layers = 0  # the distilled student's layers (0: half the run's, at least 1)
    config.compression.distill_steps = 0  # its steps (0: the budget's, the tokens its teacher saw)
    config.compression.prune_fraction = 0.5  # the share of attention heads pruning removes ...
    config.compression.prune_step_fraction = 0.1  # ... this share of all heads per step (Michel et al.: 10%)
    config.compression.importance_batches = 16  # training batches the importances sum over (4: too noisy, README)
    config.compression.speed_repeats = 5  # forward passes timed for each variant's inference tokens/s
    return config
