"""A tiny differentiable denoiser shared by the core tests (stands in for a model family)."""
import jax
import jax.numpy as jnp

LATENT_SHAPE = (4, 4, 3)


def init_params(key, channels: int = LATENT_SHAPE[-1]):
    k1, k2 = jax.random.split(key)
    return {"w": 0.3 * jax.random.normal(k1, (channels, channels)), "b": 0.1 * jax.random.normal(k2, (channels,))}


def denoise(params, x, t, cond):
    """Velocity / epsilon prediction from latents (B, H, W, C), time (B,), cond {'emb': (B, C)}."""
    t = t.reshape(-1, 1, 1, 1) / jnp.maximum(1.0, jnp.max(jnp.abs(t)))
    return jnp.tanh(x @ params["w"] + t * params["b"] + cond["emb"][:, None, None, :])


def make_cond(key, batch: int, channels: int = LATENT_SHAPE[-1]):
    return {"emb": jax.random.normal(key, (batch, channels))}
