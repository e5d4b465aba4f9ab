"""configs/pretrain.py: variants parse, every objective setting is a config field."""

import pytest

import objectives
from configs.pretrain import get_config, parse_variants
from pretrain.model import TransformerConfig


def test_variants_and_mixture_specs():
    assert parse_variants("objective=mlm:1,clm:1,size=tiny") == {"objective": "mlm:1,clm:1", "size": "tiny",
                                                                 "data": "pydocs", "platform": "cpu"}
    assert parse_variants(None) == {"objective": "mlm", "size": "small", "data": "pydocs", "platform": "cpu"}
    accelerator = get_config("platform=accelerator")
    assert (accelerator.model.dtype, accelerator.model.attention) == ("bfloat16", "auto")
    assert (get_config().model.dtype, get_config().model.attention) == ("float32", "dense")
    with pytest.raises(ValueError, match="unknown platform 'gpu'; choose one of cpu, accelerator"):
        get_config("platform=gpu")
    assert get_config("data=files,objective=clm").data.kind == "files"
    with pytest.raises(ValueError, match="unknown config variant 'sise'"):
        parse_variants("sise=tiny")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        get_config("size=huge")
    with pytest.raises(ValueError, match="unknown data 'c4'; choose one of pydocs, files, tfds"):
        get_config("data=c4")


@pytest.mark.parametrize("spec", ["mlm", "clm", "mass", "unilm", "mlm:1,clm:1,mass:1,unilm:1"])
def test_config_builds_mixture_and_model(spec):
    config = get_config(f"objective={spec},size=tiny")
    config.objectives.mlm.mask_rate = 0.2
    mixture = objectives.build_mixture(config.objective, objectives.Vocabulary(100), config.objectives)
    assert len(mixture.objectives) >= 1
    if spec == "mlm":
        assert mixture.objectives[0].config.mask_rate == 0.2
    assert "vocab_size" not in config.model  # the tokenizer decides it
    model = TransformerConfig(**config.model, vocab_size=config.tokenizer.vocab_size)
    assert model.num_layers == 2


def test_every_objective_setting_is_a_config_field():
    config = get_config()
    for name in objectives.registered_names():
        assert dict(config.objectives[name]) == objectives.default_settings(name)


def test_importing_the_tools_defines_no_flag():
    """Each tool defines its flags in its `main`, so the modules import as libraries."""
    from absl import flags

    from pretrain import compare, evaluate, generate, inspect_data, train  # noqa: F401

    assert not {"config", "workdir", "prompt", "objectives"} & set(flags.FLAGS)
