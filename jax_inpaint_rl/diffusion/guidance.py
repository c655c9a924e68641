"""Guidance as values: each wraps an unguided `denoise(params, x, t, cond)` into the guided policy.

A family names its guidance (`Family.guidance`); rollout and training call the
same guided function, so the log-probs they compare come from one function.
Guidances that need a negative prompt take the conditioning as
`{'positive': cond, 'negative': cond}` (`needs_negative`); the others take the
positive conditioning alone.
"""
import dataclasses

import jax
import jax.numpy as jnp


def positive(cond):
    """The positive conditioning of a {'positive', 'negative'} cond (a plain cond is returned as is)."""
    return cond["positive"] if isinstance(cond, dict) and "positive" in cond else cond


@dataclasses.dataclass(frozen=True)
class BatchedCFG:
    """Classifier-free guidance from one call on the batch [negative; positive] (SD1.5, SD3):
    out = neg + scale (pos - neg). A scale <= 1 calls the model once on the positive half, as the diffusers
    pipelines do (their `do_classifier_free_guidance` is scale > 1)."""

    needs_negative = True

    def guided(self, denoise, scale: float):
        if scale <= 1.0:
            return self.unguided(denoise, scale)

        def guided(params, x, t, cond):
            both = jax.tree.map(lambda n, p: jnp.concatenate([n, p]), cond["negative"], cond["positive"])
            out = denoise(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
            negative, positive_out = jnp.split(out, 2)
            return negative + scale * (positive_out - negative)

        return guided

    def unguided(self, denoise, scale: float):
        del scale
        return lambda params, x, t, cond: denoise(params, x, t, positive(cond))


@dataclasses.dataclass(frozen=True)
class EmbeddedGuidance:
    """Guidance-distilled models (Flux): the scale is a per-sample model input `cond['guidance']`, in the
    guided and the unguided call alike (the model never runs without it)."""

    needs_negative = False

    def guided(self, denoise, scale: float):
        def guided(params, x, t, cond):
            return denoise(params, x, t, {**cond, "guidance": jnp.full(x.shape[:1], scale, jnp.float32)})

        return guided

    def unguided(self, denoise, scale: float):
        return self.guided(denoise, scale)


@dataclasses.dataclass(frozen=True)
class TrueCFG:
    """Two calls, one per prompt (their text lengths may differ), combined as neg + scale (pos - neg); with
    `rescale` the result is scaled back to the positive prediction's norm over the feature axis, as
    Qwen-Image's pipelines do. A scale <= 1 calls the model once on the positive prompt."""

    rescale: bool = True
    needs_negative = True

    def guided(self, denoise, scale: float):
        if scale <= 1.0:
            return self.unguided(denoise, scale)

        def guided(params, x, t, cond):
            positive_out = denoise(params, x, t, cond["positive"]).astype(jnp.float32)
            negative = denoise(params, x, t, cond["negative"]).astype(jnp.float32)
            combined = negative + scale * (positive_out - negative)
            if not self.rescale:
                return combined
            norm = lambda a: jnp.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
            return combined * (norm(positive_out) / norm(combined))

        return guided

    def unguided(self, denoise, scale: float):
        del scale
        return lambda params, x, t, cond: denoise(params, x, t, positive(cond))

