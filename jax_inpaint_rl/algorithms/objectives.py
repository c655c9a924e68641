"""Per-minibatch training objectives: GRPO, DiffusionNFT, DPO and SFT behind one signature.

Every objective is `objective(policy, params, frozen, batch, key) -> (loss, metrics)`
where `policy` holds the guided and unguided denoisers and the schedule,
`params` the trainable denoiser params, `frozen` the old / reference params an
algorithm needs, and `batch` a dict of per-sample arrays. The trainer
differentiates it with respect to `params` only, so all four share one jitted
update step.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jax_inpaint_rl.algorithms import dpo, grpo, nft, sft
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.schedules import Schedule, scaled_linear_alpha_bar
from jax_inpaint_rl.diffusion.steps import Sampler


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the objectives need from a model family, with the non-trainable params bound."""

    guided: Callable  # (denoiser params, x, t, cond) -> prediction, with the rollout's guidance
    unguided: Callable  # (denoiser params, x, t, cond) -> prediction, positive condition only
    prediction: str  # "velocity" or "epsilon"
    schedule: Schedule
    sampler: Sampler


def _weighted_mean(values, weights):
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def grpo_objective(policy: Policy, params, frozen, batch, key, *, clip_range: float, adv_clip_max: float,
                   kl_beta: float):
    """PPO-clip on one trained step per sample (batch['step_index'] (B,)).

    batch: latents (B, T+1, ...), log_probs (B, T), window (T,), cond, advantages (B,), weight (B,).
    The trainer calls it once per trained step and accumulates the gradients, as
    Flow-GRPO does, so the compiled program holds a single denoiser call.
    """
    del key
    rows, step_index = jnp.arange(batch["advantages"].shape[0]), batch["step_index"]
    x, x_next = batch["latents"][rows, step_index], batch["latents"][rows, step_index + 1]
    scored = rollout_lib.score_transitions(policy.guided, params, batch["cond"], x, x_next, step_index,
                                           policy.schedule, policy.sampler, batch["window"])
    ref_mean = None
    if kl_beta > 0:
        ref_mean = rollout_lib.score_transitions(policy.guided, frozen["ref"], batch["cond"], x, x_next, step_index,
                                                 policy.schedule, policy.sampler, batch["window"]).mean
    terms = grpo.grpo_loss(scored.log_prob, batch["log_probs"][rows, step_index], batch["advantages"],
                           clip_range=clip_range, adv_clip_max=adv_clip_max, kl_beta=kl_beta,
                           mean=scored.mean, ref_mean=ref_mean, std=scored.std, weights=batch["weight"])
    metrics = {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl,
               "clip_fraction": terms.clip_fraction, "approx_kl": terms.approx_kl,
               "ratio_mean": _weighted_mean(terms.ratio, batch["weight"]),
               "ratio_min": jnp.min(jnp.where(batch["weight"] > 0, terms.ratio, jnp.inf)),
               "ratio_max": jnp.max(jnp.where(batch["weight"] > 0, terms.ratio, -jnp.inf))}
    return terms.loss, metrics


def _training_noise(prediction: str, schedule: Schedule, x0, key, step_index=None):
    """(x_t, model time, regression target) for a fresh noise draw.

    Velocity models: t is the rollout schedule's sigma at `step_index` (NFT trains
    on the sampling times) or logit-normal when None (SFT). Epsilon models: a
    uniform DDPM timestep.
    """
    t_key, eps_key = jax.random.split(key)
    eps = jax.random.normal(eps_key, x0.shape, jnp.float32)
    batch = x0.shape[0]
    if prediction == "velocity":
        t = sft.logit_normal_t(t_key, (batch,)) if step_index is None else schedule["sigma"][step_index]
        return sft.flow_noisy_latents(x0, eps, t), t, eps - x0
    alpha_bar = jnp.asarray(scaled_linear_alpha_bar(), jnp.float32)
    timestep = jax.random.randint(t_key, (batch,), 0, alpha_bar.shape[0])
    return sft.ddpm_noisy_latents(x0, eps, alpha_bar[timestep]), timestep.astype(jnp.float32), eps


def nft_objective(policy: Policy, params, frozen, batch, key, *, beta: float, adv_clip_max: float,
                  adv_mode: str, kl_beta: float):
    """DiffusionNFT on the re-noised clean samples at one rollout time per sample (batch['step_index'] (B,))."""
    if policy.prediction != "velocity":
        raise ValueError("DiffusionNFT is defined for velocity (flow-matching) families")
    x0 = batch["latents"][:, -1]
    x_t, t, _ = _training_noise("velocity", policy.schedule, x0, key, batch["step_index"])
    v = policy.unguided(params, x_t, t, batch["cond"])
    v_old = policy.unguided(frozen["old"], x_t, t, batch["cond"])
    v_ref = policy.unguided(frozen["ref"], x_t, t, batch["cond"]) if kl_beta > 0 else None
    terms = nft.nft_loss(v, v_old, x_t, x0, t, batch["advantages"], beta=beta, adv_clip_max=adv_clip_max,
                         adv_mode=adv_mode, kl_beta=kl_beta, v_ref=v_ref, weights=batch["weight"])
    return terms.loss, {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl,
                        "positive_loss": terms.positive_loss, "negative_loss": terms.negative_loss}


def dpo_objective(policy: Policy, params, frozen, batch, key, *, beta: float):
    """Diffusion-DPO on (winner, loser) clean latents with shared noise and time per pair.

    batch: winner (P, ...), loser (P, ...), cond (per pair), weight (P,).
    """
    x_w, t, target_w = _training_noise(policy.prediction, policy.schedule, batch["winner"], key)
    eps = target_w + batch["winner"] if policy.prediction == "velocity" else target_w
    if policy.prediction == "velocity":
        x_l, target_l = sft.flow_noisy_latents(batch["loser"], eps, t), eps - batch["loser"]
    else:
        alpha_bar = jnp.asarray(scaled_linear_alpha_bar(), jnp.float32)[t.astype(jnp.int32)]
        x_l, target_l = sft.ddpm_noisy_latents(batch["loser"], eps, alpha_bar), eps

    def errors(p):
        return (dpo.denoising_error(policy.unguided(p, x_w, t, batch["cond"]), target_w),
                dpo.denoising_error(policy.unguided(p, x_l, t, batch["cond"]), target_l))

    err_w, err_l = errors(params)
    ref_w, ref_l = errors(frozen["ref"])
    terms = dpo.dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, weights=batch["weight"])
    return terms.loss, {"loss": terms.loss, "accuracy": terms.accuracy, "margin": terms.margin}


def sft_objective(policy: Policy, params, frozen, batch, key, *, mask_weight_inside: float = 1.0,
                  mask_weight_outside: float = 1.0):
    """Regression toward the dataset's targets: batch['x0'] (B, ...), optional batch['latent_mask']."""
    del frozen
    x_t, t, target = _training_noise(policy.prediction, policy.schedule, batch["x0"], key)
    prediction = policy.unguided(params, x_t, t, batch["cond"])
    weights = None
    if "latent_mask" in batch and (mask_weight_inside != 1.0 or mask_weight_outside != 1.0):
        weights = sft.region_weights(batch["latent_mask"], mask_weight_inside, mask_weight_outside)
    loss = sft.sft_loss(prediction, target, weights)
    return loss, {"loss": loss}


OBJECTIVES: dict[str, Callable[..., Any]] = {
    "grpo": grpo_objective,
    "nft": nft_objective,
    "dpo": dpo_objective,
    "sft": sft_objective,
}


def from_config(method: str, train) -> Callable[..., Any]:
    """`method`'s objective with its settings from config.train bound (what the trainer differentiates)."""
    settings = {
        "grpo": dict(clip_range=train.clip_range, adv_clip_max=train.adv_clip_max, kl_beta=train.kl_beta),
        "nft": dict(beta=train.nft_beta, adv_clip_max=train.adv_clip_max, adv_mode=train.nft_adv_mode,
                    kl_beta=train.kl_beta),
        "dpo": dict(beta=train.dpo_beta),
        "sft": dict(mask_weight_inside=train.sft_mask_weight_inside,
                    mask_weight_outside=train.sft_mask_weight_outside),
    }[method]
    return functools.partial(OBJECTIVES[method], **settings)
