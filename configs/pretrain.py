"""Pretraining config: `--config=configs/pretrain.py:objective=mlm,size=small`.

Variants (comma-separated `key=value` in the argument):
  objective  an objective spec: 'mlm', 'clm', 'mass', 'unilm', or a mixture such as
             'mlm:1,clm:1' (see objectives.parse_mixture_spec).
  size       model preset: tiny, small, base, large.

Every objective's settings live under `config.objectives.<name>` with the
paper defaults, so any number can be overridden from the command line
(`--config.objectives.mlm.mask_rate=0.2`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

import objectives
from pretrain.model import PRESETS, TransformerConfig

DEFAULT_VARIANTS = {"objective": "mlm", "size": "small"}


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
    config = ml_collections.ConfigDict()
    config.objective = variants["objective"]  # objective spec: name, or 'name:rate,...' mixture
    config.objectives = ml_collections.ConfigDict(  # settings of every registered objective
        {name: objectives.default_settings(name) for name in objectives.registered_names()})
    config.size = variants["size"]  # model preset the `model` fields start from
    model_defaults = dataclasses.asdict(TransformerConfig(**PRESETS[variants["size"]]))
    config.model = ml_collections.ConfigDict(model_defaults)  # TransformerConfig fields
    config.seq_len = 128  # tokens per packed row
    config.seed = 0  # parameter initialisation and example sampling
    return config
