"""What is benchmarked: one family's denoiser at one size, described once for our side and the torch side.

Both sides build the denoiser from the same config and read the same host inputs: initial noise and random
conditioning shaped like the encoders' outputs (text features, pooled text, mask, masked-image latents, image
embeddings). No VAE, text or image encoder is built: the rollout and the update only run the denoiser. Weights
are random and drawn independently on each side, since only speed is compared.

Sizes: `tiny` is the library's tiny builders' configs; `full` is
- sd15_inpaint: the SD1.5-inpainting UNet config of tools/convert_weights/sd15.py;
- flux_fill: Flux.1 Fill, FluxConfig's defaults with the Fill channels the library derives;
- sd3: SD3.5-Medium's transformer/config.json (SD35_MEDIUM; a 16-channel VAE, CLIP-L + CLIP-G, T5-XXL);
- calligrapher: Flux.1 Fill plus the released adapter (AdapterConfig's defaults: MLP + Q-Former, 128 image
  tokens from SigLIP so400m's 1152-wide pooled embedding), on the family's canvas (the strip above the image).
Each builder also says how large the family's largest attention is (attention_bench.py times it).
"""
import dataclasses
from typing import Any, Callable

import numpy as np

from jax_inpaint_rl.models.calligrapher import adapter as adapter_lib
from jax_inpaint_rl.models.calligrapher import family as calligrapher
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.flux import transformer as flux_transformer
from jax_inpaint_rl.models.flux.transformer import FluxConfig
from jax_inpaint_rl.models.layers import siglip
from jax_inpaint_rl.models.layers.clip_text import CLIPTextConfig
from jax_inpaint_rl.models.layers.t5 import T5Config
from jax_inpaint_rl.models.layers.vae import VAEConfig
from jax_inpaint_rl.models.random_init import random_params
from jax_inpaint_rl.models.sd15 import family as sd15_inpaint
from jax_inpaint_rl.models.sd3 import family as sd3
from jax_inpaint_rl.models.sd3 import transformer as sd3_transformer
from jax_inpaint_rl.models.sd3.transformer import SD3Config
from tools.convert_weights.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

SIZES = ("tiny", "full")
FLUX_LATENT_CHANNELS = 16  # the Flux.1 VAE's latent channels (its other settings do not reach the denoiser)
SD15_CONFIGS = {"tiny": (sd15_inpaint.TINY_UNET, sd15_inpaint.TINY_VAE, sd15_inpaint.TINY_TEXT),
                "full": (SD15_UNET, SD15_VAE, SD15_TEXT)}
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (2,243,171,520 parameters)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# the rest of the SD3.5 pipeline, as far as the family's checks read it (none of it runs in the bench)
SD3_VAE = VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                    use_post_quant_conv=False)
SD3_CLIP_L = CLIPTextConfig(projection_dim=768)
SD3_CLIP_G = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280)


@dataclasses.dataclass(frozen=True)
class Model:
    name: str  # family name
    size: str  # tiny | full
    family: Family  # our pure functions; `tokenize` is None since the text features are random
    denoiser_config: dict  # the torch denoiser's constructor kwargs (diffusers', or tools' for Calligrapher)
    param_shapes: Callable[[], Any]  # () -> our denoiser's parameter tree of ShapeDtypeStructs
    host_params: Callable[[int], Any] | None  # tiny only: seed -> the library's host-side random weights
    conditioning: Callable[[np.random.Generator, int], dict]  # (rng, batch) -> cond in our layout
    # (batch, resolution) -> (batch, tokens, heads, head dim) of the family's largest attention
    attention_shape: Callable[[int, int], tuple[int, int, int, int]]


def _normal(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape, np.float32)


def _tiny_host_params(size: str, shapes: Callable[[], Any], dtype: str):
    return (lambda seed: random_params(shapes(), seed, dtype)) if size == "tiny" else None


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

    def attention_shape(batch, resolution):
        """Self-attention at the first UNet level."""
        h, w, _ = family.latent_shape(resolution, resolution)
        heads = unet["attention_head_dim"]
        heads = heads[0] if isinstance(heads, (list, tuple)) else heads
        return batch, h * w, heads, unet["block_out_channels"][0] // heads

    return Model(
        name="sd15_inpaint", size=size, family=family, denoiser_config=dict(unet),
        param_shapes=lambda: modules.param_shapes()["unet"],
        host_params=(lambda seed: random_params(modules.param_shapes()["unet"], seed)) if size == "tiny" else None,
        conditioning=conditioning, attention_shape=attention_shape)


def full_flux_fill_configs() -> tuple[FluxConfig, VAEConfig, CLIPTextConfig, T5Config]:
    """Flux.1 Fill: FluxConfig's defaults are Flux.1's; Fill adds the masked-image and mask channels."""
    vae = VAEConfig(latent_channels=FLUX_LATENT_CHANNELS, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxConfig(in_channels=flux.expected_in_channels("flux_fill", vae),
                             out_channels=4 * vae.latent_channels, guidance_embeds=True)
    return transformer, vae, CLIPTextConfig(), T5Config()


def full_flux_fill_modules(dtype: str, remat: bool) -> flux.Modules:
    return flux.build_modules("flux_fill", *full_flux_fill_configs(), dtype, remat, source="bench full")


def _flux_conditioning(config: FluxConfig, latent_grid: tuple[int, int], text_length: int):
    """(rng, batch) -> Flux Fill's conditioning: T5 states, CLIP pooled, the masked-image + mask channels."""
    height, width = latent_grid
    fill_channels = config.in_channels - config.output_channels

    def conditioning(rng, batch):
        return {"text": _normal(rng, (batch, text_length, config.joint_attention_dim)),
                "pooled": _normal(rng, (batch, config.pooled_projection_dim)),
                "fill": _normal(rng, (batch, height, width, fill_channels))}

    return conditioning


def _flux_attention_shape(family: Family, config: FluxConfig, text_length: int):
    """The joint attention over text + image tokens."""
    def attention_shape(batch, resolution):
        h, w, _ = family.latent_shape(resolution, resolution)
        return batch, h * w + text_length, config.num_attention_heads, config.attention_head_dim

    return attention_shape


def _flux_text_length(size: str) -> int:
    return flux.hash_tokenize([""])["t5"].shape[1] if size == "tiny" else flux.T5_LENGTH


def flux_fill_model(size: str, resolution: int, dtype: str, remat: bool) -> Model:
    """FluxTransformer2DModel with 384 input channels (tiny: the library's tiny Fill); embedded guidance."""
    modules = flux.tiny_modules("flux_fill", dtype, remat) if size == "tiny" else full_flux_fill_modules(dtype, remat)
    family = flux.make_family(modules, tokenize=None)
    config = modules.transformer.config
    text_length = _flux_text_length(size)
    shapes = lambda: flux_transformer.param_shapes(config)  # noqa: E731
    return Model(
        name="flux_fill", size=size, family=family, denoiser_config=dataclasses.asdict(config),
        param_shapes=shapes, host_params=_tiny_host_params(size, shapes, dtype),
        conditioning=_flux_conditioning(config, family.latent_shape(resolution, resolution)[:2], text_length),
        attention_shape=_flux_attention_shape(family, config, text_length))


def sd3_model(size: str, resolution: int, dtype: str, remat: bool) -> Model:
    """SD3Transformer2DModel (tiny: the library's tiny sd3, SD3.5-Medium's structure; full: SD3.5-Medium);
    real CFG on {'positive', 'negative'} text (CLIP-L + CLIP-G penultimate states and the T5's, (B, 77 + T5
    length, 4096) at full size) and pooled text (B, 2048)."""
    if size == "tiny":
        modules = sd3.tiny_modules("sd3", dtype, remat)
        config = modules.transformer.config
        denoiser_config = dataclasses.asdict(config)
    else:
        config = SD3Config.from_diffusers(SD35_MEDIUM, "bench SD35_MEDIUM")
        modules = sd3.build_modules("sd3", config, SD3_VAE, SD3_CLIP_L, SD3_CLIP_G, T5Config(), dtype=dtype,
                                    remat=remat, source="bench full")
        denoiser_config = dict(SD35_MEDIUM)
    family = sd3.make_family(modules, tokenize=None)
    text_shape = (flux.CLIP_LENGTH + modules.t5_length, config.joint_attention_dim)
    shapes = lambda: sd3_transformer.param_shapes(config)  # noqa: E731

    def conditioning(rng, batch):
        prompt = lambda: {"text": _normal(rng, (batch, *text_shape)),  # noqa: E731
                          "pooled": _normal(rng, (batch, config.pooled_projection_dim))}
        return {"positive": prompt(), "negative": prompt()}

    def attention_shape(batch, resolution):
        """The joint attention over image patches + text tokens."""
        h, w, _ = family.latent_shape(resolution, resolution)
        patches = (h // config.patch_size) * (w // config.patch_size)
        return batch, patches + text_shape[0], config.num_attention_heads, config.attention_head_dim

    return Model(name="sd3", size=size, family=family, denoiser_config=denoiser_config, param_shapes=shapes,
                 host_params=_tiny_host_params(size, shapes, dtype), conditioning=conditioning,
                 attention_shape=attention_shape)


def full_calligrapher_modules(dtype: str, remat: bool) -> calligrapher.Modules:
    """Flux.1 Fill + the released adapter, SigLIP so400m as the image encoder (its width is what the adapter
    reads)."""
    return calligrapher.build_modules(*full_flux_fill_configs(), siglip.SO400M, adapter_lib.AdapterConfig(),
                                      dtype, remat, source="bench full")


def calligrapher_model(size: str, resolution: int, dtype: str, remat: bool) -> Model:
    """Flux Fill with image-prompt attention in every block and the image projection, as one denoiser tree
    {'transformer', 'image_proj', 'ip_attention'}; the latents are the canvas (the reference's W x W strip above
    the H x W image); conditioning: Fill's on the canvas and SigLIP's pooled embedding (B, E); embedded guidance."""
    modules = calligrapher.tiny_modules(dtype, remat) if size == "tiny" else full_calligrapher_modules(dtype, remat)
    family = calligrapher.make_family(modules, tokenize=None)
    config, adapter = modules.transformer.config, modules.adapter
    text_length = _flux_text_length(size)
    fill = _flux_conditioning(config, family.latent_shape(resolution, resolution)[:2], text_length)

    def conditioning(rng, batch):
        return {**fill(rng, batch), "image_embeds": _normal(rng, (batch, adapter.image_embed_dim))}

    def shapes():
        return {"transformer": flux_transformer.param_shapes(config), **adapter_lib.param_shapes(config, adapter)}

    return Model(
        name="calligrapher", size=size, family=family,
        denoiser_config={"flux": dataclasses.asdict(config), "adapter": dataclasses.asdict(adapter)},
        param_shapes=shapes, host_params=_tiny_host_params(size, shapes, dtype), conditioning=conditioning,
        attention_shape=_flux_attention_shape(family, config, text_length))


BUILDERS = {"sd15_inpaint": sd15_inpaint_model, "flux_fill": flux_fill_model, "sd3": sd3_model,
            "calligrapher": calligrapher_model}


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
