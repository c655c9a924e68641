"""GRPO for diffusion: PPO-clip on per-step transition ratios, plus KL to the reference.

Log-probs are means over dims, so ratios stay close to 1 and the clip range is
tiny (1e-4). The KL between two Gaussian steps that share a std is the squared
mean difference over 2 std^2, with std = sigma_t sqrt(-dt) (REFERENCE_MATH.md 3).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.diffusion.steps import mean_over_dims, per_sample


class GRPOTerms(NamedTuple):
    loss: jax.Array
    policy_loss: jax.Array
    kl: jax.Array
    ratio: jax.Array  # (B,)
    clip_fraction: jax.Array
    approx_kl: jax.Array


def _masked_mean(values, weights):
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def gaussian_step_kl(mean, ref_mean, std):
    """(B,) KL(N(mean, std^2) || N(ref_mean, std^2)) averaged over dims; 0 where std == 0."""
    std = per_sample(std, mean)
    safe = jnp.where(std > 0, std, 1.0)
    per_dim = jnp.where(std > 0, (mean - ref_mean) ** 2 / (2 * safe**2), 0.0)
    return mean_over_dims(per_dim)


def grpo_loss(log_prob, old_log_prob, advantages, *, clip_range: float, adv_clip_max: float = 5.0,
              kl_beta: float = 0.0, mean=None, ref_mean=None, std=None, weights=None) -> GRPOTerms:
    """L = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))) + beta KL, per sample.

    weights (B,) mask out samples that carry no signal or no stochastic step.
    """
    weights = jnp.ones_like(log_prob) if weights is None else weights.astype(jnp.float32)
    advantages = jnp.clip(advantages, -adv_clip_max, adv_clip_max)
    ratio = jnp.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = _masked_mean(jnp.maximum(unclipped, clipped), weights)
    if kl_beta > 0:
        kl = _masked_mean(gaussian_step_kl(mean, jax.lax.stop_gradient(ref_mean), std), weights)
    else:
        kl = jnp.zeros((), jnp.float32)
    log_ratio = jax.lax.stop_gradient(log_prob - old_log_prob)
    return GRPOTerms(
        loss=policy_loss + kl_beta * kl,
        policy_loss=policy_loss,
        kl=kl,
        ratio=jax.lax.stop_gradient(ratio),
        clip_fraction=_masked_mean((jnp.abs(log_ratio) > jnp.log1p(clip_range)).astype(jnp.float32), weights),
        approx_kl=_masked_mean(0.5 * log_ratio**2, weights),
    )


def train_step_indices(key, batch: int, window, fraction: float = 1.0, mode: str = "first"):
    """(B, K) step indices each sample trains on, drawn from the stochastic window steps.

    mode 'first': the first floor(n * fraction) window steps, in order;
    'shuffle': a random permutation per sample, truncated to that count;
    'one': a single random window step per sample (one-step GRPO, seed 000).
    `window` is a host (T,) 0/1 array, so K is static.
    """
    window_steps = np.flatnonzero(np.asarray(window) > 0)
    if window_steps.size == 0:
        raise ValueError("the SDE window has no stochastic step to train on")
    count = 1 if mode == "one" else max(1, int(window_steps.size * fraction))
    steps = jnp.asarray(window_steps)
    if mode == "first":
        return jnp.broadcast_to(steps[:count], (batch, count))
    if mode in ("shuffle", "one"):
        keys = jax.random.split(key, batch)
        return jax.vmap(lambda k: jax.random.permutation(k, steps)[:count])(keys)
    raise ValueError(f"timestep mode {mode!r}: expected 'first', 'shuffle' or 'one'")
