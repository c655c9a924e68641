"""Every recipe in configs/ builds and runs two tiny steps with a tiny model of its family; the
inpaint CLI restores what a run exported."""
import glob
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jax_inpaint_rl import train
from jax_inpaint_rl.data.loader import prepare
from jax_inpaint_rl.report import to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "base.py"))


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_version(config, output_dir):
    """The recipe with its model swapped for a tiny one and every size cut to the minimum."""
    config.output_dir = str(output_dir)
    config.model.tiny = True
    config.model.path = ""
    config.model.compute_dtype = "float32"
    config.data.format = "synthetic"
    config.data.resolution = 32
    config.data.num_examples = 8
    config.data.num_eval_examples = 2
    config.sample.num_steps = config.sample.eval_num_steps = 2
    config.sample.images_per_prompt = 2
    config.sample.prompts_per_batch = 2
    config.sample.batches_per_epoch = 1
    config.sample.window_size = min(config.sample.window_size, 1)
    config.sample.window_max_start = min(config.sample.window_max_start, 1)
    config.train.num_epochs = 1
    config.train.warmup_steps = 1
    config.train.autoencoder_steps = 0
    config.train.minibatch_size = 2
    config.train.timestep_fraction = 1.0
    config.eval.interval = 1
    config.mesh.data, config.mesh.fsdp = 1, 1
    config.reward.specs = {"reference_similarity": {"weight": 1.0}}
    return config


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_two_tiny_steps(recipe, tmp_path):
    config = tiny_version(load_recipe(recipe), tmp_path / recipe)
    runner = train.Run(config)
    summary = runner.fit()
    assert np.isfinite(summary["eval_reward_final"])
    assert int(runner.state["step"]) >= 2 and int(runner.state["skipped"]) == 0
    assert os.path.isdir(os.path.join(config.output_dir, "export", "denoiser"))
    if recipe == "demo":
        _inpaint_cli_on(config.output_dir, tmp_path)


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
