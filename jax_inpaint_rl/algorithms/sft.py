"""Supervised fine-tuning toward the dataset's targets (also the seeds' warm-up before RL).

The algorithm learns from the dataset, not from rollouts (`sampler=None`): each
micro-batch is `train.minibatch_size` examples (--train_batch_size) with their target
latents, noised at a fresh time; `gradient_accumulation_steps` micro-batches make
one optimizer step. Velocity families regress eps - x0 at logit-normal times,
epsilon families eps at uniform DDPM timesteps (their parameterization decides).
"""
import functools

import jax
import jax.numpy as jnp

from jax_inpaint_rl.algorithms.base import Algorithm, MicroBatch, Policy


def region_weights(mask, inside: float = 1.0, outside: float = 1.0):
    """Per-element weights from a fill mask in the latent layout (1 = fill)."""
    return outside + (inside - outside) * mask.astype(jnp.float32)


def sft_loss(prediction, target, weights=None):
    """Weighted MSE between the prediction and its regression target.

    With region weights the loss is normalised by the weight sum per sample, so
    a mask-only loss is the mean error inside the mask.
    """
    error = (prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    if weights is None:
        return error.mean()
    weights = jnp.broadcast_to(weights.astype(jnp.float32), error.shape)
    axes = tuple(range(1, error.ndim))
    per_sample_loss = jnp.sum(error * weights, axes) / jnp.maximum(jnp.sum(weights, axes), 1e-8)
    return per_sample_loss.mean()


def sft_objective(policy: Policy, params, frozen, batch, key, *, mask_weight_inside: float = 1.0,
                  mask_weight_outside: float = 1.0):
    """batch: x0 (B, ...) target latents, cond, optional latent_mask (the mask on the latent grid)."""
    del frozen
    param, x0 = policy.parameterization, batch["x0"]
    t_key, eps_key = jax.random.split(key)
    t = param.training_time(t_key, x0.shape[0])
    eps = jax.random.normal(eps_key, x0.shape, jnp.float32)
    prediction = policy.unguided(params, param.noised(x0, eps, t), t, batch["cond"])
    weights = None
    if "latent_mask" in batch and (mask_weight_inside != 1.0 or mask_weight_outside != 1.0):
        weights = region_weights(batch["latent_mask"], mask_weight_inside, mask_weight_outside)
    loss = sft_loss(prediction, param.target(x0, eps), weights)
    return loss, {"loss": loss}


def dataset_micro_batches(collected: dict, key):
    """One pass: every loaded batch is one micro-batch."""
    del key
    return [[MicroBatch(batch, {}) for batch in collected["batches"]]]


def make(config) -> Algorithm:
    """SFT from config.sft (mask weights); the trainer loads train.minibatch_size examples per micro-batch."""
    s = config.sft
    return Algorithm(
        name="sft",
        objective=functools.partial(sft_objective, mask_weight_inside=s.mask_weight_inside,
                                    mask_weight_outside=s.mask_weight_outside),
        micro_batches=dataset_micro_batches,
        needs=("target",))
