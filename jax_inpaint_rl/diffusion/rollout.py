"""Sampling whole trajectories with log-probs, and re-scoring stored transitions.

`rollout` runs every step of a schedule inside one `lax.scan`, so a jitted
rollout compiles the denoiser once whatever the number of steps. Trajectories are
batch-major (B, T, ...) so the batch axis can be sharded over the `data` mesh
axis from sampling through training.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.diffusion.schedules import Schedule, num_steps, take_steps
from jax_inpaint_rl.diffusion.steps import Sampler, StepOutput


class Trajectory(NamedTuple):
    latents: jax.Array  # (B, T + 1, ...): x at every time, initial noise first, clean sample last
    log_probs: jax.Array  # (B, T) log-prob of each transition under the sampling params
    means: jax.Array  # (B, T, ...) mean of each transition
    stds: jax.Array  # (B, T)
    model_t: jax.Array  # (T,) denoiser time of each step
    window: jax.Array  # (T,) 1 where the step was stochastic (trainable), 0 where deterministic


def initial_noise(key, num_groups: int, group_size: int, latent_shape, same_per_group: bool = False):
    """Gaussian starting latents, group-major (sample i is in group i // group_size).

    With `same_per_group` every member of a group starts from the same noise, so
    reward differences within a group come from the SDE alone.
    """
    if same_per_group:
        noise = jax.random.normal(key, (num_groups, 1, *latent_shape), jnp.float32)
        noise = jnp.broadcast_to(noise, (num_groups, group_size, *latent_shape))
    else:
        noise = jax.random.normal(key, (num_groups, group_size, *latent_shape), jnp.float32)
    return noise.reshape(num_groups * group_size, *latent_shape)


def sde_window(total_steps: int, start: int = 0, size: int | None = None) -> np.ndarray:
    """(T,) float mask, 1 for steps start .. start + size - 1 (all steps when size is None)."""
    size = total_steps - start if size is None else size
    if not (0 <= start and size > 0 and start + size <= total_steps):
        raise ValueError(f"SDE window start={start} size={size} does not fit in {total_steps} steps")
    window = np.zeros(total_steps, np.float32)
    window[start:start + size] = 1.0
    return window


def random_sde_window(key, total_steps: int, size: int, max_start: int) -> jax.Array:
    """A window of `size` steps starting uniformly in [0, max_start] (Flow-GRPO-Fast / MixGRPO)."""
    start = jax.random.randint(key, (), 0, max_start + 1)
    steps = jnp.arange(total_steps)
    return ((steps >= start) & (steps < start + size)).astype(jnp.float32)


def pasted(sample, region, source, x_init, sigma_next):
    """`sample` inside `region`, the source latents noised to sigma_next with the initial noise outside
    (x_t = (1 - sigma) x0 + sigma eps: diffusers' scale_noise, as its SD3 inpainting pipeline pastes)."""
    return region * sample + (1 - region) * ((1 - sigma_next) * source + sigma_next * x_init)


def rollout(denoise, params, cond, x_init, schedule: Schedule, sampler: Sampler, key, window=None,
            paste=None) -> Trajectory:
    """Run all steps from `x_init`; `denoise(params, x, t, cond)` is already guided.

    `window` (T,) scales the sampler's noise per step (None = SDE everywhere). `paste` (region, source
    latents): a family that generates only a region (Family.paste_region); the trajectory starts from the source
    noised to the first step's sigma with `x_init` as the noise (pure noise at sigma 1; a schedule cut by
    `schedules.from_strength` starts part-way, as diffusers' inpainting `strength`), outside the region each
    step's sample is replaced by the source noised to the next sigma, and the log-probs cover the region alone.
    """
    total = num_steps(schedule)
    window = jnp.ones((total,), jnp.float32) if window is None else jnp.asarray(window, jnp.float32)
    batch = x_init.shape[0]
    noise = x_init.astype(jnp.float32)
    region = None if paste is None else paste[0]
    x_start = noise if paste is None else pasted(noise, 0.0, paste[1], noise, schedule["sigma"][0])

    def one_step(x, inputs):
        coeffs, step_window, step_key = inputs
        t = jnp.broadcast_to(coeffs["model_t"], (batch,))
        model_out = denoise(params, x, t, cond)
        out = sampler.step(model_out, x, coeffs, window=step_window, key=step_key, region=region)
        if paste is not None:
            out = out._replace(sample=pasted(out.sample, *paste, noise, coeffs["sigma_next"]))
        return out.sample, (out.sample, out.log_prob, out.mean, out.std)

    keys = jax.random.split(key, total)
    x_final, (samples, log_probs, means, stds) = jax.lax.scan(one_step, x_start, (schedule, window, keys))
    del x_final
    latents = jnp.concatenate([x_start[None], samples], axis=0)
    batch_major = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731
    return Trajectory(batch_major(latents), batch_major(log_probs), batch_major(means), batch_major(stds),
                      schedule["model_t"], window)


def score_transitions(denoise, params, cond, latents, next_latents, step_index, schedule: Schedule,
                      sampler: Sampler, window, region=None) -> StepOutput:
    """Re-evaluate stored transitions x_j -> x_{j+1} under `params` (per-sample step j).

    latents, next_latents: (B, ...); step_index: (B,) int; `region` as the rollout's paste had it. Returns
    the step's log-prob, mean and std for each sample: the quantities GRPO's ratio and KL use.
    """
    coeffs = take_steps(schedule, step_index)
    model_out = denoise(params, latents, coeffs["model_t"], cond)
    step_window = jnp.take(jnp.asarray(window, jnp.float32), step_index)
    return sampler.step(model_out, latents, coeffs, window=step_window, next_sample=next_latents, region=region)


def gather_steps(trajectory: Trajectory, step_index):
    """(x_j, x_{j+1}, log_prob_j) for per-sample step indices (B,)."""
    rows = jnp.arange(step_index.shape[0])
    return (trajectory.latents[rows, step_index], trajectory.latents[rows, step_index + 1],
            trajectory.log_probs[rows, step_index])
