"""Bad inputs outside the data package: a batch to inpaint, parameter files and folders, checkpoint steps.

Each is refused before any work with one error that names the file (or step) and what was expected.
"""
import glob
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jax_inpaint_rl import inpaint
from jax_inpaint_rl.checkpoint.manager import CheckpointError, Checkpointer
from jax_inpaint_rl.data import open_source
from jax_inpaint_rl.data.loader import prepare
from jax_inpaint_rl.models import params_io
from jax_inpaint_rl.models.sd15 import family as sd15_family
from tests.test_data_formats import box_mask_array, inpaint_records, save_png, write_json_set

RES = 8


class FakeInpainter:
    """What run_batch uses of an Inpainter: family.inputs, resolution, and a call that records its batches."""

    def __init__(self, inputs=("image", "mask")):
        self.family = types.SimpleNamespace(inputs=inputs, style_resolution=0)
        self.resolution = RES
        self.calls = []

    def __call__(self, examples, seed):
        self.calls.append((examples, seed))
        return np.stack([np.full((RES, RES, 3), len(self.calls), np.uint8) for _ in examples])


def records(count):
    return [{key: value for key, value in record.items() if key != "t5_embedding_path"}
            for record in inpaint_records(count)]


def broken_batch(folder):
    """Three examples: a mask of another size than its image, an unreadable image, and a good one."""
    listing = write_json_set(folder, records(3))
    save_png(folder / "img/0_mask.png", box_mask_array(8, 12))
    (folder / "img/1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return listing, [f"{folder / 'img/0_mask.png'}: mask is 12x8 but the image {folder / 'img/0.png'} is 16x16; "
                     "expected the same size",
                     f"{folder / 'img/1.png'}: cannot decode image"]


def test_batch_with_any_bad_example_is_refused_before_anything_is_written(tmp_path):
    listing, expected = broken_batch(tmp_path / "data")
    inpainter, out_dir = FakeInpainter(), tmp_path / "out"
    with pytest.raises(inpaint.BatchRefused) as refused:
        inpaint.run_batch(inpainter, open_source(listing), str(out_dir), batch_size=2, seed=0)
    assert len(refused.value.problems) == 2
    for problem, text in zip(refused.value.problems, expected):
        assert problem.startswith(text), refused.value.problems
    assert inpainter.calls == [] and not out_dir.exists()


def test_batch_lacking_a_field_the_family_reads_is_refused(tmp_path):
    listing = write_json_set(tmp_path, [{"image_path": "img/0.png", "prompt": "make it blue"}])
    with pytest.raises(inpaint.BatchRefused, match=r"no \['mask'\] in every example; this checkpoint's family "
                                                   r"reads \['prompt', 'image', 'mask'\]"):
        inpaint.run_batch(FakeInpainter(), open_source(listing), str(tmp_path / "out"), batch_size=2, seed=0)
    assert not (tmp_path / "out").exists()


def test_good_batch_is_sampled_in_order_with_per_batch_seeds(tmp_path):
    source = open_source(write_json_set(tmp_path / "data", records(3)))
    inpainter, out_dir = FakeInpainter(), tmp_path / "out"
    written = inpaint.run_batch(inpainter, source, str(out_dir), batch_size=2, seed=10)
    assert written == [str(out_dir / f"{i}.png") for i in range(3)]
    assert [([e["id"] for e in examples], seed) for examples, seed in inpainter.calls] == [(["0", "1"], 10),
                                                                                           (["2"], 12)]
    expected = prepare(source[2], (RES, RES), None)
    np.testing.assert_array_equal(inpainter.calls[1][0][0]["mask"], expected["mask"])


def test_cli_lists_every_problem_and_exits_nonzero(tmp_path, monkeypatch):
    listing, expected = broken_batch(tmp_path / "data")
    (tmp_path / "data" / "img/2_mask.png").unlink()
    expected.append(f"{tmp_path / 'data' / 'img/2_mask.png'}: mask file does not exist")
    monkeypatch.setattr(inpaint, "Inpainter", lambda *args: FakeInpainter())
    out_dir = tmp_path / "out"
    inpaint.FLAGS(["inpaint", "--checkpoint=unused", f"--batch={listing}", f"--out_dir={out_dir}"])
    try:
        with pytest.raises(SystemExit) as exited:
            inpaint.main([])
    finally:
        inpaint.FLAGS.unparse_flags()
    lines = str(exited.value.code).splitlines()
    assert len(lines) == 4 and all(line.startswith(text) for line, text in zip(lines, expected)), lines
    assert lines[-1] == f"{listing}: 3 problem(s); nothing sampled, nothing written to {out_dir}"
    assert not out_dir.exists()


def test_cli_refuses_a_listing_that_cannot_be_read(tmp_path, monkeypatch):
    listing = tmp_path / "data.jsonl"
    listing.write_bytes(b'{"prompt": "caf\xe9"}\n')
    monkeypatch.setattr(inpaint, "Inpainter", lambda *args: FakeInpainter())
    inpaint.FLAGS(["inpaint", "--checkpoint=unused", f"--batch={listing}", f"--out_dir={tmp_path / 'out'}"])
    try:
        with pytest.raises(SystemExit) as exited:
            inpaint.main([])
    finally:
        inpaint.FLAGS.unparse_flags()
    assert str(exited.value.code).startswith(f"{listing}: byte offset 15 (line 1, byte 0xe9) is not valid UTF-8")


def test_truncated_safetensors_file_is_named(tmp_path):
    path = tmp_path / "params" / "unet.safetensors"
    path.parent.mkdir()
    params_io.save_params(str(path), {"unet": {"conv": {"kernel": np.ones((3, 3, 4, 8), np.float32)}}})
    data = path.read_bytes()
    for length in (len(data) - 16, 4):  # data cut short; header cut short
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match=f"^{path}: truncated or corrupt safetensors file"):
            params_io.load_params(path.parent)


def write_marker(folder, family):
    folder.mkdir(exist_ok=True)
    (folder / f"{family}.json").write_text(json.dumps({"family": family, "dtype": "bfloat16", "source": "/src"}))
    return folder


def test_folder_of_another_family_says_what_it_holds(tmp_path):
    flux = write_marker(tmp_path / "flux", "flux_fill")
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxFillPipeline"}))
    with pytest.raises(ValueError) as raised:
        sd15_family.load(str(flux))
    assert str(raised.value) == (f"{flux}: this folder holds flux_fill (flux_fill.json: bfloat16, converted from "
                                 "/src); asked to load it as sd15_inpaint: pass a folder converted for sd15_inpaint")
    sd15 = write_marker(tmp_path / "sd15", "sd15_inpaint")
    with pytest.raises(ValueError, match="holds sd15_inpaint .*asked to load it as flux_fill"):
        params_io.check_family(sd15, "flux_fill")
    params_io.check_family(sd15, "sd15_inpaint")
    write_marker(sd15, "flux_dev")
    with pytest.raises(ValueError, match="holds flux_dev .* and sd15_inpaint .*; asked to load it as sd15_inpaint"):
        params_io.check_family(sd15, "sd15_inpaint")
    assert params_io.family_markers(tmp_path) == {}  # no marker: left to the configs and the shape check
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        params_io.check_family(tmp_path / "nowhere", "sd15_inpaint")


def saved_steps(folder):
    """A Checkpointer with steps 10 and 20 saved (state + step), and the state's structure to restore into."""
    like = {"w": jnp.arange(600.0).reshape(6, 100), "b": {"x": jnp.ones(3)}}
    checkpointer = Checkpointer(str(folder), keep=3, async_save=False)
    for step in (10, 20):
        checkpointer.save(step, {"w": like["w"] + step, "b": {"x": like["b"]["x"] + step}}, {"step": step})
    checkpointer.wait()
    return checkpointer, like


def test_corrupt_checkpoint_step_names_the_step_and_offers_earlier_ones(tmp_path):
    checkpointer, like = saved_steps(tmp_path / "checkpoints")
    assert checkpointer.steps() == [10, 20]
    chunks = glob.glob(str(tmp_path / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d" / "*"))
    largest = max(chunks, key=os.path.getsize)  # the array data
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    folder = tmp_path / "checkpoints" / "20"
    with pytest.raises(CheckpointError) as raised:
        checkpointer.restore(20, like)
    message = str(raised.value)
    assert message.startswith(f"{folder}: cannot restore checkpoint step 20: it is corrupt or incomplete"), message
    assert message.endswith("an earlier step can be chosen (saved steps: [10, 20]; e.g. "
                            "checkpoint.resume_step=10)"), message
    assert "\n" not in message and "TensorStore" not in message and len(message) < 800, message
    assert raised.value.__cause__ is None and raised.value.__context__ is None
    state, meta = checkpointer.restore(10, like)
    np.testing.assert_array_equal(state["w"], like["w"] + 10)
    assert meta == {"step": 10} and checkpointer.meta(20) == {"step": 20}
    with pytest.raises(CheckpointError, match=r"no checkpoint step 30 in .* \(saved steps: \[10, 20\]\)"):
        checkpointer.restore(30, like)
    checkpointer.close()
