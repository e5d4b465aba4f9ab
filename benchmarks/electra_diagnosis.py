"""Why an ELECTRA body transfers as it does: what its discriminator learned, and what its
representations look like next to the other runs of the same comparison.

    python benchmarks/electra_diagnosis.py --workdir=runs/electra [--documents=40]

`--workdir` is a `pretrain.compare` workdir holding an `electra` run (the `electra` or
`extended` preset). On the first held-out documents it prints:

- the discriminator's replaced-token detection: the share of replaced tokens, the
  accuracy of its own decision (logit > 0) against always answering "original", and the
  ROC AUC of its logits (0.5: no signal), over every token and over the masked ones;
- for each run, and for a randomly initialised body of the same shape, the spread of
  its hidden states over the plain held-out text: the per-dimension standard deviation
  over tokens after the embeddings and after each block, and that of the mean-pooled
  states between examples (what a pooled classifier starts from).
"""

from __future__ import annotations

import argparse
import functools
import os

import jax.numpy as jnp
import numpy as np
from scipy.stats import rankdata

import objectives
from pretrain.evaluate import heldout_batches
from pretrain.inference import load_trained
from pretrain.input_pipeline import source_from_config
from pretrain.model import create_model


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a positive outscores a negative (ties count half): ROC AUC,
    from the positives' average ranks (Mann-Whitney U)."""
    ranks = rankdata(scores)
    count = int(positive.sum())
    return float((ranks[positive].sum() - count * (count + 1) / 2) / (count * (len(scores) - count)))


def detection(run: str, documents: int) -> None:
    """The discriminator's replaced-token detection on held-out text (see module docstring)."""
    trained = load_trained(run)
    model, tokenizer = trained.model, trained.tokenizer
    leaf = objectives.build_mixture("electra", tokenizer.vocabulary(), trained.config.objectives.to_dict()).objectives[0]
    texts = source_from_config(trained.config.data).split("heldout")[:documents]
    batches = heldout_batches(texts, functools.lru_cache(maxsize=None)(tokenizer.encode), leaf,
                              seq_len=trained.config.seq_len, batch_size=16)
    logits, replaced, masked = [], [], []
    for batch in batches:
        batch = {key: jnp.asarray(value) for key, value in batch.items()}
        rewritten, _ = model.head("generator").prepare(model, batch, leaf.loss_terms[0])
        taken = np.asarray(batch["discriminated"]) != 0
        logits.append(np.asarray(model.head("replaced_token")(model(rewritten)))[taken])
        replaced.append(np.asarray(rewritten["inputs"] != rewritten["targets"])[taken])
        masked.append(np.asarray(batch["generator_draws"])[taken] != 0)
    logits, replaced, masked = map(np.concatenate, (logits, replaced, masked))
    print(f"{os.path.basename(run)}: {len(logits):,} held-out tokens, {replaced.mean():.1%} replaced; detection "
          f"accuracy {((logits > 0) == replaced).mean():.1%} (always 'original': {1 - replaced.mean():.1%}); "
          f"ROC AUC {roc_auc(logits, replaced):.3f} over every token, {roc_auc(logits[masked], replaced[masked]):.3f} "
          "over the masked ones")


def spread(name: str, model, tokenizer, data_config, documents: int, seq_len: int) -> None:
    """The spread of `model`'s hidden states over plain held-out text (see module docstring)."""
    leaf = objectives.build_mixture("mlm", tokenizer.vocabulary()).objectives[0]  # its rows hold the plain text
    texts = source_from_config(data_config).split("heldout")[:documents]
    batches = heldout_batches(texts, functools.lru_cache(maxsize=None)(tokenizer.encode), leaf, seq_len=seq_len,
                              batch_size=16)
    per_layer, pooled = None, []
    for batch in batches:
        batch = {key: jnp.asarray(value) for key, value in batch.items()}
        batch["inputs"] = batch["targets"]  # unmasked
        segments = np.asarray(batch["segment_ids"])
        layers = [np.asarray(states) for states in model.layer_outputs(batch)]
        tokens = [states[segments > 0] for states in layers]
        per_layer = tokens if per_layer is None else [np.concatenate(pair) for pair in zip(per_layer, tokens)]
        final = layers[-1]
        pooled.extend(final[row][segments[row] == segment].mean(0)
                      for row in range(len(final)) for segment in set(segments[row].tolist()) - {0})
    stds = ", ".join(f"{states.std(0).mean():.3f}" for states in per_layer)
    print(f"{name}: per-dimension std over tokens, embeddings then each block: {stds}; of the mean-pooled states "
          f"between examples: {np.array(pooled).std(0).mean():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a pretrain.compare workdir with an 'electra' run")
    parser.add_argument("--documents", type=int, default=40, help="held-out documents read")
    args = parser.parse_args()
    runs = os.path.join(args.workdir, "runs")
    detection(os.path.join(runs, "electra"), args.documents)
    names = sorted(name for name in os.listdir(runs) if os.path.isdir(os.path.join(runs, name, "checkpoints")))
    for name in names:
        trained = load_trained(os.path.join(runs, name))
        spread(name, trained.model, trained.tokenizer, trained.config.data, args.documents, trained.config.seq_len)
    trained = load_trained(os.path.join(runs, names[0]))
    spread("random init", create_model(trained.model.config, seed=0), trained.tokenizer, trained.config.data,
           args.documents, trained.config.seq_len)


if __name__ == "__main__":
    main()
