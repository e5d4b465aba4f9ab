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
