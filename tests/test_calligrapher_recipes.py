"""The Calligrapher recipes trained tiny on CPU: GRPO and NFT for 2 epochs and SFT, on seed 000's self_bench
triplets (the loader's style crop in every batch), with test_recipes.py's tiny conversion; the run's export
becomes ip-adapter.bin (export-calligrapher), and the inpaint CLI samples with --reference and self-reference."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from absl import app as absl_app
from PIL import Image

from jax_inpaint_rl import inpaint, train
from jax_inpaint_rl.data.loader import prepare
from jax_inpaint_rl.report import to_uint8
from tests import test_recipes
from tools.convert_weights import calligrapher as convert

RES = test_recipes.RES

pytestmark = pytest.mark.slow  # whole training runs: CI's second stage (README, Tests)


def tiny_recipe(name: str, output_dir, epochs: int):
    config = test_recipes.tiny_version(test_recipes.load_recipe(name), output_dir)
    assert config.data.format == "self_bench" and config.model.family == "calligrapher"
    config.train.num_epochs = epochs
    return config


@pytest.mark.parametrize("name,epochs", [("calligrapher_grpo", 2), ("calligrapher_nft", 2), ("calligrapher_sft", 1)])
def test_recipe_trains_the_adapter(name, epochs, tmp_path):
    config = tiny_recipe(name, tmp_path / name, epochs)
    runner = train.fit(config)
    assert np.isfinite(runner.summary["eval_reward_final"])
    assert int(runner.state["step"]) >= 1 and int(runner.state["skipped"]) == 0
    assert set(runner.state["params"]) == {"image_proj", "ip_attention"}, "only the adapter is trained"
    assert "style_image" in runner.loaders["train"].fields
    export = os.path.join(config.output_dir, "export")
    assert os.path.isdir(os.path.join(export, "denoiser"))
    if name == "calligrapher_sft":
        return
    assert runner.epoch == epochs and len([h for h in runner.history if "reward_mean" in h]) == epochs
    # the run's adapter -> ip-adapter.bin (standard layout, Q-Former kept beside it), equal to what was trained
    path = convert.export_adapter(export, str(tmp_path / "bin"))
    state = torch.load(path, weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter", "image_proj_qformer"}
    trained = np.asarray(runner.state["params"]["ip_attention"]["single"]["to_v_ip"]["kernel"][1])
    np.testing.assert_array_equal(state["ip_adapter"]["3.to_v_ip.weight"].numpy(), trained.T)  # layer 2 + 1
    ema = torch.load(convert.export_adapter(export, str(tmp_path / "ema.bin"), use_ema=True), weights_only=True)
    assert not torch.equal(ema["image_proj"]["proj.2.weight"], state["image_proj"]["proj.2.weight"])
    if name == "calligrapher_grpo":
        _inpaint_with_a_reference(config.output_dir, tmp_path)
        _inpaint_a_batch(config, tmp_path)


def _inpaint_with_a_reference(run_dir, tmp_path):
    """--reference letterboxes a style image; without it the source's mask box is the reference; the result keeps
    the source outside the mask and is the source's size (the strip is cropped off)."""
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    mask = np.zeros((48, 40), np.uint8)
    mask[10:22, 4:36] = 255
    reference = rng.integers(0, 256, (12, 50, 3), dtype=np.uint8)
    for file, image in (("source.png", source), ("mask.png", mask), ("ref.png", reference)):
        Image.fromarray(image).save(tmp_path / file)
    inpainter = inpaint.Inpainter(os.path.join(run_dir, "export"), steps=2, guidance=None, use_ema=False)
    family = inpainter.family
    with_ref = inpaint.single_example(family.inputs, "Hello", RES, str(tmp_path / "source.png"),
                                      str(tmp_path / "mask.png"), str(tmp_path / "ref.png"), family.style_resolution)
    itself = inpaint.single_example(family.inputs, "Hello", RES, str(tmp_path / "source.png"),
                                    str(tmp_path / "mask.png"), None, family.style_resolution)
    size = family.style_resolution
    assert with_ref["style_image"].shape == itself["style_image"].shape == (size, size, 3)
    assert (with_ref["style_image"][0] == -1).all(), "a wide reference is letterboxed: black rows above it"
    assert not np.array_equal(with_ref["style_image"], itself["style_image"])
    results = inpainter([with_ref, itself], seed=0)
    assert results.shape == (2, RES, RES, 3)
    with pytest.raises(absl_app.UsageError, match="missing --mask"):
        inpaint.single_example(family.inputs, "x", RES, str(tmp_path / "source.png"))
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "jax_inpaint_rl.inpaint", f"--checkpoint={run_dir}/export",
         f"--image={tmp_path / 'source.png'}", f"--mask={tmp_path / 'mask.png'}", f"--reference={tmp_path / 'ref.png'}",
         "--prompt=Hello", f"--out={out}", "--steps=2"], cwd=test_recipes.ROOT, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(out))
    expected = prepare({"prompt": "", "image": source, "mask": (mask[..., None] > 127).astype(np.float32)},
                       (RES, RES), None)
    outside = expected["mask"][..., 0] < 0.5
    assert image.shape == (RES, RES, 3) and outside.any()
    np.testing.assert_array_equal(image[outside], to_uint8(expected["image"])[outside])


def _inpaint_a_batch(config, tmp_path):
    """--batch on the self_bench set: each example's style image is its target's mask box, as training crops it;
    an example without a target takes the source's mask box (the single-image self-reference)."""
    inpainter = inpaint.Inpainter(os.path.join(config.output_dir, "export"), steps=2, guidance=None, use_ema=False)
    source = inpaint.open_batch(config.data.path)
    written = inpaint.run_batch(inpainter, source, str(tmp_path / "batch"), 2, seed=0)
    assert len(written) == len(source) and all(os.path.exists(path) for path in written)
    size = inpainter.family.style_resolution
    example = source[0]
    from_target = inpaint.batch_example(example, RES, size)
    training = prepare(example, (RES, RES), size)
    np.testing.assert_array_equal(from_target["style_image"], training["style_image"])
    without_target = inpaint.batch_example({k: v for k, v in example.items() if k != "target"}, RES, size)
    np.testing.assert_array_equal(without_target["style_image"], inpaint.self_reference(without_target, size, "x"))
    assert not np.array_equal(without_target["style_image"], from_target["style_image"])


def test_reference_is_refused_by_families_without_a_style_image(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(absl_app.UsageError, match="--reference would be ignored"):
        inpaint.single_example(("image", "mask"), "x", RES, str(tmp_path / "a.png"), str(tmp_path / "a.png"),
                               str(tmp_path / "a.png"))
