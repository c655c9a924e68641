"""One-step GRPO (seed 000): GRPO's loss on single denoising decisions, with no rollout.

Per group (one prompt, k samples): the target is noised to one random SDE-window
step j (the same x_j and j for the whole group), each of the k samples takes one
stochastic step x_j -> x_{j+1} with its log-prob, and the reward scores the
decoded one-step estimate of x0 from x_{j+1} (one more deterministic denoiser
call; x_{j+1} itself after the last step). Group advantages and the PPO-clip
loss (config.grpo) are GRPO's. A collection costs two denoiser calls per sample
instead of a whole trajectory; it needs targets.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax_inpaint_rl.algorithms import grpo
from jax_inpaint_rl.algorithms.base import Algorithm, take
from jax_inpaint_rl.diffusion.schedules import num_steps, take_steps


def one_step_program(policy, merge, *, group_size: int):
    """Jitted (base, trainable, cond, start, key, window) -> (one transition per sample, x0 estimates).

    start['x0'] (B, ...) are the target latents, group-major (each repeated group_size times)."""

    @jax.jit
    def sample(base, trainable, cond, start, key, window):
        params, param, x0 = merge(base, trainable), policy.parameterization, start["x0"]
        groups, total = x0.shape[0] // group_size, num_steps(policy.schedule)
        step_key, eps_key, noise_key = jax.random.split(key, 3)
        window = jnp.asarray(window, jnp.float32)
        per_group = jax.random.categorical(step_key, jnp.where(window > 0, 0.0, -jnp.inf), shape=(groups,))
        step_index = jnp.repeat(per_group, group_size)
        eps = jnp.repeat(jax.random.normal(eps_key, (groups, *x0.shape[1:]), jnp.float32), group_size, axis=0)
        coeffs = take_steps(policy.schedule, step_index)
        x = param.noised(x0.astype(jnp.float32), eps, param.schedule_time(coeffs))
        step = policy.sampler.step(policy.guided(params, x, coeffs["model_t"], cond), x, coeffs,
                                   window=window[step_index], key=noise_key)
        following = take_steps(policy.schedule, jnp.minimum(step_index + 1, total - 1))
        estimate = param.x0(policy.guided(params, step.sample, following["model_t"], cond), step.sample,
                            param.schedule_time(following))
        last = (step_index + 1 >= total).reshape(-1, *([1] * (x0.ndim - 1)))
        transition = {"x": x, "x_next": step.sample, "log_prob": step.log_prob, "step_index": step_index}
        return transition, jnp.where(last, step.sample, estimate)

    return sample


def stored_transition(collected: dict, index, step_index) -> dict:
    """The collected transition of samples `index` as a single trained step, (B, 1, ...)."""
    del step_index  # each sample has exactly its one step
    samples = take(collected["samples"], index)
    return {"x": samples["x"][:, None], "x_next": samples["x_next"][:, None],
            "old_log_prob": samples["log_prob"][:, None], "step_index": samples["step_index"][:, None]}


def make(config) -> Algorithm:
    """GRPO's loss and settings (config.grpo) with the one-step collection."""
    return dataclasses.replace(
        grpo.make(config), name="grpo_one_step",
        sampler=functools.partial(one_step_program, group_size=config.sample.images_per_prompt),
        micro_batches=functools.partial(grpo.rollout_micro_batches, train=config.train,
                                        step_fields=stored_transition),
        needs=("target",))
