"""An algorithm defined outside the library (train.method='tests.custom_algorithm:make'): reward-weighted
regression on the rollouts' clean samples. It touches no library file: a value built from the config."""
import functools

import jax
import jax.numpy as jnp

from jax_inpaint_rl.algorithms.base import (Algorithm, MicroBatch, rollout_program, shuffled_minibatches,
                                            stochastic_windows, take)


def objective(policy, params, frozen, batch, key):
    del frozen
    param, x0 = policy.parameterization, batch["x0"]
    t_key, eps_key = jax.random.split(key)
    t = param.training_time(t_key, x0.shape[0])
    eps = jax.random.normal(eps_key, x0.shape)
    error = jnp.mean((policy.unguided(params, param.noised(x0, eps, t), t, batch["cond"])
                      - param.target(x0, eps)) ** 2, axis=(1, 2, 3))
    weights = jax.nn.relu(batch["advantages"])
    loss = jnp.sum(weights * error) / jnp.maximum(jnp.sum(weights), 1e-6)
    return loss, {"loss": loss, "reward_weighted_sft": loss}


def micro_batches(collected, key, *, minibatch_size):
    clean = collected["samples"]["latents"][:, -1]
    return [[MicroBatch({"x0": take(clean, index), "cond": take(collected["cond"], index),
                         "advantages": collected["advantages"][index]}, {})
             for index in shuffled_minibatches(key, clean.shape[0], minibatch_size)]]


def make(config) -> Algorithm:
    return Algorithm(name="reward_weighted_sft", objective=objective,
                     micro_batches=functools.partial(micro_batches, minibatch_size=config.train.minibatch_size),
                     sampler=rollout_program, windows=stochastic_windows(config.sample))


def make_diverging(config) -> Algorithm:
    """The same, with a loss that is never finite (the non-finite stop's test)."""
    return Algorithm(name="diverging", objective=lambda *args: (jnp.float32(jnp.nan), {}),
                     micro_batches=functools.partial(micro_batches, minibatch_size=config.train.minibatch_size),
                     sampler=rollout_program, windows=stochastic_windows(config.sample))
