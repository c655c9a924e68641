"""The jitted programs the trainer runs: encode, decode, accumulate, apply (the collection programs are the
algorithms': algorithms/base.py `rollout_program`, algorithms/grpo_one_step.py).

Each is built once from (family, algorithm, config) and closes over functions and
the schedule's few per-step constants, never over parameters, so parameters
travel as arguments (shardable, donatable) and a program compiles once per shape.
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
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.algorithms.base import Policy
from jax_inpaint_rl.diffusion.guidance import positive
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models.family import Family


def make_policy(family: Family, schedule, sampler: Sampler, guidance_scale: float) -> Policy:
    """The family's denoiser with its guidance at `guidance_scale`, over the denoiser params alone."""
    def denoise(denoiser_params, x, t, cond):
        return family.denoise({family.denoiser_key: denoiser_params}, x, t, cond)

    paste = None if family.paste_region is None else (lambda cond: family.paste_region(positive(cond)))
    return Policy(guided=family.guidance.guided(denoise, guidance_scale),
                  unguided=family.guidance.unguided(denoise, guidance_scale),
                  parameterization=family.parameterization, schedule=schedule, sampler=sampler, paste=paste)


def make_encode(family: Family) -> Callable:
    """(params, tokens, negative tokens, inputs, embeddings) -> cond in the layout of the family's guidance
    ({'positive', 'negative'} when it needs a negative prompt)."""

    @jax.jit
    def encode(params, tokens, negative_tokens, inputs, embeddings):
        image_cond = family.prepare_condition(params, inputs)
        positive = {**family.encode_prompt(params, tokens, inputs, embeddings), **image_cond}
        if not family.guidance.needs_negative:
            return positive
        negative = {**family.encode_prompt(params, negative_tokens, inputs, {}), **image_cond}
        return {"positive": positive, "negative": negative}

    return encode


Merge = Callable[[Any, Any], Any]  # (frozen base, trainable) -> denoiser params
FULL = functools.partial(trainable_lib.merge, trainable_lib.Trainable())  # full fine-tuning: the tree is the denoiser


def with_base(policy: Policy, merge: Merge, base) -> Policy:
    """The policy over trainable trees: every model call runs on merge(base, trainable)."""
    def over_trainable(fn):
        return lambda trainable, *args: fn(merge(base, trainable), *args)

    return dataclasses.replace(policy, guided=over_trainable(policy.guided), unguided=over_trainable(policy.unguided))


def make_decode(family: Family) -> Callable:
    """(params, latents, inputs) -> images in [-1, 1]; inpainting families keep the source outside the mask."""
    composite = {"image", "mask"} <= set(family.inputs)

    @jax.jit
    def decode(params, latents, inputs):
        generated = jnp.clip(family.decode(params, latents), -1.0, 1.0)
        if not composite:
            return generated
        return generated * inputs["mask"] + inputs["image"] * (1.0 - inputs["mask"])

    return decode


def make_optimizer(train) -> optax.GradientTransformation:
    """AdamW after a global-norm clip, from config.train."""
    return optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(train.learning_rate, b1=train.adam_b1, b2=train.adam_b2, weight_decay=train.weight_decay))


def _pin(tree, shardings):
    """`tree` placed as `shardings` says (when given): outputs keep their inputs' placement, so the next call
    finds the same input shardings and does not compile again."""
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def make_accumulate(policy: Policy, objective: Callable, merge: Merge = FULL, state_sharding=None) -> Callable:
    """Jitted (state, base, batch, steps, key) -> (state, metrics).

    Adds the gradient of `objective` w.r.t. state['params'] (the trainable tree;
    the model runs on merge(base, params)) at each of the micro-batch's trained
    steps (`steps`: (B, K, ...) arrays; {} for one call) to state['grad_sum'],
    counted in state['grad_count']; K > 1 steps run as one `lax.scan`, K = 1 as a
    plain call (on XLA:CPU a scan runs its body 4.4x slower: tools/bench/update_phase.py).
    A non-finite loss or gradient is not added; it is counted in 'skipped' and in
    'nonfinite' (in a row). Metrics come back per step, (K,), and stay on the device.
    """

    def run(state: dict[str, Any], base, batch, steps, key):
        frozen = {name: state[name] for name in ("old", "ref") if name in state}
        bound = with_base(policy, merge, base)
        per_step = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), steps)
        count = jax.tree.leaves(per_step)[0].shape[0] if per_step else 1

        def one_step(carry, inputs):
            step_fields, step_key = inputs
            (loss, metrics), grads = jax.value_and_grad(
                lambda p: objective(bound, p, frozen, {**batch, **step_fields}, step_key),
                has_aux=True)(carry["params"])
            grad_norm = optax.tree.norm(grads)
            # one reduction rather than a check per leaf (which multiplied compile time): the norm is
            # non-finite iff some entry is, or overflows fp32 when squared (> 1e19: garbage either way)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            carry = {**carry,
                     "grad_sum": jax.tree.map(lambda acc, g: acc + jnp.where(finite, g, 0.0), carry["grad_sum"],
                                              grads),
                     "grad_count": carry["grad_count"] + finite.astype(jnp.int32),
                     "nonfinite": jnp.where(finite, 0, carry["nonfinite"] + 1),
                     "skipped": carry["skipped"] + (~finite).astype(jnp.int32)}
            return carry, {**metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}

        carried = {name: state[name] for name in ("params", "grad_sum", "grad_count", "nonfinite", "skipped")}
        if count == 1:
            carry, metrics = one_step(carried, (jax.tree.map(lambda a: a[0], per_step), key))
            metrics = jax.tree.map(lambda m: m[None], metrics)
        else:
            carry, metrics = jax.lax.scan(one_step, carried, (per_step, jax.random.split(key, count)))
        return _pin({**state, **carry}, state_sharding), metrics

    return jax.jit(run, donate_argnums=(0,))


def make_apply(optimizer: optax.GradientTransformation, ema_config, after_step: Callable = lambda s: s,
               state_sharding=None) -> Callable:
    """Jitted state -> state: one optimizer step on the mean of the accumulated gradients (trained steps x
    gradient_accumulation_steps micro-batches), the EMA update, the algorithm's `after_step`, and the
    gradients cleared. A window that added no finite gradient leaves the state as it was (decided on the
    device, so the host never waits for it).
    """

    def step(state: dict[str, Any]):
        count = state["grad_count"].astype(jnp.float32)
        mean_grads = jax.tree.map(lambda g: g / count.astype(g.dtype), state["grad_sum"])
        updates, opt_state = optimizer.update(mean_grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if "ema" in state:
            new_state["ema"] = ema_lib.ema_update_every(state["ema"], params, new_state["step"], ema_config.decay,
                                                        ema_config.interval)
        return after_step(new_state)

    def run(state: dict[str, Any]):
        stepped = jax.lax.cond(state["grad_count"] > 0, step, lambda s: s, state)
        cleared = {**stepped, "grad_sum": jax.tree.map(jnp.zeros_like, stepped["grad_sum"]),
                   "grad_count": jnp.zeros_like(stepped["grad_count"])}
        return _pin(cleared, state_sharding)

    return jax.jit(run, donate_argnums=(0,))
