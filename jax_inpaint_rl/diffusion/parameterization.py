"""What a denoiser predicts, as values: how clean latents, noise and model time make x_t, the
regression target and the x0 estimate (REFERENCE_MATH.md sections 1 and 3).

A family names its parameterization (`Family.parameterization`); the objectives
and the one-step sampler only call these methods, so they work for either.
Model time `t` is per sample (B,): sigma in [0, 1] for velocity models, the
integer-valued DDPM timestep for epsilon models.
"""
import dataclasses

import jax
import jax.numpy as jnp

from jax_inpaint_rl.diffusion.schedules import scaled_linear_alpha_bar
from jax_inpaint_rl.diffusion.steps import per_sample


@dataclasses.dataclass(frozen=True)
class Velocity:
    """Flow matching: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0 (SD3, Flux, Qwen-Image)."""

    name = "velocity"
    logit_mean: float = 0.0  # SFT times t = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0

    def training_time(self, key, batch: int):
        return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (batch,), jnp.float32))

    def schedule_time(self, coeffs):
        """The model time of schedule steps (what NFT and one-step GRPO noise to)."""
        return coeffs["sigma"]

    def noised(self, x0, eps, t):
        t = per_sample(t, x0)
        return (1 - t) * x0 + t * eps

    def target(self, x0, eps):
        return eps - x0

    def x0(self, prediction, x, t):
        """x0_hat = x - t v; linear in the prediction (NFT mixes predictions through it)."""
        return x.astype(jnp.float32) - per_sample(t, x) * prediction.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Epsilon:
    """DDPM: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, the model predicts eps (SD1.5); alpha-bar from the
    scaled-linear betas."""

    name = "epsilon"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def alpha_bar(self, t):
        table = jnp.asarray(scaled_linear_alpha_bar(self.beta_start, self.beta_end, self.num_train_timesteps),
                            jnp.float32)
        return table[jnp.asarray(t).astype(jnp.int32)]

    def training_time(self, key, batch: int):
        return jax.random.randint(key, (batch,), 0, self.num_train_timesteps).astype(jnp.float32)

    def schedule_time(self, coeffs):
        return coeffs["model_t"]

    def noised(self, x0, eps, t):
        ab = per_sample(self.alpha_bar(t), x0)
        return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps

    def target(self, x0, eps):
        del x0
        return eps

    def x0(self, prediction, x, t):
        """x0_hat = (x - sqrt(1 - ab) eps_hat) / sqrt(ab); linear in the prediction."""
        ab = per_sample(self.alpha_bar(t), x)
        return (x.astype(jnp.float32) - jnp.sqrt(1 - ab) * prediction.astype(jnp.float32)) / jnp.sqrt(ab)
