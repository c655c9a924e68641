"""Diffusion-DPO and its online variant (winner / loser from each rollout group).

The reference is a frozen copy of the trainable tree, refreshed from the learner
inside the optimizer step every `dpo.ref_update_interval` steps (online DPO), or
never (0).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_inpaint_rl.algorithms.base import (Algorithm, MicroBatch, Policy, rollout_program, shuffled_minibatches,
                                            stochastic_windows, take)
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


def dpo_objective(policy: Policy, params, frozen, batch, key, *, beta: float):
    """Diffusion-DPO on (winner, loser) clean latents with shared noise and time per pair.

    batch: winner (P, ...), loser (P, ...), cond (per pair), weight (P,).
    """
    param = policy.parameterization
    t_key, eps_key = jax.random.split(key)
    t = param.training_time(t_key, batch["winner"].shape[0])
    eps = jax.random.normal(eps_key, batch["winner"].shape, jnp.float32)
    noisy = {side: param.noised(batch[side], eps, t) for side in ("winner", "loser")}

    def errors(p):
        return tuple(denoising_error(policy.unguided(p, noisy[side], t, batch["cond"]), param.target(batch[side], eps))
                     for side in ("winner", "loser"))

    terms = dpo_loss(*errors(params), *errors(frozen["ref"]), beta=beta, weights=batch["weight"])
    return terms.loss, {"loss": terms.loss, "accuracy": terms.accuracy, "margin": terms.margin}


def pair_micro_batches(collected: dict, key, *, train, group_size: int):
    """Inner epochs of shuffled minibatches of (best, worst) pairs, one pair per group; groups whose rewards
    are all equal carry no preference and weigh 0."""
    rewards = jnp.asarray(collected["rewards"])
    num_groups = rewards.shape[0] // group_size
    winner, loser, has_preference = winner_loser(rewards, num_groups, group_size)
    clean = collected["samples"]["latents"][:, -1]
    return [[MicroBatch({"winner": take(clean, winner[pairs]), "loser": take(clean, loser[pairs]),
                         "cond": take(collected["cond"], winner[pairs]),
                         "weight": has_preference[pairs].astype(jnp.float32)}, {})
             for pairs in shuffled_minibatches(inner_key, num_groups, train.minibatch_size)]
            for inner_key in jax.random.split(key, train.inner_epochs)]


def make(config) -> Algorithm:
    """Online Diffusion-DPO from config.dpo (beta, ref_update_interval): best vs worst of each rollout group;
    `train.minibatch_size` counts pairs."""
    d = config.dpo
    if d.beta <= 0 or d.ref_update_interval < 0:
        raise ValueError(f"config: dpo.beta={d.beta} (expected > 0), dpo.ref_update_interval="
                         f"{d.ref_update_interval} (expected >= 0; 0 = never)")
    return Algorithm(
        name="dpo",
        objective=functools.partial(dpo_objective, beta=d.beta),
        micro_batches=functools.partial(pair_micro_batches, train=config.train,
                                        group_size=config.sample.images_per_prompt),
        slots=("ref",),
        sampler=rollout_program,
        windows=stochastic_windows(config.sample),
        after_step=lambda state: {**state, "ref": refresh_reference(state["ref"], state["params"], state["step"],
                                                                    d.ref_update_interval)})
