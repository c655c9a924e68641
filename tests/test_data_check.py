"""Validation: every bad input is reported at once (check CLI) and stops the loader at start-up."""
import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from jax_inpaint_rl.data import DataError, Loader, check, loaders_from_config, open_source
from tests.test_data_formats import (box_mask_array, image_array, inpaint_records, save_png, write_json_set,
                                     write_self_bench)


def broken_json_set(folder):
    """One record per problem; returns the listing and {problem: text the report must contain}."""
    records = inpaint_records(10)
    listing = write_json_set(folder, records)
    (folder / "img/0.png").unlink()  # missing file
    (folder / "img/1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt image
    save_png(folder / "img/2_mask.png", box_mask_array(8, 12))  # mask size != image size
    save_png(folder / "img/3_mask.png", np.full((16, 16), 100, np.uint8))  # empty after > 127
    save_png(folder / "img/4_mask.png", np.full((16, 16), 255, np.uint8))  # all ones
    np.save(folder / "img/5.npy", np.zeros((4, 9), np.float32))  # wrong embedding shape
    records[6]["prompt"] = ""  # missing prompt
    records[7]["id"] = records[8]["id"] = "twin"  # duplicate id
    records[9]["t5_embedding_path"] = "img/9.pt"  # a torch file
    (folder / "img/9.pt").write_bytes(b"torch")
    listing.write_text("\n".join(json.dumps(r) for r in records))
    expected = {
        "missing file": f"{folder / 'img/0.png'}: image file does not exist",
        "corrupt image": f"{folder / 'img/1.png'}: cannot decode image",
        "mask size": f"{folder / 'img/2_mask.png'}: mask is 12x8 but the image",
        "empty mask": f"{folder / 'img/3_mask.png'}: mask is empty",
        "all-ones mask": f"{folder / 'img/4_mask.png'}: mask covers the whole image",
        "embedding shape": f"{folder / 'img/5.npy'}: embedding 't5' has shape (4, 9), expected (4, 8)",
        "missing prompt": "line 7: missing or empty 'prompt'",
        "duplicate id": "duplicate id 'twin'",
        "torch embedding": "convert_embeddings.py",
    }
    return listing, expected


def test_check_reports_every_problem_at_once_and_exits_nonzero(tmp_path, capsys):
    listing, expected = broken_json_set(tmp_path)
    assert check.main([str(listing)]) == 1
    report = capsys.readouterr().out
    missing = {name: text for name, text in expected.items() if text not in report}
    assert not missing, f"not reported: {missing}\n{report}"
    assert "9 problem(s)" in report.splitlines()[-1]


def test_loader_raises_the_same_problems_at_start_up(tmp_path):
    listing, expected = broken_json_set(tmp_path)
    with pytest.raises(DataError) as raised:
        Loader(open_source(listing), prompts_per_batch=2, resolution=16)
    assert all(any(text in problem for problem in raised.value.problems) for text in expected.values())


def test_check_prints_the_kind_and_the_fields(tmp_path, capsys):
    listing = write_json_set(tmp_path / "inpaint", inpaint_records(2))
    assert check.main([str(listing)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{listing}: inpaint set, 2 examples, fields: embedding:t5, image, mask, prompt, 0 problem(s)")
    edit = write_json_set(tmp_path / "edit", [{"image_path": f"img/{i}.png", "prompt": "p"} for i in range(3)])
    assert check.main([str(edit)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{edit}: edit set, 3 examples, fields: image, prompt (no mask: inpainting families cannot train on it), "
        f"0 problem(s)")


def test_check_says_what_a_family_and_targets_need(tmp_path, capsys):
    """An edit set checked for flux_fill: the missing mask is a problem that names the family; with --targets
    the missing targets too; seed 001's t5 embeddings pass for Flux and fail for SD1.5."""
    edit = write_json_set(tmp_path / "edit", [{"image_path": f"img/{i}.png", "prompt": "p"} for i in range(3)])
    assert check.main([str(edit), "--family", "flux_fill", "--targets"]) == 1
    report = capsys.readouterr().out
    assert f"{edit}: no 'mask' in every example; flux_fill reads it" in report
    assert f"{edit}: no 'target' in every example; --targets asks for it" in report
    assert check.main([str(edit), "--family", "flux_kontext"]) == 0
    capsys.readouterr()
    inpaint = write_json_set(tmp_path / "inpaint", inpaint_records(2))  # with t5 embeddings
    assert check.main([str(inpaint), "--family", "flux_fill"]) == 0
    capsys.readouterr()
    assert check.main([str(inpaint), "--family", "sd15_inpaint"]) == 1
    assert "precomputed embeddings ['t5'] are not inputs of sd15_inpaint" in capsys.readouterr().out
    assert check.main([str(inpaint), "--family", "calligrapher"]) == 1  # its style image: the target's mask box
    report = capsys.readouterr().out
    assert f"{inpaint}: no 'target' in every example; calligrapher's style image is cropped from it" in report
    assert "style_image" not in report


def test_expected_embedding_shape_from_the_command_line(tmp_path, capsys):
    listing = write_json_set(tmp_path, inpaint_records(2))
    assert check.main([str(listing), "--embedding-shape", "t5=4x8"]) == 0
    assert check.main([str(listing), "--embedding-shape", "t5=77x8"]) == 1
    assert "expected (77, 8) (as expected)" in capsys.readouterr().out


def test_self_bench_problems_and_cli_exit_status(tmp_path):
    folder = write_self_bench(tmp_path / "bench", ["1 fine", "2 twin", "02 twin again", "3 gone", "bad line"])
    (folder / "test03_ref.png").unlink()
    save_png(folder / "test01_ref.png", image_array(0, 20, 16))
    result = subprocess.run([sys.executable, "-m", "jax_inpaint_rl.data.check", str(folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    for text in ("test01_ref.png: target is 16x20 but the image", "duplicate id '2'",
                 "test03_ref.png: image file does not exist", "line 5: 'bad line' is not"):
        assert text in result.stdout, result.stdout
    good = write_self_bench(tmp_path / "good", ["1 fine", "2 also fine"])
    assert check.main([str(good)]) == 0


def test_listing_that_is_not_utf8_fails_the_check_and_the_trainer_loader(tmp_path, capsys):
    folder = write_self_bench(tmp_path / "bench", ["1 fine"])
    (folder / "self_bench.txt").write_bytes(b"1 fine\n2 caf\xe9\n")
    expected = f"{folder / 'self_bench.txt'}: byte offset 12 (line 2, byte 0xe9) is not valid UTF-8"
    assert check.main([str(folder)]) == 1
    assert expected in capsys.readouterr().out
    config = types.SimpleNamespace(format="self_bench", path=str(folder), eval_path="", resolution=16)
    with pytest.raises(DataError, match=re.escape(expected)):
        loaders_from_config(config, prompts_per_batch=1, seed=0)


def test_self_bench_without_samples_fails_the_check_and_the_loader(tmp_path, capsys):
    folder = write_self_bench(tmp_path / "bench", ["# nothing yet", ""])
    assert check.main([str(folder)]) == 1
    report = capsys.readouterr().out
    assert f"{folder / 'self_bench.txt'}: no samples listed" in report, report
    assert report.splitlines()[-1] == f"{folder}: inpaint set, 0 examples, fields: prompt, 1 problem(s)"
    with pytest.raises(DataError, match="no samples listed"):
        Loader(open_source(folder), prompts_per_batch=1, resolution=16)
