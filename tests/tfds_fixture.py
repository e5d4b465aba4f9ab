"""A tiny TFDS text dataset written offline as ArrayRecord by a real TFDS builder.

The builder is a `tfds.core.GeneratorBasedBuilder` whose `_info` builds a
`tfds.core.DatasetInfo` directly (`dataset_info_from_configs` would look for metadata
files next to this module) and whose splits come from in-memory texts, so
`download_and_prepare(file_format='array_record')` downloads nothing and needs no
TensorFlow. The class is not registered: readers find the dataset from the files in
`data_dir`, as they would for a dataset prepared elsewhere and copied over.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

TRAIN_TEXTS = (
    "The first training document. It has two sentences.",
    "Second document, e.g. with an abbreviation. Pi is 3.14 here!\n\nA new paragraph follows.",
    "Ünïcödé text survives the round trip. Ça va?",
)
VALIDATION_TEXTS = (
    "A held-out document. Nothing else.",
    "",
)


with tfds.core.registered.skip_registration():

    class SourcesTinyText(tfds.core.GeneratorBasedBuilder):
        """Three training and two validation records with `text` and `title` features."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> tfds.core.DatasetInfo:
            features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        texts = {"train": TRAIN_TEXTS, "validation": VALIDATION_TEXTS}

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(texts) for split, texts in self.texts.items()}

        def _generate_examples(self, texts):
            for i, text in enumerate(texts):
                yield i, {"text": text, "title": f"title {i}"}


def prepare(data_dir: str | os.PathLike, train_texts=TRAIN_TEXTS, validation_texts=VALIDATION_TEXTS) -> str:
    """Writes the dataset under `data_dir` (optionally with other texts); returns the
    name to give `tfds.data_source`."""
    builder = SourcesTinyText(data_dir=os.fspath(data_dir))
    builder.texts = {"train": tuple(train_texts), "validation": tuple(validation_texts)}
    builder.download_and_prepare(file_format="array_record")
    return builder.name


GLUE_SST2 = {  # (sentence, label): 0 negative, 1 positive
    "train": [(f"{text} ({n})", label) for n in range(5) for text, label in (
        ("a dull and tired film", 0), ("a warm, funny and moving story", 1), ("flat and lifeless", 0),
        ("the best picture of the year", 1), ("sharp writing and fine acting", 1), ("a waste of time", 0))],
    "validation": [("a moving and funny film", 1), ("tired and dull", 0), ("fine writing", 1), ("lifeless", 0)],
    "test": [("unlabelled, as GLUE's test is", -1)],
}
GLUE_STSB = {  # (sentence1, sentence2, similarity 0..5)
    "train": [(f"{a} ({n})", f"{b} ({n})", score) for n in range(6) for a, b, score in (
        ("a man plays a guitar", "a man is playing guitar", 4.8), ("a cat sleeps", "the stock market fell", 0.2),
        ("a woman cuts onions", "someone is slicing an onion", 4.2), ("kids play football", "a dog barks", 0.5))],
    "validation": [("a man plays the piano", "a man is playing a piano", 4.6), ("a bird flies", "cars on a road", 0.1),
                   ("two dogs run", "dogs are running", 4.0)],
    "test": [("no label", "here", -1.0)],
}
GLUE_MNLI = {  # (premise, hypothesis, label): 0 entailment, 1 neutral, 2 contradiction; GLUE's five splits
    "train": [(f"{premise} ({n})", hypothesis, label) for n in range(4) for premise, hypothesis, label in (
        ("a man plays a guitar on stage", "a man is playing music", 0), ("a cat sleeps on the sofa", "a cat rests", 0),
        ("two kids play football", "the kids are asleep", 2), ("a woman reads a book", "the woman is at home", 1),
        ("a dog runs in the park", "a dog is outside", 0), ("a chef cooks pasta", "nobody is cooking", 2),
        ("a boy rides a bike", "the boy is late for school", 1), ("people sing in a choir", "the room is silent", 2))],
    "validation_matched": [("a girl plays the violin", "a girl makes music", 0), ("a bird sings", "it is quiet", 2),
                           ("a man paints a wall", "the man is a painter", 1), ("a car drives fast", "a car moves", 0)],
    "validation_mismatched": [("the report was filed late", "the report arrived", 0),
                              ("the market fell today", "prices rose", 2),
                              ("the talk ran long", "people were bored", 1)],
    "test_matched": [("unlabelled", "as GLUE's test is", -1), ("also unlabelled", "hidden", -1)],
    "test_mismatched": [("unlabelled too", "hidden", -1)],
}
GLUE_ROWS = {"sst2": GLUE_SST2, "stsb": GLUE_STSB, "mnli": GLUE_MNLI}


with tfds.core.registered.skip_registration():

    class GlueTiny(tfds.core.GeneratorBasedBuilder):
        """GLUE's feature names and splits in miniature: `glue_tiny/sst2` (sentence ->
        ClassLabel negative/positive), `glue_tiny/stsb` (sentence pair -> float) and
        `glue_tiny/mnli` (premise, hypothesis -> entailment/neutral/contradiction; train,
        validation_matched, validation_mismatched, test_matched, test_mismatched).
        `rows` ({split: rows}) replaces a config's splits."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in GLUE_ROWS]
        rows = None

        def _info(self) -> tfds.core.DatasetInfo:
            if self.builder_config.name == "sst2":
                features = {"sentence": tfds.features.Text(), "idx": tfds.features.Scalar(np.int32),
                            "label": tfds.features.ClassLabel(names=["negative", "positive"])}
            elif self.builder_config.name == "stsb":
                features = {"sentence1": tfds.features.Text(), "sentence2": tfds.features.Text(),
                            "idx": tfds.features.Scalar(np.int32), "label": tfds.features.Scalar(np.float32)}
            else:
                features = {"premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
                            "idx": tfds.features.Scalar(np.int32),
                            "label": tfds.features.ClassLabel(names=["entailment", "neutral", "contradiction"])}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            rows = self.rows or GLUE_ROWS[self.builder_config.name]
            return {split: self._generate_examples(split_rows) for split, split_rows in rows.items()}

        def _generate_examples(self, rows):
            for index, row in enumerate(rows):
                if self.builder_config.name == "sst2":
                    yield index, {"sentence": row[0], "idx": index, "label": row[1]}
                elif self.builder_config.name == "stsb":
                    yield index, {"sentence1": row[0], "sentence2": row[1], "idx": index, "label": row[2]}
                else:
                    yield index, {"premise": row[0], "hypothesis": row[1], "idx": index, "label": row[2]}


def prepare_glue(data_dir: str | os.PathLike, config: str, rows: dict | None = None) -> str:
    """Writes `glue_tiny/<config>` under `data_dir` (with `rows`, {split: rows}, as its
    splits if given); returns the name for `tfds.data_source`."""
    builder = GlueTiny(config=config, data_dir=os.fspath(data_dir))
    builder.rows = rows
    builder.download_and_prepare(file_format="array_record")
    return f"{builder.name}/{config}"
