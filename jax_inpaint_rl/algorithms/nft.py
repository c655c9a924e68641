"""DiffusionNFT: learn from positive and implicit-negative prediction mixtures.

Rollouts come from the 'old' params with a deterministic solver; training
re-noises the clean sample at a rollout time and asks the mixture
v+ = beta v + (1 - beta) v_old to denoise well where the reward was high and
v- = (1 + beta) v_old - beta v where it was low (REFERENCE_MATH.md 3, advantage
modes of seed 004). The x0 estimate is linear in the prediction, so the same
loss holds for epsilon models through their parameterization.

Old params after each epoch, `nft.decay_type` (seed 004's --nft_decay_type):
'0' / 'fixed': never updated (the seed's fixed reference); '1': d = min(0.001 epoch, 0.5);
'2': d = 0 before epoch 75, then min(0.0075 (epoch - 75), 0.999); 'copy': d = 0, the
old params become the learner's every epoch (what DiffusionNFT's code does for type 0).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.algorithms.base import Algorithm, Policy, rollout_program, take
from jax_inpaint_rl.algorithms.ema import ema_update
from jax_inpaint_rl.algorithms.grpo import rollout_micro_batches
from jax_inpaint_rl.diffusion.schedules import take_steps
from jax_inpaint_rl.diffusion.steps import mean_over_dims

ADV_MODES = ("normal", "positive_only", "negative_only", "one_only", "binary")
DECAY_TYPES = ("0", "fixed", "1", "2", "copy")
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


def nft_loss(prediction, old_prediction, x0, advantages, *, x0_estimate, beta: float, adv_clip_max: float = 5.0,
             adv_mode: str = "normal", kl_beta: float = 0.0, ref_prediction=None, weights=None) -> NFTTerms:
    """L = M mean[r L+ / beta + (1 - r) L- / beta] + kl_beta mean |v - v_ref|^2.

    `x0_estimate(prediction) -> x0_hat` at the training x_t and t (x_t - t v for flow models)."""
    prediction, x0 = prediction.astype(jnp.float32), x0.astype(jnp.float32)
    old_prediction = jax.lax.stop_gradient(old_prediction.astype(jnp.float32))
    weights = jnp.ones(x0.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    positive = _adaptive_x0_loss(x0_estimate(beta * prediction + (1 - beta) * old_prediction), x0)
    negative = _adaptive_x0_loss(x0_estimate((1 + beta) * old_prediction - beta * prediction), x0)
    r = reward_weight(advantages, adv_mode, adv_clip_max)
    per_sample_loss = adv_clip_max * (r * positive / beta + (1 - r) * negative / beta)
    total = jnp.maximum(weights.sum(), 1.0)
    policy_loss = jnp.sum(per_sample_loss * weights) / total
    if kl_beta > 0:
        kl = jnp.sum(mean_over_dims((prediction - jax.lax.stop_gradient(ref_prediction)) ** 2) * weights) / total
    else:
        kl = jnp.zeros((), jnp.float32)
    return NFTTerms(policy_loss + kl_beta * kl, policy_loss, kl,
                    jnp.sum(positive * weights) / total, jnp.sum(negative * weights) / total, r)


def nft_objective(policy: Policy, params, frozen, batch, key, *, beta: float, adv_clip_max: float,
                  adv_mode: str, kl_beta: float):
    """DiffusionNFT on the clean samples re-noised at one rollout time per sample.

    batch: x0 (B, ...) clean rollout latents, step_index (B,) schedule steps, cond, advantages, weight."""
    param, x0 = policy.parameterization, batch["x0"]
    t = param.schedule_time(take_steps(policy.schedule, batch["step_index"]))
    x_t = param.noised(x0, jax.random.normal(key, x0.shape, jnp.float32), t)
    predict = lambda p: policy.unguided(p, x_t, t, batch["cond"])  # noqa: E731
    terms = nft_loss(predict(params), predict(frozen["old"]), x0, batch["advantages"],
                     x0_estimate=lambda prediction: param.x0(prediction, x_t, t), beta=beta,
                     adv_clip_max=adv_clip_max, adv_mode=adv_mode, kl_beta=kl_beta,
                     ref_prediction=predict(frozen["ref"]) if kl_beta > 0 else None, weights=batch["weight"])
    return terms.loss, {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl,
                        "positive_loss": terms.positive_loss, "negative_loss": terms.negative_loss}


def old_params_decay(step, decay_type: str):
    """d in theta_old <- d theta_old + (1 - d) theta for decay types '1', '2' and 'copy' (see the module
    docstring; '0' / 'fixed' never update the old params)."""
    step = jnp.asarray(step, jnp.float32)
    if decay_type == "copy":
        return jnp.zeros((), jnp.float32)
    if decay_type == "1":
        return jnp.minimum(0.001 * step, 0.5)
    if decay_type == "2":
        return jnp.where(step < 75, 0.0, jnp.minimum(0.0075 * (step - 75), 0.999))
    raise ValueError(f"nft decay_type {decay_type!r}: expected one of {DECAY_TYPES}")


def clean_samples(collected: dict, index, step_index) -> dict:
    """The rollout's clean latents and the schedule steps to re-noise them at, (B, K, ...)."""
    x0 = take(collected["samples"]["latents"][:, -1], index)
    return {"x0": jnp.broadcast_to(x0[:, None], (x0.shape[0], step_index.shape[1], *x0.shape[1:])),
            "step_index": step_index}


def decay_old_params(state: dict, epoch: int, decay_type: str) -> dict:
    if decay_type in ("0", "fixed"):
        return state
    return {**state, "old": _jitted_ema(state["old"], state["params"], old_params_decay(epoch, decay_type))}


_jitted_ema = jax.jit(ema_update)


def make(config) -> Algorithm:
    """DiffusionNFT from config.nft (beta, adv_mode, decay_type, kl_beta) and config.train."""
    n, train = config.nft, config.train
    if str(n.decay_type) not in DECAY_TYPES:
        raise ValueError(f"config: nft.decay_type={n.decay_type!r}: expected one of {DECAY_TYPES}")
    if n.adv_mode not in ADV_MODES:
        raise ValueError(f"config: nft.adv_mode={n.adv_mode!r}: expected one of {ADV_MODES}")
    if n.beta <= 0 or n.kl_beta < 0:
        raise ValueError(f"config: nft.beta={n.beta} (expected > 0), nft.kl_beta={n.kl_beta} (expected >= 0)")
    return Algorithm(
        name="nft",
        objective=functools.partial(nft_objective, beta=n.beta, adv_clip_max=train.adv_clip_max,
                                    adv_mode=n.adv_mode, kl_beta=n.kl_beta),
        micro_batches=functools.partial(rollout_micro_batches, train=train, step_fields=clean_samples),
        slots=("old", "ref") if n.kl_beta > 0 else ("old",),
        sample_from="old",
        sampler=rollout_program,
        # samples with the deterministic solver; trains on re-noised clean samples at any step
        windows=lambda key, steps: (np.zeros(steps, np.float32), np.ones(steps, np.float32)),
        after_epoch=functools.partial(decay_old_params, decay_type=str(n.decay_type)))
