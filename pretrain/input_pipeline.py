"""Config -> source, tokenizer, mixture and the train / eval batch streams.

The one place that reads `config.data` and `config.tokenizer`: it opens the
source, trains (or reuses, or validates) the SentencePiece model in the workdir,
builds the objective mixture against that vocabulary, and returns the two
streams of `pretrain.data`. Statistics of the corpus are logged once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

import objectives
from pretrain import data, distributed, sources
from pretrain.errors import raise_problems
from pretrain.packing import strategy_problems
from pretrain.tokenizer import Tokenizer, ensure_tokenizer
from pretrain.tokenizer import settings_problems as tokenizer_settings_problems

log = logging.getLogger(__name__)


def data_problems(data_config: Any, batch_size: int | None = None) -> list[str]:
    """Every problem of `config.data` (the one home of these rules: the config checks
    report them before training, `source_from_config` enforces them); with
    `batch_size` (`config.batch_size`), also whether `config.data.shards` divides it."""
    problems = []
    if data_config.kind not in sources.SOURCE_KINDS:
        problems.append(f"config.data.kind={data_config.kind!r} must be one of {tuple(sources.SOURCE_KINDS)}")
    elif data_config.kind == "files" and not data_config.path:
        problems.append("config.data.path is empty but config.data.kind='files'; set it to a .txt/.jsonl file, "
                        "directory or glob")
    elif data_config.kind == "tfds" and not data_config.tfds_name:
        problems.append("config.data.tfds_name is empty but config.data.kind='tfds'; set it (e.g. 'c4/en')")
    if not 0 < data_config.heldout_fraction < 1:
        problems.append(f"config.data.heldout_fraction={data_config.heldout_fraction!r} must lie in (0, 1) "
                        "(e.g. 0.02)")
    problems += strategy_problems(data_config.packing)
    for field, least, meaning in (("open_rows", 1, "positive"), ("num_threads", 0, "non-negative")):
        if not isinstance(data_config[field], int) or data_config[field] < least:
            problems.append(f"config.data.{field}={data_config[field]!r} must be a {meaning} integer")
    problems += data.shard_problems(data_config.get("shards", 1), batch_size)  # run configs from before shards: 1
    return problems


def tokenizer_problems(tokenizer_config: Any) -> list[str]:
    """Every problem of `config.tokenizer`: a given model file that is not there, or
    a size and type a tokenizer cannot be trained with."""
    if tokenizer_config.model_path:
        if not os.path.isfile(tokenizer_config.model_path):
            return [f"config.tokenizer.model_path={tokenizer_config.model_path!r} is not a file; give the path of a "
                    "SentencePiece .model file, or leave it empty to train one"]
        return []
    return tokenizer_settings_problems(tokenizer_config.vocab_size, tokenizer_config.model_type,
                                       sentinels=tokenizer_config.sentinels)


def source_from_config(data_config: Any) -> sources.Source:
    """The source named by `config.data` (flat fields, so each is a CLI flag)."""
    raise_problems(data_problems(data_config))
    kind = data_config.kind
    if kind == "pydocs":
        return sources.make_source("pydocs", heldout_fraction=data_config.heldout_fraction)
    if kind == "files":
        return sources.make_source("files", pattern=data_config.path, text_field=data_config.text_field,
                                   heldout_fraction=data_config.heldout_fraction)
    splits = {"train": data_config.tfds_train_split, "heldout": data_config.tfds_heldout_split}
    return sources.make_source("tfds", name=data_config.tfds_name, data_dir=data_config.tfds_data_dir or None,
                               text_feature=data_config.text_field, splits=splits)


def _sentences(documents: sources.DocumentSequence, limit: int) -> Iterator[str]:
    for index in range(min(limit, len(documents))):
        yield from documents[index].sentences


@dataclasses.dataclass
class InputPipeline:
    """Everything the trainer needs from the data side."""

    source: sources.Source
    tokenizer: Tokenizer
    mixture: objectives.Mixture
    train: grain.IterDataset  # endless; its iterator has get_state / set_state
    seq_len: int
    global_batch_size: int
    _eval_args: dict

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        """The fixed held-out batches of this host (identical on every call)."""
        return data.evaluation_batches(**self._eval_args)


def build_input_pipeline(config: Any, workdir: str | os.PathLike, *, process_index: int = 0,
                         process_count: int = 1) -> InputPipeline:
    """Source, tokenizer (trained into `workdir` when missing), mixture and batches."""
    raise_problems(data_problems(config.data, config.batch_size))
    source = source_from_config(config.data)
    log.info("data: %s", source.describe())
    train_documents, heldout_documents = source.split("train"), source.split("heldout")
    tokenizer_config = config.tokenizer
    with distributed.primary_first("tokenizer"):
        if config.get("init") is not None and config.init.get("hf"):  # the imported model's own tokenizer
            from pretrain.hf.imported_tokenizer import ensure_imported

            tokenizer = ensure_imported(workdir, config.init.hf)
        else:
            tokenizer = ensure_tokenizer(
                workdir,
                lambda: _sentences(train_documents, tokenizer_config.sample_documents),
                tokenizer_config.vocab_size,
                tokenizer_config.model_type,
                user_model_path=tokenizer_config.model_path or None,
                sentinels=tokenizer_config.sentinels,
            )
    stats = source.statistics("train", lambda text: len(tokenizer.encode(text)),
                              max_documents=tokenizer_config.sample_documents)
    log.info("data: train split (first %d documents): %d sentences, %d characters, %d tokens",
             stats.documents, stats.sentences, stats.characters, stats.tokens)
    mixture = objectives.build_mixture(config.objective, tokenizer.vocabulary(), config.objectives)
    common = dict(tokenize=tokenizer.encode, mixture=mixture, seq_len=config.seq_len,
                  global_batch_size=config.batch_size, seed=config.seed,
                  process_index=process_index, process_count=process_count, packing=config.data.packing)
    train = data.training_batches(train_documents, open_rows=config.data.open_rows,
                                  num_threads=config.data.num_threads, shards=config.data.shards, **common)
    if config.data.shards > 1:
        local, _ = data.host_shards(config.batch_size, config.data.shards, process_index, process_count)
        log.info("data: this host reads and packs shards %d..%d of %d", local.start, local.stop - 1,
                 config.data.shards)
    return InputPipeline(source, tokenizer, mixture, train, config.seq_len, config.batch_size,
                         dict(documents=heldout_documents, **common))


def take(dataset: grain.IterDataset, count: int) -> list[dict[str, np.ndarray]]:
    """The first `count` batches of a dataset (inspection and tests)."""
    return list(itertools.islice(iter(dataset), count))
