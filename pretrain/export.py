"""Writes a training run as a directory `transformers` loads with `from_pretrained`.

    python -m pretrain.export --workdir=runs/clm --out=exports/clm [--step=N] [--quantize=int8_weights]

The newest good checkpoint's parameters (or those of step N) become `model.safetensors` (written from
NumPy; no torch needed), the model's shape `config.json`, and the run's SentencePiece
tokenizer `tokenizer.json` / `tokenizer_config.json` with the same ids. A pre-LN run
maps to `GPT2LMHeadModel`; a post-LN run with BERT's MLM transform head to
`BertForMaskedLM`, or `BertForPreTraining` when it has the pair-classifier head; a
post-LN run with ELECTRA's replaced-token detector to `ElectraForPreTraining` (the
discriminator: its generator stays behind); a post-LN run of shared layers
(`model.share_layers`) to `AlbertForMaskedLM`. A run with no
exact counterpart is refused with the option that prevents it and what to set.

`--quantize=int8_weights` writes the weights int8 weight-only inference computes with
(each int8 value times its scale, `pretrain.quantization`) as float32: transformers loads
them everywhere and gives that model's logits. The int8 bytes themselves are not
written: transformers reads int8 tensors only through a quantization backend
(bitsandbytes, optimum-quanto, compressed-tensors), each with a format of its own that
this project neither depends on nor writes. `int8` (matmul inputs quantized too) is
refused: BERT's and GPT-2's modules in transformers compute in float and would not give
that model's numbers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

import objectives
from pretrain import cli
from pretrain.hf import convert
from pretrain.hf.hf_tokenizer import write_tokenizer
from pretrain.hf.imported_tokenizer import ImportedTokenizer, ensure_imported
from pretrain.hf.models import architecture_of, declared_architectures, flat_params, hf_config
from pretrain.inference import model_config, read_run_config, restore_params, run_tokenizer
from pretrain.model import TransformerConfig, create_model

log = logging.getLogger(__name__)


def export_problems(config: TransformerConfig, mixture: objectives.Mixture) -> list[str]:
    """Why a run with this model and these objectives has no exact `transformers`
    counterpart (each names the option and what to set), or nothing."""
    problems = []
    architecture = architecture_of(config)
    if len(declared_architectures(config)) > 1:
        problems.append(f"config.model.heads={config.heads!r} belong to different transformers architectures "
                        f"({', '.join(declared_architectures(config))}); one export holds one: train with the "
                        "objectives of one of them")
    if config.pre_layer_norm and declared_architectures(config):
        problems.append(f"config.model.heads={config.heads!r} belong to {', '.join(declared_architectures(config))}, "
                        "a post-LN architecture; train with config.model.pre_layer_norm=False to export them")
    if config.factorised_embedding and architecture not in ("electra", "albert"):
        problems.append(f"config.model.embedding_dim={config.embedding_dim}: {architecture}'s model has no "
                        "projection from narrower embeddings (ELECTRA's and ALBERT's have); train with "
                        "config.model.embedding_dim=0")
    if config.share_layers and architecture != "albert":
        problems.append(f"config.model.share_layers=True: {architecture}'s model has a layer of its own per layer; "
                        "ALBERT shares them: train post-LN (config.model.pre_layer_norm=False) without another "
                        "architecture's heads for an AlbertForMaskedLM export")
    if architecture == "albert" and not (config.mlm_transform_head and config.output_bias):
        problems.append("AlbertForMaskedLM reads logits through its MLM transform head with an output bias; train "
                        "with config.model.mlm_transform_head=True and config.model.output_bias=True")
    if architecture == "gpt2":
        typed = sorted({leaf.name for leaf in mixture.objectives if leaf.token_types - {0}})
        if typed:
            problems.append(f"objectives {typed} use token types beyond 0, which GPT-2 does not embed; export a run "
                            "whose objectives use type 0 only, or train with "
                            "config.model.pre_layer_norm=False for a BERT export")
        if config.output_bias:
            problems.append("config.model.output_bias=True: GPT-2's output layer has no bias; train with "
                            "config.model.output_bias=False to export to GPT2LMHeadModel")
        if config.mlm_transform_head:
            problems.append("config.model.mlm_transform_head=True: GPT-2 has no MLM transform head; train with "
                            "config.model.mlm_transform_head=False, or post-LN (config.model.pre_layer_norm=False) "
                            "for a BERT export")
    elif architecture == "bert" and not config.mlm_transform_head:
        problems.append("config.model.mlm_transform_head=False: BertForMaskedLM reads logits through BERT's MLM "
                        "transform head; train with config.model.mlm_transform_head=True (or pre-LN, "
                        "config.model.pre_layer_norm=True, for a GPT-2 export)")
    return problems


def export_run(workdir: str, out: str, step: int | None = None, quantize: str = "") -> dict[str, Any]:
    """Writes run `workdir` (its newest good checkpoint, or that of `step`) as a
    `transformers` directory `out`, its weights as int8 weight-only inference has them
    with `quantize='int8_weights'` (see module docstring); returns what it wrote."""
    if quantize not in ("", "int8_weights"):
        raise ValueError(f"--quantize={quantize!r}: transformers' BERT and GPT-2 compute in float, so a model whose "
                         "matmul inputs are int8 has no exact counterpart there; export --quantize=int8_weights (the "
                         "weights int8 weight-only inference computes with), or score it with pretrain.evaluate "
                         "--quantize=int8")
    from safetensors.numpy import save

    run_config = read_run_config(workdir)
    tokenizer = run_tokenizer(workdir)
    config = model_config(run_config, tokenizer.vocab_size)
    vocab = tokenizer.vocabulary()
    mixture = objectives.build_mixture(run_config.objective, vocab, run_config.objectives.to_dict())
    problems = export_problems(config, mixture)
    if problems:
        raise ValueError(f"{workdir} has no exact transformers counterpart:\n  " + "\n  ".join(problems))
    model = create_model(config)
    step, _ = restore_params(workdir, model, step)
    if quantize:
        from pretrain.quantization import quantized_model

        model = quantized_model(model, quantize)
    architecture = architecture_of(config)
    for head in config.heads:
        if head not in convert.exported_heads(config.heads, architecture):
            log.warning("the model's %r head has no counterpart in %s and stays behind (a pretraining head; the "
                        "body and the heads transformers has export)", head, architecture)
    state = convert.to_hf(flat_params(model), architecture)
    os.makedirs(out, exist_ok=True)
    # Written by open(), so its mode is the umask's like every other file here (save_file writes 0600).
    with open(os.path.join(out, "model.safetensors"), "wb") as handle:
        handle.write(save(state, metadata={"format": "pt"}))
    described = hf_config(config, vocab.tokens)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(described, handle, indent=2)
    if isinstance(tokenizer, ImportedTokenizer):  # a run that started from a Hugging Face model keeps its tokenizer
        ensure_imported(out, os.path.dirname(tokenizer.path))
    else:
        write_tokenizer(tokenizer, out, "gpt2" if architecture == "gpt2" else "bert",  # ELECTRA: BERT's layout
                        config.max_positions)
    return {"workdir": workdir, "step": step, "out": out, "class": described["architectures"][0],
            "tensors": len(state), "quantized": quantize or "none"}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.export`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "a training run's directory (pretrain.train --workdir)",
                                  flag_values=flag_values)
    out = flags.DEFINE_string("out", None, "the directory to write (transformers loads it with from_pretrained)",
                              flag_values=flag_values)
    step = flags.DEFINE_integer("step", 0, "the checkpoint step to export; 0: the newest good one",
                                flag_values=flag_values)
    quantize = flags.DEFINE_enum("quantize", "none", ["none", "int8_weights", "int8"], "write the weights as "
                                 "int8 weight-only inference computes with them (int8: refused, see the docstring)",
                                 flag_values=flag_values)
    cli.parse(flag_values, argv, __doc__)

    def command() -> str:
        if not workdir.value or not out.value:
            raise ValueError("--workdir and --out are required, e.g. --workdir=runs/clm --out=exports/clm")
        wrote = export_run(workdir.value, out.value, step.value or None,
                           "" if quantize.value == "none" else quantize.value)
        return (f"{wrote['workdir']} at step {wrote['step']} -> {wrote['out']} ({wrote['class']}, "
                f"{wrote['tensors']} tensors, tokenizer.json)")

    print(cli.run_reporting_bad_input(command))


if __name__ == "__main__":
    main()
