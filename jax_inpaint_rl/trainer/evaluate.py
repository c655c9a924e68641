"""Evaluation: deterministic samples on the held-out set, the means of their reward and of every part the
rewards report, a PNG grid (the source with the mask outlined | result | target, the prompt under each row)
and the grid's rows as arrays (for the comparison of a run's arms, report.save_comparison)."""
import os

import jax
import numpy as np

from jax_inpaint_rl import report
from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.trainer.collect import condition, host_images, reward_meta
from jax_inpaint_rl.trainer.run import Run

EVAL_NOISE_SEED_OFFSET = 7919  # the same initial noise at every evaluation of a run


def grid_fields(batch: dict, index: int, result: np.ndarray, score: float) -> dict:
    """One example's grid fields as uint8 images (those the data has), its prompt and its result's reward."""
    fields = {"prompt": batch["prompt"][index], "result": result, "score": score}
    for name in ("image", "mask", "target"):
        if name in batch:
            value = batch[name][index]
            fields[name] = report.to_uint8(value * 2 - 1 if name == "mask" else value)
    return fields


def evaluate(run: Run, tag: str) -> dict:
    """Means over the held-out set (EMA params when kept): 'reward' and every reward part ('<name>/<key>'),
    with 'examples' (how many were scored); writes eval_<tag>.png and eval_<tag>.npz (the grid's rows), named
    in 'grid' and 'results'."""
    config, loader = run.config, run.loaders["eval"]
    params = run.state["ema"] if "ema" in run.state else run.state["params"]
    window = np.zeros(schedules.kept_steps(config.sample.eval_num_steps, config.sample.strength), np.float32)
    parts, rows = [], []
    for index in range(loader.steps_per_epoch):
        batch = loader.batch_at(0, index)
        cond, inputs = condition(run, batch)
        noise = jax.random.normal(jax.random.key(config.seed + EVAL_NOISE_SEED_OFFSET),
                                  (len(batch["prompt"]) * jax.process_count(), *run.latent_shape))
        _, clean = run.programs.sample_eval(run.denoiser_base, params, cond, run.shard({"noise": noise}),
                                            jax.random.key(0), window)
        images = host_images(run, clean, inputs)
        result = run.rewards(images, batch["prompt"], reward_meta(batch, group_size=1))
        valid = mesh_lib.all_hosts(np.asarray(batch.get("valid", np.ones(len(images), bool))) & (result["valid"] > 0))
        parts.append({name: mesh_lib.all_hosts(value)[valid] for name, value in result.items() if name != "valid"})
        for i in range(min(len(images), config.eval.num_grid - len(rows))):
            rows.append(grid_fields(batch, i, images[i], float(result["score"][i])))
    means = {name: float(np.concatenate([p[name] for p in parts]).mean()) for name in parts[0]}
    summary = {"reward": means.pop("score"), **means, "examples": int(sum(len(p["score"]) for p in parts)),
               "grid": f"eval_{tag}.png", "results": f"eval_{tag}.npz"}
    if jax.process_index() == 0 and rows:
        report.save_results(os.path.join(config.output_dir, summary["results"]), rows)
        report.save_eval_grid(os.path.join(config.output_dir, summary["grid"]), rows)
    return summary
