"""Diffusion-DPO and its online variant (winner / loser from each rollout group)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_inpaint_rl.diffusion.steps import mean_over_dims


class DPOTerms(NamedTuple):
    loss: jax.Array
    accuracy: jax.Array  # fraction of pairs where the policy already prefers the winner more than ref
    margin: jax.Array  # mean of the logit inside the sigmoid


def denoising_error(prediction, target):
    """(B,) mean squared error over dims (target: eps for epsilon models, eps - x0 for flow)."""
    return mean_over_dims((prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


def dpo_loss(err_winner, err_loser, ref_err_winner, ref_err_loser, *, beta: float, weights=None) -> DPOTerms:
    """L = -log sigmoid(-beta / 2 [(e_w - e_l) - (e_w_ref - e_l_ref)])."""
    logit = -0.5 * beta * ((err_winner - err_loser) - jax.lax.stop_gradient(ref_err_winner - ref_err_loser))
    weights = jnp.ones_like(logit) if weights is None else weights.astype(jnp.float32)
    total = jnp.maximum(weights.sum(), 1.0)
    return DPOTerms(jnp.sum(-jax.nn.log_sigmoid(logit) * weights) / total,
                    jnp.sum((logit > 0) * weights) / total, jnp.sum(logit * weights) / total)


def winner_loser(rewards, num_groups: int, group_size: int):
    """Indices of the best and the worst sample of each group (group-major batch), and whether they differ."""
    grouped = rewards.reshape(num_groups, group_size)
    offsets = jnp.arange(num_groups) * group_size
    best, worst = jnp.argmax(grouped, axis=1), jnp.argmin(grouped, axis=1)
    has_preference = grouped.max(axis=1) > grouped.min(axis=1)
    return offsets + best, offsets + worst, has_preference


def refresh_reference(ref_params, params, step, interval: int):
    """Online DPO: copy the learner into the reference every `interval` steps (0 = never)."""
    if interval <= 0:
        return ref_params
    refresh = (jnp.asarray(step) % interval) == 0
    return jax.tree.map(lambda r, p: jnp.where(refresh, p, r), ref_params, params)
