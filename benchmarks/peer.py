"""Our training step against Hugging Face's on the same model shape, batch and data.

    pip install -e '.[hf]'      # torch==2.13.0 (CPU build) and transformers>=5
    python benchmarks/peer.py --objective=mlm --size=small --json
    python benchmarks/peer.py --objective=clm --size=small --json

`mlm` compares with `BertForMaskedLM` (so ours runs in BERT's form: post-LN blocks
with the MLM transform head), `clm` with `GPT2LMHeadModel` (ours in its default
pre-LN form). Both sides get the same packed batches from the default pipeline
(token ids, positions, token types; labels where our loss weights are non-zero,
for GPT-2 the inputs themselves), the same width, depth, heads, MLP, vocabulary,
float32, tanh-GELU, no dropout, and AdamW (0.9, 0.999, 1e-8, weight decay 0.01
except on biases and norms; PyTorch's fused implementation, its fastest on CPU)
after global-norm clipping at 1.0.

Five contenders run alternately in rounds in this one process, and four ratios are
printed (tokens/s counts real, non-pad tokens):

  ours / eager       our step as training runs it against the peer in eager PyTorch.
                     Our default computes vocabulary logits only at the positions with
                     a loss: ~15% of them for MLM (sparse prediction, as the fast BERT
                     recipes do), all real tokens for CLM (pads skipped)
  ours / compiled    the same against the peer's forward and backward under
                     `torch.compile` (inductor; the optimizer stays PyTorch's fused AdamW)
  like for like      our step with vocabulary logits at every position, as the peer
                     computes them (`weighted_token_statistics(every_position=True)`:
                     our chunked head with its hand-written gradient), against the eager peer
  autodiff full      our step with the full [B, L, V] logits through plain autodiff
                     (`pretrain.loss.full_logits_statistics`, the reference the chunked
                     head is tested against), against the eager peer

Each ratio is the median of its per-round ratios. The last line (with --json) is one
JSON object: tokens/s and ms/step per contender, the ratios, each ratio's best
rounds (less sensitive to other jobs on a shared machine) and the settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from collections.abc import Sequence

import numpy as np

import harness
from pretrain.loss import full_logits_statistics, weighted_token_statistics
from pretrain.model import PRESETS, TransformerConfig, preset

PEERS = {"mlm": "BertForMaskedLM", "clm": "GPT2LMHeadModel"}
RATIOS = {"ours / eager": ("ours", "peer"), "ours / compiled": ("ours", "peer_compiled"),
          "like for like": ("ours_every_position", "peer"),
          "autodiff full": ("ours_autodiff_full", "peer")}  # numerator, denominator contenders
EVERY_POSITION = functools.partial(weighted_token_statistics, every_position=True)


def our_config(objective: str, size: str, vocab_size: int) -> TransformerConfig:
    """Our model in the form of the peer it is compared with."""
    if objective == "mlm":
        return preset(size, vocab_size=vocab_size, pre_layer_norm=False, mlm_transform_head=True, output_bias=True)
    return preset(size, vocab_size=vocab_size)


class PeerStep:
    """One Hugging Face training step (forward with labels, backward, clipping,
    AdamW) on the same batches as ours."""

    def __init__(self, objective: str, config: TransformerConfig, batches: Sequence[harness.Batch],
                 compiled: bool = False):
        import torch
        import transformers

        self.torch = torch
        torch.manual_seed(0)
        common = dict(vocab_size=config.vocab_size)
        if objective == "mlm":
            model_config = transformers.BertConfig(
                **common, hidden_size=config.model_dim, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
                max_position_embeddings=config.max_positions, type_vocab_size=config.num_token_types,
                hidden_act="gelu_new", hidden_dropout_prob=config.dropout_rate,
                attention_probs_dropout_prob=config.dropout_rate, layer_norm_eps=config.layer_norm_epsilon)
            self.model = transformers.BertForMaskedLM(model_config)
        else:
            model_config = transformers.GPT2Config(
                **common, n_embd=config.model_dim, n_layer=config.num_layers, n_head=config.num_heads,
                n_inner=config.mlp_dim, n_positions=config.max_positions, activation_function="gelu_new",
                resid_pdrop=config.dropout_rate, embd_pdrop=config.dropout_rate, attn_pdrop=config.dropout_rate,
                layer_norm_epsilon=config.layer_norm_epsilon, bos_token_id=None, eos_token_id=None)
            self.model = transformers.GPT2LMHeadModel(model_config)
        self.model.train()
        self.attention = self.model.config._attn_implementation
        self.forward = torch.compile(self.model) if compiled else self.model  # inductor: forward and backward
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": 0.01},
             {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}],
            lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)  # PyTorch's fastest AdamW on CPU
        self.parameters = parameters
        self.inputs = [self._inputs(objective, batch) for batch in batches]
        self.tokens = [harness.real_tokens(batch) for batch in batches]
        self.next = 0
        self.run(2)  # warm-up (and, compiled, the compilation)

    def _inputs(self, objective: str, batch: harness.Batch) -> dict:
        torch = self.torch
        ids = torch.from_numpy(batch["inputs"].astype(np.int64))
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64)),
            "position_ids": torch.from_numpy(batch["positions"].astype(np.int64)),
        }
        if objective == "mlm":
            inputs["token_type_ids"] = torch.from_numpy(batch["token_types"].astype(np.int64))
            labels = np.where(batch["weights"] > 0, batch["targets"], -100)
        else:  # GPT-2 shifts the labels itself: predict each next input token
            labels = np.where(batch["segment_ids"] > 0, batch["inputs"], -100)
        inputs["labels"] = torch.from_numpy(labels.astype(np.int64))
        return inputs

    def run(self, steps: int) -> int:
        """Runs `steps` training steps; returns the real tokens they consumed."""
        tokens = 0
        for _ in range(steps):
            index = self.next % len(self.inputs)
            loss = self.forward(**self.inputs[index]).loss
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += self.tokens[index]
            self.next += 1
        return tokens


def compare(args: argparse.Namespace, workdir: str) -> dict:
    """Runs the five contenders alternately; the result record."""
    import torch
    import transformers

    batches, names, vocab_size = harness.pipeline_batches(args.objective, args, workdir, args.batches)
    config = our_config(args.objective, args.size, vocab_size)
    contenders = {"ours": harness.OurStep(config, len(names), batches),
                  "ours_every_position": harness.OurStep(config, len(names), batches, statistics=EVERY_POSITION),
                  "ours_autodiff_full": harness.OurStep(config, len(names), batches,
                                                        statistics=full_logits_statistics),
                  "peer": PeerStep(args.objective, config, batches),
                  "peer_compiled": PeerStep(args.objective, config, batches, compiled=True)}
    load_before = harness.load_average()
    rounds = harness.alternate({name: step.run for name, step in contenders.items()}, args.rounds, args.steps)
    tokens_per_sec = {name: harness.throughput(rounds[name]) for name in contenders}
    return {
        "objective": args.objective,
        "size": args.size,
        "tokens_per_sec": {name: statistics.median(tps) for name, tps in tokens_per_sec.items()},
        "step_ms": {name: 1e3 * harness.step_seconds(rounds[name], args.steps) for name in contenders},
        "ratios": {label: harness.median_ratio(tokens_per_sec[a], tokens_per_sec[b])
                   for label, (a, b) in RATIOS.items()},
        "ratios_of_best_rounds": {label: max(tokens_per_sec[a]) / max(tokens_per_sec[b])
                                  for label, (a, b) in RATIOS.items()},
        "settings": {
            "peer": f"transformers.{PEERS[args.objective]} (attention: {contenders['peer'].attention})",
            "ours": "pre_layer_norm={}, mlm_transform_head={}".format(config.pre_layer_norm,
                                                                      config.mlm_transform_head),
            "layers": config.num_layers, "model_dim": config.model_dim, "heads": config.num_heads,
            "mlp_dim": config.mlp_dim, "vocab_size": config.vocab_size, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "real_tokens_per_step": statistics.mean(contenders["ours"].tokens),
            "optimizer": "AdamW(lr=1e-4, b=(0.9, 0.999), eps=1e-8, wd=0.01 on matrices; torch: fused), clip 1.0",
            "precision": "float32", "rounds": args.rounds, "steps_per_round": args.steps,
            "load_average_1min": [round(load_before, 2), round(harness.load_average(), 2)],
            "machine": harness.machine(args.host_memory_kept), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=sorted(PEERS), default="mlm")
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    harness.add_shape_flags(parser)
    args = parser.parse_args()
    args.host_memory_kept = harness.apply_host_memory(args)
    if args.workdir:
        result = compare(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            result = compare(args, workdir)
    print(f"{args.objective} {args.size} on {result['settings']['machine']}; "
          f"peer {result['settings']['peer']}; load {result['settings']['load_average_1min']}")
    for name, tps in result["tokens_per_sec"].items():
        print(f"  {name:<19} {tps:>9,.0f} tok/s  {result['step_ms'][name]:>6.0f} ms/step")
    for label, ratio in result["ratios"].items():
        numerator, denominator = RATIOS[label]
        print(f"  {label:<17} {ratio:.2f}  ({numerator} / {denominator}; best rounds "
              f"{result['ratios_of_best_rounds'][label]:.2f})")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
