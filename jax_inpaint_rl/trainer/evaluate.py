"""Evaluation: deterministic samples on the held-out set, their mean reward, and a PNG grid of the columns
the data has (source | mask | result | target)."""
import os

import jax
import numpy as np

from jax_inpaint_rl import report
from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.trainer.collect import condition, host_images, reward_meta
from jax_inpaint_rl.trainer.run import Run

EVAL_NOISE_SEED_OFFSET = 7919  # the same initial noise at every evaluation of a run


def grid_row(batch: dict, index: int, result: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """One example's grid cells and their titles, for the fields this data has."""
    cells, titles = [], []
    if "image" in batch:
        cells.append(report.to_uint8(batch["image"][index]))
        titles.append("source")
    if "mask" in batch:
        cells.append(report.to_uint8(batch["mask"][index] * 2 - 1))
        titles.append("mask")
    cells.append(result)
    titles.append("result")
    if "target" in batch:
        cells.append(report.to_uint8(batch["target"][index]))
        titles.append("target")
    return cells, titles


def evaluate(run: Run, tag: str) -> float:
    """Mean reward of deterministic samples (EMA params when kept) over the held-out set; writes eval_<tag>.png."""
    config, loader = run.config, run.loaders["eval"]
    params = run.state["ema"] if "ema" in run.state else run.state["params"]
    window = np.zeros(schedules.kept_steps(config.sample.eval_num_steps, config.sample.strength), np.float32)
    scores, rows, titles = [], [], []
    for index in range(loader.steps_per_epoch):
        batch = loader.batch_at(0, index)
        cond, inputs = condition(run, batch)
        noise = jax.random.normal(jax.random.key(config.seed + EVAL_NOISE_SEED_OFFSET),
                                  (len(batch["prompt"]) * jax.process_count(), *run.latent_shape))
        _, clean = run.programs.sample_eval(run.denoiser_base, params, cond, run.shard({"noise": noise}),
                                            jax.random.key(0), window)
        images = host_images(run, clean, inputs)
        result = run.rewards(images, batch["prompt"], reward_meta(batch, group_size=1))
        valid = np.asarray(batch.get("valid", np.ones(len(images), bool))) & (result["valid"] > 0)
        scores.append(mesh_lib.all_hosts(result["score"])[mesh_lib.all_hosts(valid)])
        for i in range(min(len(images), config.eval.num_grid - len(rows))):
            cells, titles = grid_row(batch, i, images[i])
            rows.append(cells)
    if jax.process_index() == 0 and rows:
        report.save_grid(os.path.join(config.output_dir, f"eval_{tag}.png"), rows, titles)
    return float(np.concatenate(scores).mean())
