"""Guidance as wrappers around an unguided `denoise(params, x, t, cond)`.

The wrapped function has the same signature, so rollout and training call the
same guided policy (the log-probs they compare come from one function).
"""
import jax
import jax.numpy as jnp


def classifier_free(denoise, scale: float):
    """Batch-concatenated CFG: cond = {'positive': pytree, 'negative': pytree}.

    out = neg + scale (pos - neg), from one denoiser call on a doubled batch.
    """

    def guided(params, x, t, cond):
        both = jax.tree.map(lambda n, p: jnp.concatenate([n, p]), cond["negative"], cond["positive"])
        out = denoise(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        negative, positive = jnp.split(out, 2)
        return negative + scale * (positive - negative)

    return guided


def embedded(denoise, scale: float):
    """Guidance-distilled models (Flux): the scale is a per-sample model input `cond['guidance']`."""

    def guided(params, x, t, cond):
        return denoise(params, x, t, {**cond, "guidance": jnp.full(x.shape[:1], scale, jnp.float32)})

    return guided


def unguided(cond):
    """The conditioning an unguided call needs from a CFG-style cond."""
    return cond["positive"] if isinstance(cond, dict) and "positive" in cond else cond


def guide(denoise, style: str, scale: float):
    """Pick the wrapper by name: 'cfg', 'embedded' or 'none'."""
    if style == "cfg":
        return classifier_free(denoise, scale) if scale != 1.0 else (lambda p, x, t, c: denoise(p, x, t, unguided(c)))
    if style == "embedded":
        return embedded(denoise, scale)
    if style == "none":
        return denoise
    raise ValueError(f"guidance style {style!r}: expected 'cfg', 'embedded' or 'none'")
