"""A small but complete model family for trainer tests: pixel-space 'latents', a per-pixel MLP denoiser.

It fulfils the Family contract exactly as the real families do (tokenize,
encode_prompt, prepare_condition, denoise, encode_image, decode), so the trainer
is exercised end to end in seconds.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.guidance import BatchedCFG
from jax_inpaint_rl.diffusion.parameterization import Epsilon, Velocity
from jax_inpaint_rl.models.family import Family

VOCAB, WIDTH, DOWN = 64, 32, 4


def _tokenize(prompts, inputs=None):
    ids = np.zeros((len(prompts), 8), np.int32)
    for row, prompt in enumerate(prompts):
        words = [sum(map(ord, w)) % (VOCAB - 1) + 1 for w in prompt.lower().split()][:8]
        ids[row, :len(words)] = words
    return {"ids": ids}


def _pool(images):
    b, h, w, c = images.shape
    return images.reshape(b, h // DOWN, DOWN, w // DOWN, DOWN, c).mean(axis=(2, 4))


def _encode_prompt(params, tokens, inputs, embeddings):
    ids = tokens["ids"]
    embedded = params["text"]["table"][ids] * (ids > 0)[..., None]
    return {"text": embedded.sum(1) / jnp.maximum((ids > 0).sum(1, keepdims=True), 1)}


def _prepare_condition(params, inputs):
    image, mask = inputs["image"], inputs["mask"]
    return {"masked": _pool(image * (mask < 0.5)), "mask": _pool(mask)}


def _denoise(params, x, t, cond):
    p = params["denoiser"]
    t = jnp.broadcast_to(t.reshape(-1, 1, 1, 1), x.shape[:3] + (1,)).astype(x.dtype)
    text = jnp.broadcast_to(cond["text"][:, None, None, :], x.shape[:3] + (cond["text"].shape[-1],))
    h = jnp.concatenate([x, cond["masked"], cond["mask"], text, t], axis=-1)
    h = jax.nn.silu(h @ p["w1"] + p["b1"])
    h = jax.nn.silu(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def tiny(seed: int = 0, resolution: int = 16, prediction: str = "velocity"):
    keys = jax.random.split(jax.random.key(seed), 4)
    features = 3 + 3 + 1 + 8 + 1
    params = {
        "text": {"table": 0.5 * jax.random.normal(keys[0], (VOCAB, 8))},
        "denoiser": {
            "w1": jax.random.normal(keys[1], (features, WIDTH)) / np.sqrt(features), "b1": jnp.zeros(WIDTH),
            "w2": jax.random.normal(keys[2], (WIDTH, WIDTH)) / np.sqrt(WIDTH), "b2": jnp.zeros(WIDTH),
            "w3": jax.random.normal(keys[3], (WIDTH, 3)) * 0.01, "b3": jnp.zeros(3),
        },
    }
    schedule = ((lambda steps, shape: schedules.sd3_schedule(steps, 3.0)) if prediction == "velocity"
                else (lambda steps, shape: schedules.ddim_schedule(steps)))
    family = Family(
        name="toy", parameterization=Velocity() if prediction == "velocity" else Epsilon(), guidance=BatchedCFG(),
        schedule=schedule, inputs=("image", "mask"), denoiser_key="denoiser", tokenize=_tokenize,
        encode_prompt=_encode_prompt, prepare_condition=_prepare_condition, denoise=_denoise,
        encode_image=lambda params, image: _pool(image),
        decode=lambda params, x: jnp.clip(jnp.repeat(jnp.repeat(x, DOWN, 1), DOWN, 2), -1, 1),
        latent_shape=lambda h, w: (h // DOWN, w // DOWN, 3),
        tensor_rules=(("/w1$", -1), ("/w2$", -2)), text_encoders=("text",),
    )
    return family, params
