"""Supervised fine-tuning losses (also the seeds' warm-up before RL)."""
import jax
import jax.numpy as jnp

from jax_inpaint_rl.diffusion.steps import per_sample


def logit_normal_t(key, shape, mean: float = 0.0, std: float = 1.0):
    """Flow-matching training times t = sigmoid(N(mean, std))."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def flow_noisy_latents(x0, eps, t):
    """x_t = (1 - t) x0 + t eps."""
    t = per_sample(t, x0)
    return (1 - t) * x0 + t * eps


def ddpm_noisy_latents(x0, eps, alpha_bar_t):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    ab = per_sample(alpha_bar_t, x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps


def region_weights(mask, inside: float = 1.0, outside: float = 1.0):
    """Per-element weights from a fill mask in the latent layout (1 = fill)."""
    return outside + (inside - outside) * mask.astype(jnp.float32)


def sft_loss(prediction, target, weights=None):
    """Weighted MSE: target = eps - x0 for velocity models, eps for epsilon models.

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


def sft_target(prediction_type: str, x0, eps):
    if prediction_type == "velocity":
        return eps - x0
    if prediction_type == "epsilon":
        return eps
    raise ValueError(f"prediction type {prediction_type!r}: expected 'velocity' or 'epsilon'")
