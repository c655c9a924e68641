"""Every recipe in configs/ builds and trains with a tiny model of its family, on tiny data in the recipe's
own format (seed 001's JSONL with precomputed T5 embeddings, a self_bench folder, an edit set, a prompt
list, a Flow-GRPO prompt folder); the inpaint CLI restores what a run exported."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app as absl_app
from PIL import Image

from jax_inpaint_rl import inpaint, rewards, setup, train
from jax_inpaint_rl.data import synthetic
from jax_inpaint_rl.data.loader import prepare
from jax_inpaint_rl.report import to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the Calligrapher recipes train with this file's tiny_version in test_calligrapher_recipes.py (with their exports);
# the VLM policy's recipe (its own policy kind, not a denoiser run) in test_vlm_policy_loop.py
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "base.py", "qwen_edit_vlm_grpo.py")
                 and not os.path.basename(p).startswith("calligrapher_"))
RES, EXAMPLES = 32, 4

pytestmark = pytest.mark.slow  # whole training runs: CI's second stage (README, Tests)


@rewards.register("test_saturation")
def make_saturation():
    """A reward that reads the images only (edit and text-to-image recipes have no mask or reference)."""
    def saturation(images, prompts, meta):
        pixels = images.astype(np.float32) / 255.0
        return {"score": (pixels.max(-1) - pixels.min(-1)).mean(axis=(1, 2))}

    return saturation


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_data(folder, kind: str, seed: int, targets: bool, t5_width: int | None) -> str:
    """Synthetic examples as files in a seed's format; the path the recipe's data.path takes."""
    os.makedirs(folder, exist_ok=True)
    examples = [synthetic.synthetic_example(seed, i, RES, ("shape",)) for i in range(EXAMPLES)]
    if kind == "txt" and not targets:
        path = os.path.join(folder, "prompts.txt")
        with open(path, "w") as f:
            f.write("\n".join(e["prompt"] for e in examples) + "\n")
        return path
    if kind == "self_bench":
        lines = []
        for number, e in enumerate(examples, 1):
            for role, image in (("source", e["image"]), ("ref", e["target"]), ("mask", e["mask"][..., 0] * 255)):
                Image.fromarray(np.asarray(image, np.uint8)).save(os.path.join(folder, f"test{number:02d}_{role}.png"))
            lines.append(f"{number}\t{e['prompt']}")
        with open(os.path.join(folder, "self_bench.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return str(folder)
    records = []
    for number, e in enumerate(examples):
        record = {("instruction" if kind == "edit" else "prompt"): e["prompt"]}
        if kind != "txt":
            record["image_path"] = f"{number}.png"
            Image.fromarray(e["image"]).save(os.path.join(folder, record["image_path"]))
        if kind == "inpaint":
            record["mask_path"] = f"{number}_mask.png"
            Image.fromarray((e["mask"][..., 0] * 255).astype(np.uint8)).save(os.path.join(folder, record["mask_path"]))
        if targets:
            record["target_path"] = f"{number}_target.png"
            Image.fromarray(e["target"]).save(os.path.join(folder, record["target_path"]))
        if t5_width:  # seed 001's precomputed T5 embeddings
            record["t5_embedding_path"] = f"{number}_t5.npy"
            np.save(os.path.join(folder, record["t5_embedding_path"]),
                    np.random.default_rng(number).standard_normal((6, t5_width)).astype(np.float32))
        records.append(record)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def tiny_version(config, output_dir):
    """The recipe with its model swapped for a tiny one, every size cut to the minimum, and data written in its
    format: targets only where the recipe learns toward them, T5 embeddings for Flux JSONL (seed 001)."""
    config.output_dir = str(output_dir)
    config.model.tiny = True
    config.model.path = ""
    config.model.compute_dtype = config.model.param_dtype = "float32"
    config.data.resolution = RES
    config.sample.num_steps = config.sample.eval_num_steps = 2
    config.sample.images_per_prompt = 2
    config.sample.prompts_per_batch = 2
    config.sample.batches_per_epoch = 1
    config.sample.window_size = min(config.sample.window_size, 1)
    config.sample.window_max_start = min(config.sample.window_max_start, 1)
    config.train.num_epochs = 1
    config.train.autoencoder_steps = 0
    config.train.minibatch_size = 2
    config.train.timestep_fraction = 1.0
    config.eval.interval = 1
    config.mesh.data, config.mesh.fsdp = 1, 1
    if config.data.format == "synthetic":
        config.data.num_examples, config.data.num_eval_examples = 8, 2
        config.train.warmup_steps = 1  # the recipe's own reward: synthetic data has what the demo's reads
        return config
    family, _ = setup.build_family(config)
    kind = {("image", "mask"): "inpaint", ("image",): "edit", (): "txt"}[
        tuple(field for field in family.inputs if field != "style_image")]
    kind = "self_bench" if config.data.format == "self_bench" else kind
    targets = config.train.method in ("sft", "grpo_one_step") or config.train.warmup_steps > 0
    config.train.warmup_steps = min(config.train.warmup_steps, 1)
    t5_width = 32 if "t5" in family.text_embeddings and kind == "inpaint" else None
    if config.data.format == "flow_grpo":  # one folder, train.txt and test.txt
        for split, seed in (("train", 0), ("test", 1)):
            os.replace(write_data(output_dir / split, kind, seed, False, None), output_dir / f"{split}.txt")
        config.data.path, config.data.eval_path = str(output_dir), ""
    else:
        config.data.path = write_data(output_dir / "train", kind, 0, targets, t5_width)
        config.data.eval_path = write_data(output_dir / "eval", kind, 1, targets, t5_width)
    config.reward.specs = ({"seam": {"weight": 1.0}} if "mask" in family.inputs else
                           {"test_saturation": {"weight": 1.0}})
    return config


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_with_a_tiny_model(recipe, tmp_path):
    config = tiny_version(load_recipe(recipe), tmp_path / recipe)
    if recipe.startswith(("sd3_", "qwen_")):  # 2 epochs: the second samples with updated weights
        config.train.num_epochs = 2
    if recipe == "sd3_inpaint_grpo":  # pasting from the noised source: 1 of the 2 steps, still on-policy
        config.sample.strength = 0.5
    runner = train.fit(config)
    assert np.isfinite(runner.summary["eval_reward_final"])
    assert int(runner.state["step"]) >= config.train.num_epochs and int(runner.state["skipped"]) == 0
    assert os.path.isdir(os.path.join(config.output_dir, "export", "denoiser"))
    if "embedding:t5" in runner.loaders["train"].fields:  # seed 001's JSONL: T5 never loaded, its embeddings used
        assert "text_encoder_2" not in runner.frozen_params
    if recipe == "demo":
        _inpaint_cli_on(config.output_dir, tmp_path)
    if config.train.method == "grpo":  # on-policy before the first update, up to the rounding of two programs
        lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
        assert [line for line in lines if "first_ratio_deviation" in line][0]["first_ratio_deviation"] < 1e-4
    if recipe in ("flux_kontext_grpo", "flux_dev_grpo", "sd3_grpo", "qwen_edit_grpo"):
        _edit_and_generate_with(config.output_dir, tmp_path)


@pytest.mark.parametrize("recipe", ["qwen_edit_grpo", "qwen_edit_nft", "qwen_edit_sft"])
def test_qwen_edit_recipes_train_on_inpainting_triplets(recipe, tmp_path):
    """The Qwen-Image-Edit recipes on (image, mask, prompt) triplets: the edit-inpaint family pastes the source
    outside the mask, the run stays on-policy and exports."""
    config = load_recipe(recipe)
    config.model.family = "qwen_image_edit_inpaint"
    config = tiny_version(config, tmp_path / recipe)
    config.train.num_epochs = 2
    runner = train.fit(config)
    assert runner.family.paste_region is not None and "mask" in runner.loaders["train"].fields
    assert np.isfinite(runner.summary["eval_reward_final"]) and int(runner.state["skipped"]) == 0
    assert os.path.isdir(os.path.join(config.output_dir, "export", "denoiser"))
    if config.train.method == "grpo":
        lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
        assert [line for line in lines if "first_ratio_deviation" in line][0]["first_ratio_deviation"] < 1e-4


def _edit_and_generate_with(run_dir, tmp_path):
    """The inpaint entry point reads what the family reads: an edit takes an image and no mask, text-to-image
    the prompt alone; anything else is refused by name."""
    inpainter = inpaint.Inpainter(os.path.join(run_dir, "export"), steps=2, guidance=None, use_ema=False)
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(tmp_path / "source.png")
    Image.fromarray(np.full((40, 48), 255, np.uint8)).save(tmp_path / "mask.png")
    image = str(tmp_path / "source.png") if "image" in inpainter.family.inputs else None
    example = inpaint.single_example(inpainter.family.inputs, "make it red", RES, image)
    assert inpainter([example], seed=0).shape == (1, RES, RES, 3)
    with pytest.raises(absl_app.UsageError, match="--mask would be ignored"):
        inpaint.single_example(inpainter.family.inputs, "x", RES, image, str(tmp_path / "mask.png"))
    if image:
        with pytest.raises(absl_app.UsageError, match="missing --image"):
            inpaint.single_example(inpainter.family.inputs, "x", RES)


def _inpaint_cli_on(run_dir, tmp_path):
    """The CLI restores the export and keeps the source exactly outside the mask."""
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    mask = np.zeros((48, 40), np.uint8)
    mask[10:30, 12:28] = 255
    Image.fromarray(source).save(tmp_path / "source.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "jax_inpaint_rl.inpaint", f"--checkpoint={run_dir}/export",
         f"--image={tmp_path / 'source.png'}", f"--mask={tmp_path / 'mask.png'}", "--prompt=a red circle",
         f"--out={out}", "--steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(out))
    expected = prepare({"prompt": "", "image": source, "mask": (mask[..., None] > 127).astype(np.float32)},
                       (32, 32), None)
    outside = expected["mask"][..., 0] < 0.5
    assert image.shape == (32, 32, 3) and outside.any()
    np.testing.assert_array_equal(image[outside], to_uint8(expected["image"])[outside])
    bad = subprocess.run([sys.executable, "-m", "jax_inpaint_rl.inpaint", f"--checkpoint={tmp_path}/nowhere",
                          "--image=a.png", "--mask=m.png", "--prompt=x", f"--out={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not an inference export" in bad.stderr
