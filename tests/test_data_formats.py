"""Local formats (self_bench, JSON / JSONL, edit sets, prompt lists), their fields, masks and the synthetic set.

The helpers at the top write small fixtures; the other data tests import them.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from jax_inpaint_rl.data import find_problems, masks, synthetic
from jax_inpaint_rl.data.formats import DataError, read_mask
from jax_inpaint_rl.data.sources import open_source

SIZE = 16


def save_png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def image_array(seed, height=SIZE, width=SIZE):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask_array(height=SIZE, width=SIZE, value=255):
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4:height // 2, width // 4:width // 2] = value
    return mask


def write_self_bench(folder, lines, size=SIZE):
    """self_bench.txt with `lines` (str) and the three PNGs for every number listed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "self_bench.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        number = line.replace("\t", " ").split()[0].rstrip(":,.") if line.strip() else ""
        if number.isdigit():
            name = f"test{int(number):02d}"
            save_png(folder / f"{name}_source.png", image_array(int(number), size, size))
            save_png(folder / f"{name}_mask.png", box_mask_array(size, size))
            save_png(folder / f"{name}_ref.png", image_array(100 + int(number), size, size))
    return folder


def write_json_set(folder, records, jsonl=True):
    """Write images / masks / embeddings named in records (relative paths) and the listing."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(records):
        for field in ("image_path", "target_path"):
            if field in record:
                save_png(folder / record[field], image_array(index))
        if "mask_path" in record:
            save_png(folder / record["mask_path"], box_mask_array())
        if "t5_embedding_path" in record:
            embedding = np.full((4, 8), index, np.float32)
            path = folder / record["t5_embedding_path"]
            np.save(path, embedding) if path.suffix == ".npy" else save_file({"e": embedding}, str(path))
    listing = folder / ("data.jsonl" if jsonl else "data.json")
    listing.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return listing


def inpaint_records(count):
    return [{"image_path": f"img/{i}.png", "mask_path": f"img/{i}_mask.png", "prompt": f"prompt {i}",
             "t5_embedding_path": f"img/{i}.npy" if i % 2 else f"img/{i}.safetensors"} for i in range(count)]


def test_self_bench_roles_line_formats_and_target_text(tmp_path):
    folder = write_self_bench(tmp_path / "bench", ["# comment", "1\ta sign\tOPEN", "2: a red circle",
                                                   "", "03 text 'hi'"])
    source = open_source(folder)
    assert (source.kind, len(source), source.listing_problems) == ("inpaint", 3, [])
    first = source[0]
    assert (first["id"], first["prompt"], first["target_text"]) == ("1", "a sign", "OPEN")
    np.testing.assert_array_equal(first["image"], image_array(1))  # model input = source
    np.testing.assert_array_equal(first["target"], image_array(101))  # target = ref
    np.testing.assert_array_equal(first["mask"][..., 0], box_mask_array() > 0)
    assert [source[i]["prompt"] for i in (1, 2)] == ["a red circle", "text 'hi'"]
    assert source[1]["target_text"] is None
    assert source.locate(0, "mask").endswith("test01_mask.png")
    assert source.fields == {"prompt", "image", "mask", "target"}  # target_text only on line 1


def test_self_bench_fields_include_target_text_when_every_line_has_one(tmp_path):
    folder = write_self_bench(tmp_path / "bench", ["1\ta sign\tOPEN", "2\ta door\tPUSH"])
    assert open_source(folder).fields == {"prompt", "image", "mask", "target", "target_text"}


def test_self_bench_bad_line_is_reported_with_its_line_number(tmp_path):
    folder = write_self_bench(tmp_path / "bench", ["1 ok", "no number here"])
    source = open_source(folder)
    assert len(source) == 1
    assert "self_bench.txt line 2" in source.listing_problems[0] and "NUMBER" in source.listing_problems[0]


def test_mask_threshold_is_above_127(tmp_path):
    values = np.array([[0, 127, 128, 255]], np.uint8)
    mask = read_mask(save_png(tmp_path / "m.png", values))
    np.testing.assert_array_equal(mask[0, :, 0], [0, 0, 1, 1])
    assert mask.dtype == np.float32 and mask.shape == (1, 4, 1)


@pytest.mark.parametrize("jsonl", [True, False])
def test_json_and_jsonl_with_embeddings_and_relative_paths(tmp_path, jsonl):
    records = inpaint_records(3)
    records[1].update(id="custom", target_path="img/1_ref.png", target_text="AB")
    source = open_source(write_json_set(tmp_path, records, jsonl))
    assert (source.kind, len(source), source.listing_problems) == ("inpaint", 3, [])
    assert [source[i]["id"] for i in range(3)] == ["0", "custom", "2"]
    example = source[1]
    assert (example["prompt"], example["target_text"]) == ("prompt 1", "AB")
    np.testing.assert_array_equal(example["image"], image_array(1))
    np.testing.assert_array_equal(example["target"], image_array(1))
    for i in range(3):  # .npy and .safetensors both load
        np.testing.assert_array_equal(source[i]["embeddings"]["t5"], np.full((4, 8), i, np.float32))


def test_jsonl_fields_follow_what_every_record_has(tmp_path):
    records = inpaint_records(3)
    records[1].update(target_path="img/1_ref.png", target_text="AB")
    source = open_source(write_json_set(tmp_path / "some_targets", records))
    assert source.fields == {"prompt", "image", "mask", "embedding:t5"}  # no target, no target_text
    for record in records:
        record.update(target_path=record["image_path"].replace(".png", "_ref.png"), target_text="AB")
    assert open_source(write_json_set(tmp_path / "all_targets", records)).fields == {
        "prompt", "image", "mask", "target", "target_text", "embedding:t5"}


def test_embeddings_on_some_records_are_no_field_and_a_problem(tmp_path):
    records = inpaint_records(3)
    del records[1]["t5_embedding_path"]
    source = open_source(write_json_set(tmp_path, records))
    assert source.fields == {"prompt", "image", "mask"}
    assert any("no embedding ['t5'] although other examples have one" in p
               for p in find_problems(source, progress=False))


def test_missing_fields_are_listing_problems(tmp_path):
    records = inpaint_records(3)
    del records[1]["mask_path"]
    records[2]["prompt"] = " "
    source = open_source(write_json_set(tmp_path, records))
    assert len(source) == 1
    assert any("line 2" in p and "'mask_path'" in p for p in source.listing_problems)
    assert any("line 3" in p and "prompt" in p for p in source.listing_problems)


def test_edit_set_and_prompt_lists(tmp_path):
    edit = open_source(write_json_set(tmp_path / "edit", [
        {"image_path": "img/0.png", "instruction": "make it blue"},
        {"image_path": "img/1.png", "target_path": "img/1_t.png", "prompt": "add a hat"}]))
    assert edit.kind == "edit" and "mask" not in edit[0] and edit[0]["prompt"] == "make it blue"
    assert edit[1]["target"].shape == (SIZE, SIZE, 3)
    assert edit.fields == {"image", "prompt"}  # no mask, and only one record has a target
    (tmp_path / "prompts.txt").write_text("a cat\n\n a dog \n")
    prompts = open_source(tmp_path / "prompts.txt")
    assert prompts.kind == "prompts" and [prompts[i]["prompt"] for i in range(2)] == ["a cat", "a dog"]
    assert prompts.fields == {"prompt"}
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "x", "target_text": "X"}\n')
    assert open_source(tmp_path / "prompts.jsonl")[0]["target_text"] == "X"


def test_unknown_paths_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(DataError, match="unknown dataset suffix '.csv'"):
        open_source(tmp_path / "data.csv")
    with pytest.raises(DataError, match="self_bench.txt"):
        open_source(tmp_path)


LATIN1_PROMPT = "caf\xe9 sign".encode("latin-1")  # é as one latin-1 byte: not UTF-8


@pytest.mark.parametrize("name, listing", [
    ("bench/self_bench.txt", b"1 ok\n2 " + LATIN1_PROMPT + b"\n"),
    ("data.jsonl", b'{"prompt": "ok"}\n{"prompt": "' + LATIN1_PROMPT + b'"}\n'),
    ("data.json", b'[{"prompt": "ok"},\n {"prompt": "' + LATIN1_PROMPT + b'"}]'),
    ("prompts.txt", b"ok\n" + LATIN1_PROMPT + b"\n"),
])
def test_listing_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, name, listing):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(listing)
    offset = listing.index(b"\xe9")
    with pytest.raises(DataError) as raised:
        open_source(path.parent if name.endswith("self_bench.txt") else path)
    assert raised.value.problems == [f"{path}: byte offset {offset} (line 2, byte 0xe9) is not valid UTF-8 "
                                     f"(invalid continuation byte); expected a UTF-8 text file"]


@pytest.mark.parametrize("name, listing, expected", [
    ("bench/self_bench.txt", "# header only\n\n  \n# 1 commented out\n", "no samples listed (only blank or '#'"),
    ("data.jsonl", "\n\n", "no samples listed; expected one JSON object per line"),
    ("data.json", "[]", "no samples listed; expected a list of JSON objects"),
    ("prompts.txt", " \n\n", "no samples listed (only blank lines)"),
])
def test_listing_without_samples_is_a_problem(tmp_path, name, listing, expected):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(listing)
    source = open_source(path.parent if name.endswith("self_bench.txt") else path)
    assert len(source) == 0
    assert len(source.listing_problems) == 1 and source.listing_problems[0].startswith(f"{path}: {expected}")
    assert find_problems(source, progress=False) == source.listing_problems


@pytest.mark.parametrize("kind", ["box", "brush", "text", "mixed"])
def test_generated_masks_are_deterministic_nonempty_and_leave_context(kind):
    for index in range(20):
        mask = masks.generate(kind, 3, index, 24, 40)
        assert mask.shape == (24, 40, 1) and mask.dtype == np.float32
        assert 0 < mask.sum() < mask.size and set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(mask, masks.generate(kind, 3, index, 24, 40))
    assert not np.array_equal(masks.generate(kind, 3, 0, 24, 40), masks.generate(kind, 4, 0, 24, 40))


def test_synthetic_examples_are_deterministic_and_the_prompt_names_the_fill():
    source = synthetic.SyntheticSource(12, resolution=32, seed=5)
    for index in range(12):
        example = source[index]
        again = synthetic.synthetic_example(5, index, 32)
        np.testing.assert_array_equal(example["target"], again["target"])
        changed = np.any(example["image"] != example["target"], axis=-1)
        assert changed.any() and not changed[example["mask"][..., 0] == 0].any()  # only inside the box
        if example["target_text"] is None:
            colour, shape = example["prompt"].split()[1:]
            assert colour in synthetic.COLOURS and shape in synthetic.SHAPES
            assert (example["target"][changed] == synthetic.COLOURS[colour]).all(axis=-1).mean() > 0.9
        else:
            assert example["prompt"] == f'text "{example["target_text"]}"'
    other = synthetic.SyntheticSource(12, resolution=32, seed=6)
    assert any(other[i]["prompt"] != source[i]["prompt"] for i in range(12))


def test_synthetic_fields_and_target_text_only_for_text_sets():
    assert synthetic.SyntheticSource(4).fields == {"prompt", "image", "mask", "target"}
    text_only = synthetic.SyntheticSource(4, kinds=("text",))
    assert text_only.fields == {"prompt", "image", "mask", "target", "target_text"}
    assert all(text_only[i]["target_text"] for i in range(4))


def test_formats_does_not_import_the_tfds_builder():
    code = "import jax_inpaint_rl.data.formats, sys; print('jax_inpaint_rl.data.tfds_builder' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
