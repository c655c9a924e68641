"""The jitted programs the trainer runs: encode, sample, decode, update.

Each is built once from (family, config) and closes over functions and the
schedule's few per-step constants, never over parameters, so parameters travel
as arguments (shardable, donatable) and a program compiles once per shape.
Sampling and updating take the frozen `base` and the trainable tree apart
(algorithms/trainable.py) and merge them inside.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jax_inpaint_rl.algorithms import ema as ema_lib
from jax_inpaint_rl.algorithms import objectives
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.diffusion import guidance, rollout as rollout_lib, schedules
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models.family import Family


def make_schedule(family: Family, config, num_steps: int, latent_shape) -> schedules.Schedule:
    """The family's sampling schedule: DDIM for epsilon models, Flux shift for packed tokens, else SD3 shift."""
    if family.prediction == "epsilon":
        return schedules.ddim_schedule(num_steps)
    if family.name.startswith("flux"):
        return schedules.flux_schedule(num_steps, image_seq_len=latent_shape[0] * latent_shape[1])
    return schedules.sd3_schedule(num_steps, config.sample.sd3_shift)


def make_policy(family: Family, config, schedule, sampler: Sampler, guidance_scale: float) -> objectives.Policy:
    def denoise(denoiser_params, x, t, cond):
        return family.denoise({family.denoiser_key: denoiser_params}, x, t, cond)

    return objectives.Policy(
        guided=guidance.guide(denoise, family.guidance, guidance_scale),
        unguided=lambda p, x, t, c: denoise(p, x, t, guidance.unguided(c) if family.guidance == "cfg"
                                            else {**c, "guidance": jnp.full(x.shape[:1], guidance_scale)}),
        prediction=family.prediction, schedule=schedule, sampler=sampler)


def make_encode(family: Family) -> Callable:
    """(params, tokens, negative tokens, image, mask) -> cond in the family's guidance layout."""

    @jax.jit
    def encode(params, tokens, negative_tokens, image, mask):
        image_cond = family.prepare_condition(params, image, mask)
        positive = {**family.encode_prompt(params, tokens), **image_cond}
        if family.guidance != "cfg":
            return positive
        return {"positive": positive, "negative": {**family.encode_prompt(params, negative_tokens), **image_cond}}

    return encode


Merge = Callable[[Any, Any], Any]  # (frozen base, trainable) -> denoiser params
FULL = functools.partial(trainable_lib.merge, trainable_lib.Trainable())  # full fine-tuning: the tree is the denoiser


def with_base(policy: objectives.Policy, merge: Merge, base) -> objectives.Policy:
    """The policy over trainable trees: every model call runs on merge(base, trainable)."""
    def over_trainable(fn):
        return lambda trainable, *args: fn(merge(base, trainable), *args)

    return dataclasses.replace(policy, guided=over_trainable(policy.guided), unguided=over_trainable(policy.unguided))


def make_sample(policy: objectives.Policy, merge: Merge = FULL) -> Callable:
    """Jitted (base, trainable, cond, x_init, key, window) -> Trajectory; merges once per rollout."""
    @jax.jit
    def sample(base, trainable, cond, x_init, key, window):
        return rollout_lib.rollout(policy.guided, merge(base, trainable), cond, x_init, policy.schedule,
                                   policy.sampler, key, window)

    return sample


def make_decode(family: Family) -> Callable:
    """(params, latents, source image, mask) -> composited images in [-1, 1] (original kept outside the mask)."""

    @jax.jit
    def decode(params, latents, source, mask):
        generated = jnp.clip(family.decode(params, latents), -1.0, 1.0)
        return generated * mask + source * (1.0 - mask)

    return decode


def make_encode_image(family: Family) -> Callable:
    return jax.jit(family.encode_image)


def make_optimizer(learning_rate: float, config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.train.max_grad_norm),
        optax.adamw(learning_rate, b1=config.train.adam_b1, b2=config.train.adam_b2,
                    weight_decay=config.train.weight_decay))


def _pin(tree, shardings):
    """`tree` placed as `shardings` says (when given): outputs keep their inputs' placement, so the next call
    finds the same input shardings and does not compile again."""
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def make_accumulate(policy: objectives.Policy, objective: Callable, merge: Merge = FULL,
                    state_sharding=None) -> Callable:
    """Jitted (state, base, batch, key) -> (state, metrics).

    Adds the gradient of `objective` w.r.t. state['params'] (the trainable tree;
    the model runs on merge(base, params)) to state['grad_sum'] and counts it in
    state['grad_count']. A non-finite loss or gradient is not added; it is
    counted in 'skipped' and in 'nonfinite' (in a row).
    """

    def run(state: dict[str, Any], base, batch, key):
        frozen = {name: state[name] for name in ("old", "ref") if name in state}
        bound = with_base(policy, merge, base)
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: objective(bound, p, frozen, batch, key), has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        # one reduction rather than a check per leaf (which multiplied compile time): the norm is non-finite
        # iff some entry is, or overflows fp32 when squared (> 1e19: garbage either way)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {**state,
                     "grad_sum": jax.tree.map(lambda acc, g: acc + jnp.where(finite, g, 0.0), state["grad_sum"], grads),
                     "grad_count": state["grad_count"] + finite.astype(jnp.int32),
                     "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
                     "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
        metrics = {**metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
        return _pin(new_state, state_sharding), metrics

    return jax.jit(run, donate_argnums=(0,))


def make_apply(optimizer: optax.GradientTransformation, ema_config, state_sharding=None) -> Callable:
    """Jitted state -> state: one optimizer step on the mean of the accumulated gradients (trained timesteps x
    gradient_accumulation_steps micro-batches), the EMA update, and the gradients cleared.

    Apart from accumulation so that micro-steps never run the optimizer; the
    trainer calls it at the end of a window that added a finite gradient.
    """

    def run(state: dict[str, Any]):
        count = state["grad_count"].astype(jnp.float32)
        mean_grads = jax.tree.map(lambda g: g / count.astype(g.dtype), state["grad_sum"])
        updates, opt_state = optimizer.update(mean_grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        new_state = {**state, "params": params, "opt_state": opt_state, "step": step,
                     "grad_sum": jax.tree.map(jnp.zeros_like, state["grad_sum"]),
                     "grad_count": jnp.zeros_like(state["grad_count"])}
        if "ema" in state:
            new_state["ema"] = ema_lib.ema_update_every(state["ema"], params, step, ema_config.decay,
                                                        ema_config.interval)
        return _pin(new_state, state_sharding)

    return jax.jit(run, donate_argnums=(0,))
