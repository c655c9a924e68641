"""One reverse-diffusion step with the Gaussian log-probability of its transition.

Every step returns `StepOutput(sample, log_prob, mean, std)` and works in two
modes: draw the next sample from `key`, or score a given `next_sample` (how the
trainer re-evaluates a stored rollout). All arithmetic is fp32. `log_prob` is the
mean over every non-batch axis, so it is the same for (B, H, W, C) latents and
packed (B, L, D) tokens. A step whose std is 0 is deterministic: its log-prob is
defined as 0 and it is never trained. Formulas: REFERENCE_MATH.md section 1.
"""
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class StepOutput(NamedTuple):
    sample: jax.Array  # x at the next (less noisy) time
    log_prob: jax.Array  # (B,) mean over dims of log N(sample; mean, std^2)
    mean: jax.Array  # same shape as sample
    std: jax.Array  # (B,)


def per_sample(value, x):
    """Broadcast a scalar or (B,) coefficient against x's shape."""
    value = jnp.asarray(value, jnp.float32)
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def mean_over_dims(values):
    return values.mean(axis=tuple(range(1, values.ndim)))


def gaussian_log_prob(sample, mean, std, region=None):
    """Mean over dims of the Gaussian log-density; 0 where std == 0. With `region` (broadcastable to sample,
    1 where sampled) the mean is over the region's dims only."""
    std = per_sample(std, sample)
    positive = std > 0
    safe_std = jnp.where(positive, std, 1.0)
    density = jnp.where(positive, -((sample - mean) ** 2) / (2 * safe_std**2) - jnp.log(safe_std)
                        - 0.5 * math.log(2 * math.pi), 0.0)
    if region is None:
        return mean_over_dims(density)
    region = jnp.broadcast_to(jnp.asarray(region, jnp.float32), sample.shape)
    return mean_over_dims(region * density) / jnp.maximum(mean_over_dims(region), 1e-12)


def _finish(mean, std, key, next_sample) -> StepOutput:
    """Sample (or take) the next x and score it; `std` is (B,)."""
    if next_sample is None:
        if key is None:
            raise ValueError("a step needs either `key` (to sample) or `next_sample` (to score)")
        next_sample = mean + per_sample(std, mean) * jax.random.normal(key, mean.shape, jnp.float32)
    next_sample = next_sample.astype(jnp.float32)
    return StepOutput(next_sample, gaussian_log_prob(next_sample, mean, std), mean, std)


def _flow_estimates(v, x, t):
    """x0_hat = x - t v, eps_hat = x + (1 - t) v for x_t = (1 - t) x0 + t eps."""
    return x - t * v, x + (1 - t) * v


def flow_grpo_step(v, x, coeffs, noise_level, *, key=None, next_sample=None) -> StepOutput:
    """Flow-GRPO SDE: sigma_t = a sqrt(t / (1 - t)), mean with the score correction."""
    v, x = v.astype(jnp.float32), x.astype(jnp.float32)
    t, t_next = per_sample(coeffs["sigma"], x), per_sample(coeffs["sigma_next"], x)
    t_safe = per_sample(coeffs["sigma_safe"], x)
    dt = t_next - t
    sigma_t = per_sample(noise_level, x) * jnp.sqrt(t / (1 - t_safe))
    mean = x * (1 + sigma_t**2 / (2 * t) * dt) + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt
    return _finish(mean, _first(sigma_t * jnp.sqrt(-dt), x), key, next_sample)


def dance_grpo_step(v, x, coeffs, noise_level, *, key=None, next_sample=None) -> StepOutput:
    """DanceGRPO SDE: std = eta sqrt(t - t_next), mean = x + (v + eta^2 / (2t) eps_hat) dt."""
    v, x = v.astype(jnp.float32), x.astype(jnp.float32)
    t, t_next = per_sample(coeffs["sigma"], x), per_sample(coeffs["sigma_next"], x)
    eta = per_sample(noise_level, x)
    _, eps_hat = _flow_estimates(v, x, t)
    mean = x + (v + eta**2 / (2 * t) * eps_hat) * (t_next - t)
    std = _first(eta * jnp.sqrt(t - t_next), x)
    return _finish(mean, std, key, next_sample)


def cps_step(v, x, coeffs, noise_level, *, key=None, next_sample=None, log_prob_form="gaussian") -> StepOutput:
    """Coefficients-preserving sampling: sigma = t_next sin(a pi / 2), DDIM-like mean.

    `log_prob_form="anchor"` reproduces Flow-GRPO's CPS score -mean((x' - mean)^2),
    which drops the constants and the 1 / (2 sigma^2) factor.
    """
    v, x = v.astype(jnp.float32), x.astype(jnp.float32)
    t, t_next = per_sample(coeffs["sigma"], x), per_sample(coeffs["sigma_next"], x)
    sigma = t_next * jnp.sin(per_sample(noise_level, x) * math.pi / 2)
    x0_hat, eps_hat = _flow_estimates(v, x, t)
    mean = (1 - t_next) * x0_hat + jnp.sqrt(jnp.maximum(t_next**2 - sigma**2, 0.0)) * eps_hat
    out = _finish(mean, _first(sigma, x), key, next_sample)
    if log_prob_form == "anchor":
        return out._replace(log_prob=-mean_over_dims((out.sample - mean) ** 2))
    if log_prob_form != "gaussian":
        raise ValueError(f"cps log_prob_form {log_prob_form!r}: expected 'gaussian' or 'anchor'")
    return out


def ode_step(v, x, coeffs, noise_level=0.0, *, key=None, next_sample=None) -> StepOutput:
    """Deterministic Euler step x + v dt (evaluation, and steps outside an SDE window)."""
    del noise_level, key
    v, x = v.astype(jnp.float32), x.astype(jnp.float32)
    mean = x + v * (per_sample(coeffs["sigma_next"], x) - per_sample(coeffs["sigma"], x))
    sample = mean if next_sample is None else next_sample.astype(jnp.float32)
    zeros = jnp.zeros(x.shape[:1], jnp.float32)
    return StepOutput(sample, zeros, mean, zeros)


def ddim_step(eps, x, coeffs, noise_level, *, key=None, next_sample=None) -> StepOutput:
    """DDIM with eta (DDPO's log-prob step); eta = 0 is diffusers' deterministic DDIM."""
    eps, x = eps.astype(jnp.float32), x.astype(jnp.float32)
    ab, ab_prev = per_sample(coeffs["alpha_bar"], x), per_sample(coeffs["alpha_bar_prev"], x)
    x0_hat = (x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
    variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = per_sample(noise_level, x) * jnp.sqrt(variance)
    mean = jnp.sqrt(ab_prev) * x0_hat + jnp.sqrt(jnp.maximum(1 - ab_prev - std**2, 0.0)) * eps
    return _finish(mean, _first(std, x), key, next_sample)


def _first(per_sample_value, x):
    """(B, 1, ..., 1) or scalar coefficient -> (B,)."""
    return jnp.broadcast_to(per_sample_value, (x.shape[0],) + (1,) * (x.ndim - 1)).reshape(x.shape[0])


STEP_FUNCTIONS = {
    "flow_grpo": flow_grpo_step,
    "dance_grpo": dance_grpo_step,
    "cps": cps_step,
    "ode": ode_step,
    "ddim": ddim_step,
}
# what each step reads from the model: a family's parameterization must match (setup.check_family)
STEP_PREDICTIONS = {"flow_grpo": "velocity", "dance_grpo": "velocity", "cps": "velocity", "ode": "velocity",
                    "ddim": "epsilon"}


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Which step runs and how noisy it is; hashable, so it can be a static jit argument.

    `noise_level` is Flow-GRPO's / CPS's `a` (0.7 SD3, 0.9 Flux, 1.2 Qwen-Image) or
    DanceGRPO's / DDIM's eta. `window` scales it per step: 0 outside an SDE window
    turns every kind into its deterministic solver (ODE, or DDIM with eta = 0).
    """

    kind: str = "flow_grpo"
    noise_level: float = 0.7
    cps_log_prob: str = "gaussian"

    def __post_init__(self):
        if self.kind not in STEP_FUNCTIONS:
            raise ValueError(f"sampler kind {self.kind!r}: expected one of {sorted(STEP_FUNCTIONS)}")

    def step(self, model_out, x, coeffs, *, window=1.0, key=None, next_sample=None, region=None) -> StepOutput:
        """One step; with `region` (1 where the latents are sampled) the log-prob covers the region only."""
        noise = self.noise_level * jnp.asarray(window, jnp.float32)
        kwargs = {"log_prob_form": self.cps_log_prob} if self.kind == "cps" else {}
        out = STEP_FUNCTIONS[self.kind](model_out, x, coeffs, noise, key=key, next_sample=next_sample, **kwargs)
        if region is None:
            return out
        if self.kind == "cps" and self.cps_log_prob != "gaussian":
            raise ValueError(f"sampler cps with log-prob form {self.cps_log_prob!r} cannot score a region; "
                             "use 'gaussian'")
        return out._replace(log_prob=gaussian_log_prob(out.sample, out.mean, out.std, region))
