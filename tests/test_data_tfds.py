"""TFDS: local sets written as array_record and read back unchanged; any TFDS image set with masks on the fly.

Both directions run without TensorFlow: a clean subprocess writes and reads a dataset and
asserts TensorFlow was never imported (meaningful also where TensorFlow is installed).
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jax_inpaint_rl.data import Loader, SyntheticSource, check, find_problems, open_source
from jax_inpaint_rl.data.tfds_builder import build_tfds, open_tfds
from tests.test_data_formats import inpaint_records, write_json_set, write_self_bench


def assert_same_examples(expected_source, got_source):
    assert len(got_source) == len(expected_source) and got_source.kind == expected_source.kind
    assert got_source.fields == expected_source.fields
    for index in range(len(expected_source)):
        expected, got = expected_source[index], got_source[index]
        assert set(got) == set(expected)
        for key, value in expected.items():
            if key == "embeddings":
                assert set(got[key]) == set(value)
                for name in value:
                    np.testing.assert_array_equal(got[key][name], value[name])
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[key], value, err_msg=key)
            else:
                assert got[key] == value, key


def test_self_bench_round_trip(tmp_path):
    local = open_source(write_self_bench(tmp_path / "bench", ["1\ta sign\tOPEN", "2 a red circle", "3 a cat"]))
    assert local.fields == {"prompt", "image", "mask", "target"}
    folder = build_tfds(local, tmp_path / "tfds")
    assert (folder / "dataset_info.json").is_file()
    assert_same_examples(local, open_source(folder))
    assert check.main([str(folder)]) == 0
    with pytest.raises(FileExistsError, match="delete it or choose another data_dir"):
        build_tfds(local, tmp_path / "tfds")


def test_jsonl_with_embeddings_round_trip(tmp_path):
    local = open_source(write_json_set(tmp_path / "json", inpaint_records(3)))
    folder = build_tfds(local, tmp_path / "tfds", split="validation")
    assert_same_examples(local, open_source(folder, split="validation"))
    assert local.fields == {"prompt", "image", "mask", "embedding:t5"}


def test_target_text_on_every_example_survives_the_round_trip(tmp_path):
    local = SyntheticSource(3, resolution=16, kinds=("text",))
    assert "target_text" in local.fields
    assert_same_examples(local, open_source(build_tfds(local, tmp_path / "tfds")))


def test_prompt_list_round_trip(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    local = open_source(tmp_path / "p.txt")
    assert_same_examples(local, open_source(build_tfds(local, tmp_path / "tfds")))
    assert local.fields == {"prompt"}


class ForeignImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for any TFDS image dataset: images and class labels, no masks, no prompts."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see InpaintDataset

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=["cat", "dog"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(6):
            yield index, {"image": Image.fromarray(np.full((20, 24), 40 * index, np.uint8)), "label": index % 2}


def test_any_tfds_image_dataset_gets_masks_on_the_fly(tmp_path):
    builder = ForeignImages(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    with pytest.raises(Exception, match="no feature 'prompt'.*pass prompt_key"):
        open_tfds(builder.data_dir)
    source = open_tfds(builder.data_dir, prompt_key="label", prompt_template="a photo of a {}", mask_kind="box",
                       seed=3)
    again = open_tfds(builder.data_dir, prompt_key="label", prompt_template="a photo of a {}", mask_kind="box",
                      seed=3)
    labels = {source[i]["prompt"] for i in range(len(source))}
    assert labels == {"a photo of a cat", "a photo of a dog"}
    example = source[0]
    assert example["image"].shape == (20, 24, 3) and example["mask"].shape == (20, 24, 1)
    assert source.fields == {"prompt", "image", "mask"}  # masks generated, no target stored
    np.testing.assert_array_equal(example["mask"], again[0]["mask"])
    assert find_problems(source, progress=False) == []
    batch = next(Loader(source, prompts_per_batch=3, group_size=2, resolution=16, prefetch=0))
    assert batch["mask"].shape == (6, 16, 16, 1)


def test_writing_and_reading_need_no_tensorflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from jax_inpaint_rl.data import SyntheticSource, open_source
        from jax_inpaint_rl.data.tfds_builder import build_tfds
        folder = build_tfds(SyntheticSource(3, resolution=16), {str(tmp_path)!r})
        source = open_source(folder)
        assert source[2]["prompt"] == SyntheticSource(3, resolution=16)[2]["prompt"]
        assert "tensorflow" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
