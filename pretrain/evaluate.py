"""The cross-objective matrix: one checkpoint scored under every objective.

    python -m pretrain.evaluate --workdir=runs/mlm [--seq_len=128] [--max_documents=0] [--quantize=int8_weights]

Whatever a model was trained with, it is scored on the held-out split under every
leaf of every registered objective (`mlm`, `clm`, `mass`, and UniLM's four modes),
each with its paper-default settings: loss, accuracy and perplexity (exp of the
loss) at the positions that objective weights (or, for an objective scored by a loss
term, `Objective.held_out_term`, that term's: ELECTRA's replaced-token detection over
every token, for models that have its heads). MLM's perplexity is over masked
tokens, CLM's is left-to-right next-token perplexity, `unilm/right_to_left` the
cloze loss from right context only.

The held-out examples are a pure function of (data config, tokenizer, seq_len,
seed): `pretrain.data.evaluation_batches` with a fixed seed over each objective
alone, so every model of the same tokenizer and data sees the very same batches
(their fingerprint is in the JSON), and a rerun gives the same numbers. The
matrix goes to `workdir/evaluation.json` and is printed as a table. `--quantize` scores
the model as int8 inference runs it (`pretrain.quantization`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx

import objectives
from pretrain import cli, data
from pretrain.inference import TrainedModel, load_trained
from pretrain.input_pipeline import source_from_config
from pretrain.model import Transformer
from pretrain.tokenizer import Tokenizer
from pretrain.train_step import make_eval_step

EVAL_SEED = 0  # the held-out examples' seed: fixed, so models are scored on the same batches
RESULT_FILENAME = "evaluation.json"


def evaluation_objectives(vocab: objectives.Vocabulary, names: Sequence[str] | None = None,
                          skipped: dict[str, str] | None = None) -> list[objectives.Objective]:
    """Every leaf of the named (default: all registered) objectives, default settings.

    Each leaf is renumbered to objective id 0, since it is evaluated alone. By default
    an objective this vocabulary cannot serve (a sentinel objective with a tokenizer
    trained without sentinels) is left out and its reason put in `skipped`; named
    explicitly, it is an error.
    """
    explicit = names is not None and len(names) > 0
    leaves = []
    for name in tuple(names or objectives.registered_names()):
        try:
            built = objectives.build_mixture(name, vocab).objectives
        except ValueError as error:
            if explicit or "unknown objective" in str(error):
                raise
            if skipped is not None:
                skipped[name] = str(error)
            continue
        for leaf in built:
            leaf = copy.copy(leaf)
            leaf.objective_id = 0
            leaves.append(leaf)
    return leaves


def heldout_batches(documents: Sequence[Any], tokenize: Callable[[str], np.ndarray], leaf: objectives.Objective,
                    *, seq_len: int, batch_size: int, seed: int = EVAL_SEED) -> list[dict[str, np.ndarray]]:
    """The fixed held-out batches of one objective: every document once."""
    return data.evaluation_batches(documents, tokenize, objectives.Mixture([(leaf, 1.0)]), seq_len=seq_len,
                                   global_batch_size=batch_size, seed=seed)


def fingerprint(batches: Sequence[dict[str, np.ndarray]]) -> str:
    """A short hash of the batches' contents (equal hashes: the same held-out set)."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(batch[name]).tobytes())
    return digest.hexdigest()[:16]


def unscorable(model: Transformer, leaf: objectives.Objective) -> str | None:
    """Why `model` cannot be scored under `leaf` (its held-out score is a loss term whose
    heads the model lacks), or None."""
    if leaf.held_out_term is None:
        return None
    missing = [term.head for term in leaf.loss_terms if term.head not in model.config.heads]
    if missing:
        return (f"{leaf.name!r} is scored by its {leaf.held_out_term!r} loss term, through heads "
                f"{', '.join(missing)} that this model does not have (only a model trained with it does)")
    return None


class Scorer:
    """Loss, accuracy and perplexity of one model over batches: the training loss's
    evaluation step (`pretrain.train_step.make_eval_step`), compiled once per shape and
    set of loss terms."""

    def __init__(self, model: Transformer):
        self._graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        self._steps: dict[tuple, Callable] = {}

    def __call__(self, batches: Sequence[dict[str, np.ndarray]], leaf: objectives.Objective | None = None
                 ) -> dict[str, float]:
        """Metrics over the weighted targets of `batches`, or over the positions of the
        leaf's `held_out_term` where it names one (sums in float64 on the host)."""
        terms = leaf.loss_terms if leaf is not None and leaf.held_out_term is not None else ()
        if terms not in self._steps:
            self._steps[terms] = jax.jit(make_eval_step(self._graphdef, self._rest, num_objectives=1, terms=terms))
        loss = correct = weight = 0.0
        for batch in batches:
            stats = jax.device_get(self._steps[terms](self._params, batch))
            if terms:
                stats = {name: np.asarray([value]) for name, value in stats["terms"][leaf.held_out_term].items()}
            loss += float(stats["loss_sum"][0])
            correct += float(stats["correct_sum"][0])
            weight += float(stats["weight_sum"][0])
        mean = loss / max(weight, 1.0)
        return {"loss": mean, "accuracy": correct / max(weight, 1.0),
                "perplexity": math.exp(min(mean, 700.0)), "targets": int(weight)}


def evaluate_model(model: Transformer, tokenizer: Tokenizer, data_config: Any, *, seq_len: int,
                   batch_size: int = 16, seed: int = EVAL_SEED, max_documents: int = 0,
                   objective_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The matrix row of one model: {'heldout': what was scored, 'objectives': {leaf: metrics}}.

    `data_config` is a run config's `data` section (the held-out split is the
    source's); `max_documents` > 0 scores only the first documents of the split.
    """
    documents = source_from_config(data_config).split("heldout")
    count = len(documents) if max_documents <= 0 else min(max_documents, len(documents))
    if count == 0:
        raise ValueError("the held-out split has no documents; raise config.data.heldout_fraction (or give "
                         "config.data.tfds_heldout_split)")
    if seq_len > model.config.max_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_positions={model.config.max_positions}; "
                         "evaluate with a shorter --seq_len")
    documents = [documents[index] for index in range(count)]
    encode = functools.lru_cache(maxsize=None)(tokenizer.encode)  # each sentence once, for every objective
    scorer, results, prints, skipped = Scorer(model), {}, {}, {}
    for leaf in evaluation_objectives(tokenizer.vocabulary(), objective_names, skipped):
        batches = heldout_batches(documents, encode, leaf, seq_len=seq_len, batch_size=batch_size, seed=seed)
        prints[leaf.name] = fingerprint(batches)  # of every leaf, scored or not: one held-out set for every model
        if unscorable(model, leaf):
            skipped[leaf.name] = unscorable(model, leaf)
        else:
            results[leaf.name] = scorer(batches, leaf)
    heldout = {"documents": count, "seq_len": seq_len, "seed": seed, "batch_size": batch_size,
               "fingerprint": fingerprint_of(prints)}
    return {"heldout": heldout, "objectives": results, **({"skipped": skipped} if skipped else {})}


def fingerprint_of(parts: dict[str, str]) -> str:
    """One hash of several named fingerprints."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_run(workdir: str, *, seq_len: int = 0, batch_size: int = 16, seed: int = EVAL_SEED,
                 max_documents: int = 0, objective_names: Sequence[str] | None = None,
                 data_config: Any = None, trained: TrainedModel | None = None,
                 quantization: str = "") -> dict[str, Any]:
    """Scores the newest checkpoint of run `workdir` on the held-out split of
    `data_config` (default: the run's own data; seq_len 0: the run's own), as float32 or
    quantized as `quantization` says ('int8_weights', 'int8': `pretrain.quantization`)."""
    trained = trained or load_trained(workdir)
    model = trained.model
    if quantization:
        from pretrain.quantization import quantized_model

        model = quantized_model(model, quantization)
    result = evaluate_model(model, trained.tokenizer, data_config or trained.config.data,
                            seq_len=seq_len or trained.config.seq_len, batch_size=batch_size, seed=seed,
                            max_documents=max_documents, objective_names=objective_names)
    return {"workdir": os.path.abspath(workdir), "step": trained.step, "trained_objective": trained.config.objective,
            "parameters": trained.parameters, "tokens_seen": trained.tokens_seen,
            "quantization": quantization or "none", **result}


def format_table(result: dict[str, Any]) -> str:
    """The per-objective metrics of one evaluation as an aligned text table."""
    rows = [("objective", "loss", "accuracy", "perplexity", "targets")]
    for name, metrics in result["objectives"].items():
        rows.append((name, f"{metrics['loss']:.4f}", f"{metrics['accuracy']:.4f}",
                     f"{metrics['perplexity']:.2f}", f"{metrics['targets']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def write_json(result: dict[str, Any], path: str) -> None:
    """Writes `result` atomically as indented JSON."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.evaluate`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "a training run's directory (pretrain.train --workdir)",
                                  flag_values=flag_values)
    seq_len = flags.DEFINE_integer("seq_len", 0, "held-out row length; 0: the run's config.seq_len",
                                   flag_values=flag_values)
    batch_size = flags.DEFINE_integer("batch_size", 16, "rows per evaluation batch (does not change the numbers)",
                                      flag_values=flag_values)
    seed = flags.DEFINE_integer("seed", EVAL_SEED, "seed of the held-out examples; keep it fixed to compare models",
                                flag_values=flag_values)
    max_documents = flags.DEFINE_integer("max_documents", 0, "score only the first N held-out documents (0: all)",
                                         flag_values=flag_values)
    names = flags.DEFINE_list("objectives", [], "registered objectives to score (default: all)",
                              flag_values=flag_values)
    output = flags.DEFINE_string("output", "", f"JSON path; default workdir/{RESULT_FILENAME}",
                                 flag_values=flag_values)
    quantize = flags.DEFINE_enum("quantize", "none", ["none", "int8_weights", "int8"], "score the model int8-"
                                 "quantized: weights only, or weights and matmul inputs (pretrain.quantization)",
                                 flag_values=flag_values)
    cli.parse(flag_values, argv, __doc__)

    def command() -> str:
        """Evaluates the run, writes the JSON; returns the printed report."""
        if not workdir.value:
            raise ValueError("--workdir is required: the directory of a training run, e.g. --workdir=runs/mlm")
        result = evaluate_run(workdir.value, seq_len=seq_len.value, batch_size=batch_size.value, seed=seed.value,
                              max_documents=max_documents.value, objective_names=names.value or None,
                              quantization="" if quantize.value == "none" else quantize.value)
        path = output.value or os.path.join(workdir.value, RESULT_FILENAME)
        write_json(result, path)
        heldout = result["heldout"]
        return (f"{result['workdir']} at step {result['step']} (trained on {result['trained_objective']}"
                + (f"; quantized {result['quantization']}" if result["quantization"] != "none" else "") + "); "
                f"held-out: {heldout['documents']} documents, seq_len {heldout['seq_len']}, fingerprint "
                f"{heldout['fingerprint']}\n{format_table(result)}\n"
                + "".join(f"not scored: {name}: {why}\n" for name, why in result.get("skipped", {}).items())
                + f"wrote {path}")

    print(cli.run_reporting_bad_input(command))


if __name__ == "__main__":
    main()
