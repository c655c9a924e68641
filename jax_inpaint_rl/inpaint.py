"""python -m jax_inpaint_rl.inpaint: fill masked regions with a trained checkpoint.

    python -m jax_inpaint_rl.inpaint --checkpoint RUN/export --image a.png --mask m.png \\
        --prompt "..." --out out.png [--steps 28 --guidance 30 --seed 0 --use-ema]
    python -m jax_inpaint_rl.inpaint --checkpoint RUN/export --batch data.jsonl --out-dir results/

`--batch` takes anything `jax_inpaint_rl.data.open_source` reads (self_bench
folder, JSON / JSONL). Results are composited: outside the mask the source is
kept exactly. Sampling is deterministic (ODE / DDIM eta = 0) for a given seed.
"""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image
from tqdm import tqdm

from jax_inpaint_rl import programs, report
from jax_inpaint_rl.checkpoint.export import read_export
from jax_inpaint_rl.data import open_source
from jax_inpaint_rl.data.formats import read_image, read_mask
from jax_inpaint_rl.data.loader import prepare
from jax_inpaint_rl.diffusion.steps import Sampler

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "An export folder (<output_dir>/export of a training run).")
flags.DEFINE_string("image", None, "Source image.")
flags.DEFINE_string("mask", None, "Mask image: white (> 127) = fill.")
flags.DEFINE_string("prompt", None, "What to put in the masked region.")
flags.DEFINE_string("out", None, "Output PNG (single-image mode).")
flags.DEFINE_string("batch", None, "A dataset (self_bench folder, JSON / JSONL) to inpaint in full.")
flags.DEFINE_string("out_dir", None, "Output folder (batch mode): <id>.png per example.")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's sample.eval_num_steps).")
flags.DEFINE_float("guidance", None, "Guidance scale (default: the run's sample.guidance_scale).")
flags.DEFINE_integer("seed", 0, "Initial-noise seed.")
flags.DEFINE_integer("batch_size", 4, "Images per device call in batch mode.")
flags.DEFINE_bool("use_ema", False, "Use the EMA weights of the export.")


class Inpainter:
    """The trained family with its programs compiled once; call it on prepared examples."""

    def __init__(self, checkpoint: str, steps: int | None, guidance: float | None, use_ema: bool):
        self.family, params, self.config = read_export(checkpoint, use_ema)
        self.resolution = self.config.data.resolution
        self.latent_shape = self.family.latent_shape(self.resolution, self.resolution)
        steps = steps or self.config.sample.eval_num_steps
        guidance = self.config.sample.guidance_scale if guidance is None else guidance
        schedule = programs.make_schedule(self.family, self.config, steps, self.latent_shape)
        policy = programs.make_policy(self.family, self.config, schedule, Sampler(self.config.sample.sampler, 0.0),
                                      guidance)
        self.denoiser = params[self.family.denoiser_key]
        self.others = {k: v for k, v in params.items() if k != self.family.denoiser_key}
        self.encode, self.decode = programs.make_encode(self.family), programs.make_decode(self.family)
        self.sample = programs.make_sample(policy)
        self.window = np.zeros(steps, np.float32)

    def __call__(self, examples: list[dict], seed: int) -> np.ndarray:
        """Prepared examples (images in [-1, 1]) -> composited uint8 results."""
        prompts = [e["prompt"] for e in examples]
        image = jnp.asarray(np.stack([e["image"] for e in examples]))
        mask = jnp.asarray(np.stack([e["mask"] for e in examples]))
        tokens, negative = self.family.tokenize(prompts), self.family.tokenize([""] * len(prompts))
        cond = self.encode(self.others, tokens, negative, image, mask)
        x_init = jax.random.normal(jax.random.key(seed), (len(examples), *self.latent_shape))
        trajectory = self.sample({}, self.denoiser, cond, x_init, jax.random.key(seed), self.window)
        return report.to_uint8(self.decode(self.others, trajectory.latents[:, -1], image, mask))


def _single_example(image_path: str, mask_path: str, prompt: str, resolution: int) -> dict:
    example = {"prompt": prompt, "image": read_image(Path(image_path)), "mask": read_mask(Path(mask_path))}
    if example["image"].shape[:2] != example["mask"].shape[:2]:
        raise ValueError(f"{mask_path}: mask is {example['mask'].shape[:2]}, image {image_path} is "
                         f"{example['image'].shape[:2]}: expected the same size")
    return prepare(example, (resolution, resolution), None)


def main(argv) -> None:
    del argv
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    inpainter = Inpainter(FLAGS.checkpoint, FLAGS.steps, FLAGS.guidance, FLAGS.use_ema)
    if FLAGS.batch:
        if not FLAGS.out_dir:
            raise app.UsageError("--batch needs --out_dir")
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        source = open_source(FLAGS.batch)
        for start in tqdm(range(0, len(source), FLAGS.batch_size), desc="inpainting"):
            indices = range(start, min(start + FLAGS.batch_size, len(source)))
            examples = [prepare(source[i], (inpainter.resolution,) * 2, None) for i in indices]
            for example, result in zip(examples, inpainter(examples, FLAGS.seed + start)):
                Image.fromarray(result).save(os.path.join(FLAGS.out_dir, f"{example['id']}.png"))
        return
    missing = [name for name in ("image", "mask", "prompt", "out") if getattr(FLAGS, name) is None]
    if missing:
        raise app.UsageError(f"single-image mode needs --{', --'.join(missing)} (or use --batch)")
    example = _single_example(FLAGS.image, FLAGS.mask, FLAGS.prompt, inpainter.resolution)
    Image.fromarray(inpainter([example], FLAGS.seed)[0]).save(FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
