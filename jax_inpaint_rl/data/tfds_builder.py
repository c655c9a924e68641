"""TFDS without TensorFlow: write any source as an array_record TFDS dataset, read TFDS datasets as sources.

Writing: `build_tfds(source, data_dir)` prepares an array_record dataset named
`inpaint_dataset`. Images are handed to TFDS as PIL images, which TFDS encodes
to PNG with Pillow, so TensorFlow is not needed (numpy images would need it).

Reading: `open_tfds(path_or_name)` opens a prepared dataset through
`tfds.data_source` (random access over array_record, decoded with Pillow): again
no TensorFlow. Datasets this module wrote come back with their masks, targets,
embeddings and metadata; any other TFDS image dataset gets a mask generated on
the fly from (seed, index) and its prompt from a feature (`prompt_key`,
ClassLabel names allowed, formatted with `prompt_template`). A public dataset
must first be prepared in array_record format (`tfds build NAME --file_format=array_record`,
which for most public builders needs TensorFlow on the machine that prepares it).
"""
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jax_inpaint_rl.data import masks, validate
from jax_inpaint_rl.data.formats import DataError, embedding_field

BUILDER_NAME = "inpaint_dataset"


class InpaintDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder over one in-memory source (features follow the source's first example)."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to find; tfds' own lookup imports the Python<3.9 backport importlib_resources.
    code_path = None

    def __init__(self, source, split: str, **kwargs):
        self._source, self._split = source, split
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=features_for(self._source[0]),
                                     metadata=tfds.core.MetadataDict(kind=self._source.kind,
                                                                     fields=sorted(self._source.fields)),
                                     description=f"Written by jax_inpaint_rl from {self._source.name}",
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        for index in range(len(self._source)):
            yield index, encode(self._source[index])


def features_for(example: dict) -> tfds.features.FeaturesDict:
    """TFDS features for examples shaped like `example` (images as PNG, embeddings as tensors)."""
    features = {"id": tfds.features.Text(), "prompt": tfds.features.Text(), "target_text": tfds.features.Text()}
    if "metadata" in example:
        features["metadata"] = tfds.features.Text()
    for field, channels in (("image", 3), ("mask", 1), ("target", 3)):
        if field in example:
            features[field] = tfds.features.Image(shape=(None, None, channels))
    if example["embeddings"]:
        features["embeddings"] = tfds.features.FeaturesDict({
            name: tfds.features.Tensor(shape=value.shape, dtype=value.dtype)
            for name, value in example["embeddings"].items()})
    return tfds.features.FeaturesDict(features)


def encode(example: dict) -> dict:
    """An example as TFDS takes it without TensorFlow: PIL images, '' for a missing target_text."""
    record = {"id": example["id"], "prompt": example["prompt"], "target_text": example["target_text"] or ""}
    if "metadata" in example:
        record["metadata"] = example["metadata"]
    for field in ("image", "target"):
        if field in example:
            record[field] = Image.fromarray(example[field])
    if "mask" in example:
        record["mask"] = Image.fromarray((example["mask"][..., 0] * 255).astype(np.uint8))
    if example["embeddings"]:
        record["embeddings"] = example["embeddings"]
    return record


def build_tfds(source, data_dir: str | Path, split: str = "train") -> Path:
    """Check the source (raising every problem at once), then write it; returns the dataset folder.

    An existing dataset in the same place is an error: TFDS would silently reuse it."""
    target = Path(data_dir) / BUILDER_NAME / str(InpaintDataset.VERSION)
    if target.exists():
        raise FileExistsError(f"{target} exists; delete it or choose another data_dir")
    problems = validate.find_problems(source)
    if problems:
        raise DataError(problems)
    builder = InpaintDataset(source, split, data_dir=str(data_dir))
    builder.download_and_prepare()
    return Path(builder.data_dir)


class TfdsSource:
    """A prepared TFDS split as a source: stored fields where present, generated masks otherwise."""

    listing_problems = ()

    def __init__(self, data_source, info: tfds.core.DatasetInfo, name: str, *, mask_kind: str = "mixed",
                 prompt_key: str | None = None, prompt_template: str = "{}", image_key: str = "image",
                 seed: int = 0):
        self.kind = (info.metadata or {}).get("kind", "inpaint")  # written by InpaintDataset, else inpaint
        self.prompt_key = prompt_key or "prompt"
        needed = {self.prompt_key: "prompt"} if self.kind == "prompts" else {self.prompt_key: "prompt",
                                                                             image_key: "image"}
        for key, role in needed.items():
            if key not in info.features:
                raise DataError([f"{name}: no feature {key!r} to use as the {role} "
                                 f"(features: {sorted(info.features)}); pass {role}_key"])
        if mask_kind not in masks.MASK_KINDS:
            raise ValueError(f"mask kind {mask_kind!r}: expected one of {masks.MASK_KINDS}")
        self._data, self._features, self.name = data_source, info.features, name
        self.mask_kind, self.prompt_template, self.image_key, self.seed = mask_kind, prompt_template, image_key, seed
        self.fields = tfds_fields(info, self.kind)

    def __len__(self) -> int:
        return len(self._data)

    def locate(self, index: int, field: str) -> str:
        return f"{self.name}[{index}] ({field})"

    def __getitem__(self, index: int) -> dict:
        record = self._data[index]
        example = {"id": _text(record["id"]) if "id" in record else str(index),
                   "prompt": self.prompt_template.format(self._prompt(record[self.prompt_key])),
                   "target_text": _text(record["target_text"]) or None if "target_text" in record else None,
                   "embeddings": {name: np.asarray(value) for name, value in record.get("embeddings", {}).items()}}
        if "metadata" in record:
            example["metadata"] = _text(record["metadata"])
        if self.kind == "prompts":
            return example
        example["image"] = _rgb(record[self.image_key])
        if "target" in record:
            example["target"] = _rgb(record["target"])
        if "mask" in record:
            example["mask"] = masks.binarize(record["mask"])
        elif self.kind == "inpaint":
            example["mask"] = masks.generate(self.mask_kind, self.seed, index, *example["image"].shape[:2])
        return example

    def _prompt(self, value) -> str:
        feature = self._features[self.prompt_key]
        if isinstance(feature, tfds.features.ClassLabel):
            return feature.int2str(int(value))
        return _text(value)


def tfds_fields(info: tfds.core.DatasetInfo, kind: str) -> frozenset[str]:
    """The fields every example of a TfdsSource has, from its features and kind (inpaint sets get
    generated masks). target_text is stored for every example, maybe empty, so it counts only where
    the writer (InpaintDataset's `fields` metadata) recorded that every example had one."""
    features = info.features
    fields = {"prompt"}
    if kind != "prompts":
        fields.add("image")
        fields.update(field for field in ("mask", "target") if field in features)
        if kind == "inpaint":
            fields.add("mask")
    if "target_text" in features and "target_text" in (info.metadata or {}).get("fields", ()):
        fields.add("target_text")
    if "embeddings" in features:
        fields.update(embedding_field(name) for name in features["embeddings"].keys())
    if "metadata" in features:
        fields.add("metadata")
    return frozenset(fields)


def open_tfds(path_or_name: str, *, split: str = "train", data_dir: str | None = None, **source_options) -> TfdsSource:
    """A prepared TFDS folder, or 'tfds:NAME' (already prepared in data_dir as array_record), as a source."""
    try:
        if path_or_name.startswith("tfds:"):
            builder = tfds.builder(path_or_name.removeprefix("tfds:"), data_dir=data_dir)
        else:
            builder = tfds.builder_from_directory(path_or_name)
        data_source = builder.as_data_source(split=split)
    except Exception as error:  # tfds raises many types; the message says which dataset and why
        raise DataError([f"{path_or_name}: cannot open TFDS split {split!r} ({type(error).__name__}: {error}); "
                         f"expected a dataset prepared in array_record format"]) from error
    return TfdsSource(data_source, builder.info, f"{path_or_name}:{split}", **source_options)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from grey (H, W, 1) or RGB TFDS images."""
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
