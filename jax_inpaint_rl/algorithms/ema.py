"""Exponential moving averages of parameter trees (EMA weights, NFT's old params)."""
import jax
import jax.numpy as jnp


def ema_update(average, params, decay):
    """average <- decay average + (1 - decay) params, in the average's dtype."""
    decay = jnp.asarray(decay, jnp.float32)
    return jax.tree.map(lambda a, p: (decay * a + (1 - decay) * p.astype(jnp.float32)).astype(a.dtype), average, params)


def ema_update_every(average, params, step, decay: float, interval: int = 1):
    """Apply `ema_update` on steps that are multiples of `interval` (the seeds' --ema_update_interval)."""
    due = (jnp.asarray(step) % interval) == 0
    return jax.lax.cond(due, lambda: ema_update(average, params, decay), lambda: average)
