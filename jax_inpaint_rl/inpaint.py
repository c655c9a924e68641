"""python -m jax_inpaint_rl.inpaint: inpaint, edit or generate with a trained checkpoint.

    python -m jax_inpaint_rl.inpaint --checkpoint RUN/export --image a.png --mask m.png \\
        --prompt "..." --out out.png [--steps 28 --guidance 30 --seed 0 --use_ema]
    python -m jax_inpaint_rl.inpaint --checkpoint RUN/export --image a.png --prompt "make it red" --out out.png
    python -m jax_inpaint_rl.inpaint --checkpoint RUN/export --prompt "a red door" --out out.png
    python -m jax_inpaint_rl.inpaint --checkpoint RUN/export --batch data.jsonl --out_dir results/
    python -m jax_inpaint_rl.inpaint --checkpoint RUN/export --image a.png --mask m.png --prompt "Hello" \
        [--reference style.png] --out out.png      (a family that reads a style image: Calligrapher)

The family of the run decides what it reads: an inpainting family an image and a
mask (the result keeps the source exactly outside the mask), an edit family an
image, a text-to-image family the prompt only. A family that reads a style image
(Calligrapher) takes `--reference`, letterboxed onto black at the family's
`style_resolution`; without it, the source cropped to the mask's bounding box
(self-reference). `--batch` takes anything
`jax_inpaint_rl.data.open_source` reads and checks all of it first, as
`python -m jax_inpaint_rl.data.check` does: with any problem (a mask of another
size than its image, an unreadable file, ...) it lists every one, writes nothing
and exits 1. Sampling is deterministic (ODE / DDIM eta = 0) for a given seed.
"""
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image
from tqdm import tqdm

from jax_inpaint_rl import programs, report
from jax_inpaint_rl.algorithms.base import rollout_program
from jax_inpaint_rl.data import DataError, find_problems, open_source
from jax_inpaint_rl.data.formats import read_image, read_mask
from jax_inpaint_rl.data.loader import prepare, style_crop, to_unit_range
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.setup import read_export

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "An export folder (<output_dir>/export of a training run).")
flags.DEFINE_string("image", None, "Source image (inpainting and edit families).")
flags.DEFINE_string("mask", None, "Mask image: white (> 127) = fill (inpainting families).")
flags.DEFINE_string("reference", None, "Style reference image (families that read a style image, e.g. "
                    "Calligrapher); default: the source cropped to the mask's box.")
flags.DEFINE_string("prompt", None, "What to put in the masked region, the edit instruction, or the image to make.")
flags.DEFINE_string("out", None, "Output PNG (single-image mode).")
flags.DEFINE_string("batch", None, "A dataset (self_bench folder, JSON / JSONL, .txt prompts) to run in full.")
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
        policy = programs.make_policy(self.family, self.family.schedule(steps, self.latent_shape),
                                      Sampler(self.config.sample.sampler, 0.0), guidance)
        self.denoiser = params[self.family.denoiser_key]
        self.others = {k: v for k, v in params.items() if k != self.family.denoiser_key}
        self.encode, self.decode = programs.make_encode(self.family), programs.make_decode(self.family)
        self.sample = rollout_program(policy, lambda base, denoiser: denoiser)
        self.window = np.zeros(steps, np.float32)

    def __call__(self, examples: list[dict], seed: int) -> np.ndarray:
        """Prepared examples (images in [-1, 1]) -> uint8 results (composited for inpainting families)."""
        family, prompts = self.family, [e["prompt"] for e in examples]
        inputs = {name: jnp.asarray(np.stack([e[name] for e in examples])) for name in family.inputs}
        tokens = family.tokenize(prompts, inputs)
        negative = ({} if not family.guidance.needs_negative
                   else family.tokenize([family.negative_prompt] * len(prompts), inputs))
        cond = self.encode(self.others, tokens, negative, inputs, {})
        noise = jax.random.normal(jax.random.key(seed), (len(examples), *self.latent_shape))
        _, clean = self.sample({}, self.denoiser, cond, {"noise": noise}, jax.random.key(seed), self.window)
        return report.to_uint8(self.decode(self.others, clean, inputs))


def single_example(inputs: tuple[str, ...], prompt: str, resolution: int, image_path: str | None = None,
                   mask_path: str | None = None, reference_path: str | None = None,
                   style_resolution: int = 0) -> dict:
    """The example the flags describe, checked against what the family reads. A family reading 'style_image'
    gets the reference letterboxed onto black at `style_resolution`, or without one the (fitted) source inside
    the mask's bounding box."""
    given = {"image": image_path, "mask": mask_path}
    missing = [f"--{name}" for name in inputs if not given.get(name) and name != "style_image"]
    unused = [f"--{name}" for name, path in given.items() if path and name not in inputs]
    if reference_path and "style_image" not in inputs:
        unused.append("--reference")
    if missing or unused:
        raise app.UsageError(f"this checkpoint's family reads {['prompt', *inputs]}: "
                             + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                       unused and f"{', '.join(unused)} would be ignored"])))
    example = {"prompt": prompt}
    if image_path:
        example["image"] = read_image(Path(image_path))
    if mask_path:
        example["mask"] = read_mask(Path(mask_path))
        if example["image"].shape[:2] != example["mask"].shape[:2]:
            raise ValueError(f"{mask_path}: mask is {example['mask'].shape[:2]}, image {image_path} is "
                             f"{example['image'].shape[:2]}: expected the same size")
    prepared = prepare(example, (resolution, resolution), None)
    if "style_image" in inputs:
        if reference_path:
            reference = read_image(Path(reference_path))
            whole = np.ones(reference.shape[:2] + (1,), np.float32)
            prepared["style_image"] = to_unit_range(style_crop(reference, whole, style_resolution))
        else:
            prepared["style_image"] = self_reference(prepared, style_resolution, f"{mask_path}: pass --reference")
    return prepared


def self_reference(prepared: dict, style_resolution: int, where: str) -> np.ndarray:
    """The style image when no reference is given: the fitted source inside the mask's bounding box."""
    if not prepared["mask"].any():
        raise ValueError(f"the mask is empty: no region to take the self-reference from ({where})")
    source = np.round((prepared["image"] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    return to_unit_range(style_crop(source, prepared["mask"], style_resolution))


def batch_example(example: dict, resolution: int, style_resolution: int) -> dict:
    """One --batch example as the family reads it: a style image (when it reads one) from the example's target
    inside the mask's box, as training crops it, or without a target from the source."""
    with_target = style_resolution and "target" in example
    prepared = prepare(example, (resolution, resolution), style_resolution if with_target else None)
    if style_resolution and not with_target:
        prepared["style_image"] = self_reference(prepared, style_resolution, f"example {example['id']}")
    return prepared


class BatchRefused(DataError):
    """The --batch source has problems, found before sampling: nothing was written."""


def open_batch(path: str):
    """The --batch source; a listing that cannot be read refuses the batch."""
    try:
        return open_source(path)
    except DataError as error:
        raise BatchRefused(error.problems) from None


def batch_problems(source, inputs: tuple[str, ...]) -> list[str]:
    """Every problem of the source (data.find_problems), and the fields the family reads that it lacks."""
    problems = []
    missing = sorted(set(inputs) - set(source.fields) - {"style_image"})  # style: the target's or source's crop
    if missing:
        problems.append(f"{source.name}: no {missing} in every example; this checkpoint's family reads "
                        f"{['prompt', *inputs]}")
    return problems + find_problems(source)


def run_batch(inpainter, source, out_dir: str, batch_size: int, seed: int) -> list[str]:
    """Write <id>.png per example to out_dir and return the paths; raise BatchRefused with every problem of the
    source before anything is written (a partial batch, or a mask resampled to its image, is worse than none)."""
    problems = batch_problems(source, inpainter.family.inputs)
    if problems:
        raise BatchRefused(problems)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for start in tqdm(range(0, len(source), batch_size), desc="sampling"):
        indices = range(start, min(start + batch_size, len(source)))
        examples = [batch_example(source[i], inpainter.resolution, inpainter.family.style_resolution)
                    for i in indices]
        for example, result in zip(examples, inpainter(examples, seed + start)):
            written.append(os.path.join(out_dir, f"{example['id']}.png"))
            Image.fromarray(result).save(written[-1])
    return written


def main(argv) -> None:
    del argv
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    inpainter = Inpainter(FLAGS.checkpoint, FLAGS.steps, FLAGS.guidance, FLAGS.use_ema)
    if FLAGS.batch:
        if not FLAGS.out_dir:
            raise app.UsageError("--batch needs --out_dir")
        try:
            written = run_batch(inpainter, open_batch(FLAGS.batch), FLAGS.out_dir, FLAGS.batch_size, FLAGS.seed)
        except BatchRefused as refused:  # every problem, not the first 50 of DataError's message
            sys.exit("\n".join([*refused.problems, f"{FLAGS.batch}: {len(refused.problems)} problem(s); nothing "
                                 f"sampled, nothing written to {FLAGS.out_dir}"]))
        print(f"wrote {len(written)} images to {FLAGS.out_dir}")
        return
    if FLAGS.prompt is None or FLAGS.out is None:
        raise app.UsageError("single-image mode needs --prompt and --out (or use --batch)")
    example = single_example(inpainter.family.inputs, FLAGS.prompt, inpainter.resolution, FLAGS.image, FLAGS.mask,
                             FLAGS.reference, inpainter.family.style_resolution)
    Image.fromarray(inpainter([example], FLAGS.seed)[0]).save(FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
