"""The jitted programs the trainer runs: encode, sample, decode, update.

Each is built once from (family, config) and closes over functions only, never
over arrays, so parameters travel as arguments (shardable, donatable) and a
program compiles once per shape.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jax_inpaint_rl.algorithms import ema as ema_lib
from jax_inpaint_rl.algorithms import objectives
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


def make_sample(policy: objectives.Policy) -> Callable:
    @jax.jit
    def sample(denoiser_params, cond, x_init, key, window):
        return rollout_lib.rollout(policy.guided, denoiser_params, cond, x_init, policy.schedule, policy.sampler,
                                   key, window)

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


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def make_update(policy: objectives.Policy, objective: Callable, optimizer: optax.GradientTransformation,
                ema_config) -> Callable:
    """Jitted (state, batch, key, apply) -> (state, metrics).

    Adds the gradient of `objective` w.r.t. state['params'] to state['grad_sum'];
    when `apply` is true, steps the optimizer on the mean of the accumulated
    gradients (trained timesteps x gradient_accumulation_steps micro-batches) and
    clears them. A non-finite loss or gradient is not accumulated and is counted.
    """

    def run(state: dict[str, Any], batch, key, apply):
        frozen = {name: state[name] for name in ("old", "ref") if name in state}
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: objective(policy, p, frozen, batch, key), has_aux=True)(state["params"])
        finite = jnp.isfinite(loss) & _all_finite(grads)
        grad_sum = jax.tree.map(lambda acc, g: acc + jnp.where(finite, g, 0.0), state["grad_sum"], grads)
        count = state["grad_count"] + finite.astype(jnp.int32)
        step_now = apply & (count > 0)
        mean_grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1).astype(g.dtype), grad_sum)
        updates, opt_state = optimizer.update(mean_grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        choose = lambda new, old: jax.tree.map(lambda n, o: jnp.where(step_now, n, o), new, old)  # noqa: E731
        new_state = {**state, "params": choose(params, state["params"]),
                     "opt_state": choose(opt_state, state["opt_state"]),
                     "grad_sum": jax.tree.map(lambda g: jnp.where(apply, jnp.zeros_like(g), g), grad_sum),
                     "grad_count": jnp.where(apply, 0, count),
                     "step": state["step"] + step_now.astype(jnp.int32),
                     "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
                     "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
        if "ema" in state:
            new_state["ema"] = choose(ema_lib.ema_update_every(state["ema"], new_state["params"], new_state["step"],
                                                               ema_config.decay, ema_config.interval), state["ema"])
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    return jax.jit(run, donate_argnums=(0,))
