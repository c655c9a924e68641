"""DiffusionNFT: learn from positive and implicit-negative velocity mixtures.

Rollouts come from the 'old' params with a deterministic solver; training
re-noises the clean sample and asks the mixture v+ = beta v + (1 - beta) v_old to
denoise well where the reward was high and v- = (1 + beta) v_old - beta v where it
was low (REFERENCE_MATH.md 3, advantage modes of seed 004).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_inpaint_rl.diffusion.steps import mean_over_dims, per_sample

ADV_MODES = ("normal", "positive_only", "negative_only", "one_only", "binary")
WEIGHT_FLOOR = 1e-5


class NFTTerms(NamedTuple):
    loss: jax.Array
    policy_loss: jax.Array
    kl: jax.Array
    positive_loss: jax.Array
    negative_loss: jax.Array
    reward_weight: jax.Array  # (B,) r in [0, 1]


def transform_advantages(advantages, mode: str, adv_clip_max: float):
    """The seed's --nft_adv_mode, applied before the [0, 1] normalisation."""
    if mode == "normal":
        return jnp.clip(advantages, -adv_clip_max, adv_clip_max)
    if mode == "positive_only":
        return jnp.clip(advantages, 0.0, adv_clip_max)
    if mode == "negative_only":
        return jnp.clip(advantages, -adv_clip_max, 0.0)
    if mode == "one_only":
        return jnp.where(advantages > 0, 1.0, 0.0)
    if mode == "binary":
        return jnp.sign(advantages)
    raise ValueError(f"nft adv_mode {mode!r}: expected one of {ADV_MODES}")


def reward_weight(advantages, mode: str, adv_clip_max: float):
    """r = clip(A / M / 2 + 0.5, 0, 1): 1 pulls toward v+, 0 toward v-."""
    return jnp.clip(transform_advantages(advantages, mode, adv_clip_max) / adv_clip_max / 2 + 0.5, 0.0, 1.0)


def _adaptive_x0_loss(x0_pred, x0):
    """(B,) |x0_pred - x0|^2 / stopgrad(mean |x0_pred - x0|), the self-normalising weight."""
    weight = jnp.maximum(jax.lax.stop_gradient(mean_over_dims(jnp.abs(x0_pred - x0))), WEIGHT_FLOOR)
    return mean_over_dims((x0_pred - x0) ** 2) / weight


def nft_loss(v_theta, v_old, x_t, x0, t, advantages, *, beta: float, adv_clip_max: float = 5.0,
             adv_mode: str = "normal", kl_beta: float = 0.0, v_ref=None, weights=None) -> NFTTerms:
    """L = M mean[r L+ / beta + (1 - r) L- / beta] + kl_beta mean |v - v_ref|^2."""
    v_theta, x_t, x0 = v_theta.astype(jnp.float32), x_t.astype(jnp.float32), x0.astype(jnp.float32)
    v_old = jax.lax.stop_gradient(v_old.astype(jnp.float32))
    weights = jnp.ones(x0.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    t = per_sample(t, x0)
    v_plus = beta * v_theta + (1 - beta) * v_old
    v_minus = (1 + beta) * v_old - beta * v_theta
    positive = _adaptive_x0_loss(x_t - t * v_plus, x0)
    negative = _adaptive_x0_loss(x_t - t * v_minus, x0)
    r = reward_weight(advantages, adv_mode, adv_clip_max)
    per_sample_loss = adv_clip_max * (r * positive / beta + (1 - r) * negative / beta)
    total = jnp.maximum(weights.sum(), 1.0)
    policy_loss = jnp.sum(per_sample_loss * weights) / total
    if kl_beta > 0:
        kl = jnp.sum(mean_over_dims((v_theta - jax.lax.stop_gradient(v_ref)) ** 2) * weights) / total
    else:
        kl = jnp.zeros((), jnp.float32)
    return NFTTerms(policy_loss + kl_beta * kl, policy_loss, kl,
                    jnp.sum(positive * weights) / total, jnp.sum(negative * weights) / total, r)


def old_params_decay(step, decay_type: int):
    """theta_old <- d theta_old + (1 - d) theta; d by --nft_decay_type 0 / 1 / 2."""
    step = jnp.asarray(step, jnp.float32)
    if decay_type == 0:
        return jnp.zeros((), jnp.float32)
    if decay_type == 1:
        return jnp.minimum(0.001 * step, 0.5)
    if decay_type == 2:
        return jnp.where(step < 75, 0.0, jnp.minimum(0.0075 * (step - 75), 0.999))
    raise ValueError(f"nft decay_type {decay_type!r}: expected 0, 1 or 2")
