"""What is benchmarked: one family's denoiser at one size, described once for our side and the torch side.

Both sides build the denoiser from the same config (tiny: the configs of the library's tiny builders;
full: the SD1.5-inpainting UNet config of tools/convert_weights/sd15.py, and Flux.1 Fill as FluxConfig's
defaults with the Fill channels the library derives) and read the same host inputs: initial noise and
random conditioning shaped like the encoders' outputs (text features, mask, masked-image latents). No VAE
or text encoder is built: the rollout and the update only run the denoiser. Weights are random and drawn
independently on each side, since only speed is compared.
"""
import dataclasses
from typing import Any, Callable

import numpy as np

from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.flux import transformer as flux_transformer
from jax_inpaint_rl.models.sd15 import family as sd15_inpaint
from jax_inpaint_rl.models.layers.clip_text import CLIPTextConfig
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.models.random_init import random_params
from jax_inpaint_rl.models.flux.transformer import FluxConfig
from jax_inpaint_rl.models.layers.t5 import T5Config
from jax_inpaint_rl.models.layers.vae import VAEConfig
from tools.convert_weights.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

SIZES = ("tiny", "full")
FLUX_LATENT_CHANNELS = 16  # the Flux.1 VAE's latent channels (its other settings do not reach the denoiser)
SD15_CONFIGS = {"tiny": (sd15_inpaint.TINY_UNET, sd15_inpaint.TINY_VAE, sd15_inpaint.TINY_TEXT),
                "full": (SD15_UNET, SD15_VAE, SD15_TEXT)}


@dataclasses.dataclass(frozen=True)
class Model:
    name: str  # family name
    size: str  # tiny | full
    family: Family  # our pure functions; `tokenize` is None since the text features are random
    denoiser_config: dict  # diffusers constructor kwargs of the same denoiser
    param_shapes: Callable[[], Any]  # () -> our denoiser's parameter tree of ShapeDtypeStructs
    host_params: Callable[[int], Any] | None  # tiny only: seed -> the library's host-side random weights
    conditioning: Callable[[np.random.Generator, int], dict]  # (rng, batch) -> cond in our layout


def _normal(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape, np.float32)


def sd15_inpaint_model(size: str, resolution: int, dtype: str, remat: bool) -> Model:
    """UNet2DConditionModel with 9 input channels; CFG conditioning {'positive', 'negative'}."""
    unet, vae, text = SD15_CONFIGS[size]
    modules = sd15_inpaint.build_modules(unet, vae, text, dtype, param_dtype=dtype, remat=remat,
                                         source=f"bench {size}")
    family = sd15_inpaint.make_family(modules, tokenize=None)
    height, width, channels = family.latent_shape(resolution, resolution)
    text_shape = (text["max_position_embeddings"], unet["cross_attention_dim"])

    def conditioning(rng, batch):
        image = {"mask": (rng.random((batch, height, width, 1)) < 0.5).astype(np.float32),
                 "masked_latents": _normal(rng, (batch, height, width, channels))}
        return {"positive": {"text": _normal(rng, (batch, *text_shape)), **image},
                "negative": {"text": _normal(rng, (batch, *text_shape)), **image}}

    return Model(
        name="sd15_inpaint", size=size, family=family, denoiser_config=dict(unet),
        param_shapes=lambda: modules.param_shapes()["unet"],
        host_params=(lambda seed: random_params(modules.param_shapes()["unet"], seed)) if size == "tiny" else None,
        conditioning=conditioning)


def full_flux_fill_modules(dtype: str, remat: bool) -> flux.Modules:
    """Flux.1 Fill: FluxConfig's defaults are Flux.1's; Fill adds the masked-image and mask channels."""
    vae = VAEConfig(latent_channels=FLUX_LATENT_CHANNELS, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxConfig(in_channels=flux.expected_in_channels("flux_fill", vae),
                             out_channels=4 * vae.latent_channels, guidance_embeds=True)
    return flux.build_modules("flux_fill", transformer, vae, CLIPTextConfig(), T5Config(), dtype, remat,
                              source="bench full")


def flux_fill_model(size: str, resolution: int, dtype: str, remat: bool) -> Model:
    """FluxTransformer2DModel with 384 input channels (tiny: the library's tiny Fill); embedded guidance."""
    modules = flux.tiny_modules("flux_fill", dtype, remat) if size == "tiny" else full_flux_fill_modules(dtype, remat)
    family = flux.make_family(modules, tokenize=None)
    config = modules.transformer.config
    height, width, _ = family.latent_shape(resolution, resolution)
    text_length = flux.hash_tokenize([""])["t5"].shape[1] if size == "tiny" else flux.T5_LENGTH
    fill_channels = config.in_channels - config.output_channels

    def conditioning(rng, batch):
        return {"text": _normal(rng, (batch, text_length, config.joint_attention_dim)),
                "pooled": _normal(rng, (batch, config.pooled_projection_dim)),
                "fill": _normal(rng, (batch, height, width, fill_channels))}

    def host_params(seed):
        return random_params(flux_transformer.param_shapes(config), seed, dtype)

    return Model(
        name="flux_fill", size=size, family=family, denoiser_config=dataclasses.asdict(config),
        param_shapes=lambda: flux_transformer.param_shapes(config),
        host_params=host_params if size == "tiny" else None, conditioning=conditioning)


BUILDERS = {"sd15_inpaint": sd15_inpaint_model, "flux_fill": flux_fill_model}


def build(name: str, size: str, resolution: int, dtype: str, remat: bool) -> Model:
    if name not in BUILDERS:
        raise ValueError(f"family {name!r}: expected one of {sorted(BUILDERS)}")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {SIZES}")
    return BUILDERS[name](size, resolution, dtype, remat)


def host_inputs(model: Model, batch: int, resolution: int, seed: int) -> dict:
    """Initial noise (our latent layout), conditioning and advantages, as host arrays both sides copy."""
    rng = np.random.default_rng(seed)
    latent_shape = model.family.latent_shape(resolution, resolution)
    return {"x_init": _normal(rng, (batch, *latent_shape)), "cond": model.conditioning(rng, batch),
            "advantages": _normal(rng, (batch,))}
