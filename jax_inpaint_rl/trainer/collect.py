"""Collection: turn loader batches into what an algorithm trains on.

Rollout algorithms: `batches_per_epoch` batches of k samples per prompt from the
algorithm's collection program, decoded, scored by the rewards on the host (in a
worker thread, while the next batch samples), and group advantages. Algorithms
that learn from the dataset (SFT): loader batches with their target latents.
The device values stay on the device; the host reads decoded images only.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_inpaint_rl import report
from jax_inpaint_rl.algorithms import advantages as adv_lib
from jax_inpaint_rl.algorithms.base import Algorithm
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.trainer.run import Run


def repeat_rows(batch: dict, times: int) -> dict:
    """Each prompt's example `times` times in a row (group-major), lists and nested dicts included."""
    def repeat(value):
        if isinstance(value, dict):
            return {k: repeat(v) for k, v in value.items()}
        if isinstance(value, list):
            return [v for v in value for _ in range(times)]
        return np.repeat(value, times, axis=0)

    return {name: repeat(value) for name, value in batch.items()}


def condition(run: Run, batch: dict) -> tuple[dict, dict]:
    """(cond in the family's guidance layout, the family's inputs on the device) for a host batch."""
    family = run.family
    inputs = {name: np.asarray(batch[name], np.float32) for name in family.inputs}
    tokens = family.tokenize(batch["prompt"], inputs)
    negative = ({} if not family.guidance.needs_negative
               else family.tokenize([family.negative_prompt] * len(batch["prompt"]), inputs))
    embeddings = {name: np.asarray(value, np.float32) for name, value in batch.get("embeddings", {}).items()
                  if name in family.text_embeddings}
    tokens, negative, inputs, embeddings = run.shard((tokens, negative, inputs, embeddings))
    return run.programs.encode(run.frozen_params, tokens, negative, inputs, embeddings), inputs


def host_images(run: Run, latents, inputs) -> np.ndarray:
    """This host's decoded (and, for inpainting, composited) images as uint8: what rewards and grids see."""
    return report.to_uint8(mesh_lib.host_rows(run.programs.decode(run.frozen_params, latents, inputs)))


def reward_meta(batch: dict, group_size: int) -> dict:
    """The loader's fields under the names rewards read (images as uint8), only those the data has (target_text
    when every row has one), and
    'group': (B,) ids of the rows that share a prompt (consecutive runs of group_size)."""
    names = {"mask": "mask", "image": "source", "target": "reference", "target_text": "target_text",
             "metadata": "metadata"}
    meta = {name: batch[field] for field, name in names.items() if field in batch}
    if any(text is None for text in meta["target_text"]):  # sets without texts: a reward needing them says so
        del meta["target_text"]
    meta["group"] = np.arange(len(batch["prompt"])) // group_size
    for name in ("source", "reference"):
        if name in meta:
            meta[name] = report.to_uint8(meta[name])
    return meta


def latent_mask(mask, latent_shape) -> jax.Array:
    """The fill mask averaged over each latent cell, (B, h, w, 1): SFT's per-region loss weights for any
    family whose latents keep the image grid (a UNet's, or Flux's packed tokens)."""
    b, height, width, _ = mask.shape
    h, w = latent_shape[:2]
    return mask.reshape(b, h, height // h, w, width // w, 1).mean(axis=(2, 4))


def target_latents(run: Run, batch: dict):
    return run.programs.encode_image(run.frozen_params, run.shard(np.asarray(batch["target"], np.float32)))


def dataset(run: Run, count: int) -> dict:
    """`count` loader batches (train.minibatch_size examples each) with their target latents: an SFT epoch."""
    batches = []
    for _ in range(count):
        batch = next(run.loaders["sft"])
        cond, inputs = condition(run, batch)
        micro_batch = {"x0": target_latents(run, batch), "cond": cond}
        if "mask" in inputs:
            micro_batch["latent_mask"] = latent_mask(inputs["mask"], run.latent_shape)
        batches.append(micro_batch)
    return {"batches": batches}


def epoch(run: Run, algorithm: Algorithm, key) -> tuple[dict, dict]:
    """(collected epoch, record): rollouts for algorithms with a collection program, else dataset batches for
    batches_per_epoch optimizer steps."""
    if algorithm.sampler is not None:
        return rollouts(run, algorithm, key)
    train = run.config.train
    count = run.config.sample.batches_per_epoch * train.gradient_accumulation_steps
    return dataset(run, count), {"samples": count * train.minibatch_size}


def rollouts(run: Run, algorithm: Algorithm, key) -> tuple[dict, dict]:
    """(collected epoch, reward record): samples, cond, rewards, advantages and windows of every rollout."""
    s = run.config.sample
    window_key, *batch_keys = jax.random.split(key, 1 + s.batches_per_epoch)
    sample_window, train_window = algorithm.windows(window_key, schedules.kept_steps(s.num_steps, s.strength))
    sampling_params = run.state[algorithm.sample_from]
    groups_per_batch = s.prompts_per_batch * jax.process_count()
    pieces, pending, loader_valid = [], [], []
    run.rewards.take_busy_seconds()  # count this epoch's scoring only
    for batch_key in tqdm(batch_keys, desc=f"epoch {run.epoch} rollout", leave=False, disable=len(batch_keys) < 2):
        batch = repeat_rows(next(run.loaders["train"]), s.images_per_prompt)
        cond, inputs = condition(run, batch)
        noise_key, sample_key = jax.random.split(batch_key)
        start = {"noise": rollout_lib.initial_noise(noise_key, groups_per_batch, s.images_per_prompt,
                                                    run.latent_shape, s.same_noise_per_group)}
        if "target" in algorithm.needs:
            start["x0"] = target_latents(run, batch)
        samples, clean = run.programs.sample(run.denoiser_base, sampling_params, cond, run.shard(start), sample_key,
                                             sample_window)
        images = host_images(run, clean, inputs)
        # scored in a worker thread while the next batch is rolled out
        pending.append(run.rewards.submit(images, batch["prompt"], reward_meta(batch, s.images_per_prompt)))
        pieces.append({"samples": samples, "cond": cond})
        loader_valid.append(np.asarray(batch.get("valid", np.ones(len(images), bool))))
    wait_start = time.time()
    scores = [future.result() for future in pending]
    reward_wait_s = time.time() - wait_start
    parts = {name: np.concatenate([mesh_lib.all_hosts(score[name]) for score in scores]) for name in scores[0]}
    valid = np.concatenate([mesh_lib.all_hosts(v) for v in loader_valid]) & (parts.pop("valid") > 0)
    rewards = np.where(valid, parts.pop("score"), 0.0).astype(np.float32)
    collected = {**jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *pieces),
                 "rewards": rewards, "train_window": train_window}
    collected.update(_advantages(run.config, rewards, valid, groups_per_batch * s.batches_per_epoch))
    kept = rewards[valid]
    record = {"samples": len(rewards), "reward_mean": kept.mean(), "reward_std": kept.std(),
              "reward_wait_s": reward_wait_s,
              "reward_compute_s": run.rewards.take_busy_seconds(), "invalid_samples": int((~valid).sum()),
              "advantage_abs_mean": float(np.abs(collected["advantages"]).mean()),
              "kept_fraction": float(np.mean(collected["keep"]))}
    for name, values in parts.items():
        record[f"reward/{name}_mean"], record[f"reward/{name}_std"] = values[valid].mean(), values[valid].std()
    return collected, record


def _advantages(config, rewards, valid, num_groups: int) -> dict:
    a, s = config.advantage, config.sample
    adv = adv_lib.group_advantages(jnp.asarray(rewards), adv_lib.group_ids_for(num_groups, s.images_per_prompt),
                                   num_groups, baseline="group" if a.per_prompt_stat_tracking else "batch",
                                   std=a.std, clip=config.train.adv_clip_max, valid=jnp.asarray(valid),
                                   drop_zero_signal=a.drop_zero_signal)
    return {"advantages": adv.advantages, "keep": adv.keep}
