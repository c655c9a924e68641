"""The `calligrapher` family: Flux.1 Fill with Calligrapher's SigLIP image-prompt adapter.

Calligrapher fills a masked region with given text in the style of a reference crop. The
model is FLUX.1-Fill-dev (models/flux) plus an adapter (adapter.py): the SigLIP vision tower's
pooled embedding of the reference (models/layers/siglip.py, frozen) is projected to image
tokens that every Flux block attends to. The reference is used twice, as in the release:
- the image encoder sees it letterboxed onto black (the loader's `style_image`, S x S with
  S = `style_resolution` = 512 as the release letterboxes), resized to SigLIP's 384 px
  (bicubic, `jax.image.resize`; mean = std = 0.5, i.e. our [-1, 1] range as it is);
- the Fill model sees it as context: pasted above the source as a strip, with the mask zero
  over the strip; Fill runs on the taller canvas and the strip is cropped off.

Canvas (our static-shape choice): for a source of H x W, the strip is the letterboxed style
image resized to W x W (bilinear), so the canvas is (W + H) x W whatever the reference. The
release instead resizes the bare reference to width W and height round16(W h_ref / w_ref),
a strip whose height varies per reference; ours holds the same pixels for references wider
than tall (the letterbox adds black bands above and below them) and shrinks taller ones into
the centre with black at the sides, at the cost of a fixed W rows (at 512 px: 2048 image
tokens instead of 1024 + the strip's). The mask canvas is zeros (W x W) over the mask (H x W),
(W + H) x W; the release sizes it (W + h_strip) x W, right only for square sources.

What the trainer sees (the Family contract):
- inputs ('image', 'mask', 'style_image'); `latent_shape(H, W)` is the canvas' packed latent
  grid ((W + H) / 16, W / 16, 64): rollouts and log-probs run on the whole canvas, as the
  release samples it; `decode` crops the strip off, so images are (H, W) and the trainer's
  composite with the batch image and mask lines up;
- `encode_image(params, target)` (SFT targets) cannot know the reference, so its strip rows are
  zero latents, and `denoise` stops the gradient through the strip rows of its output: the strip
  is scaffolding whose pixels are discarded, and nothing is learned there (SFT's loss value still
  includes the strip rows' error against those zeros);
- the trained tree is params['denoiser'] = {'transformer': Flux, 'image_proj': {'mlp', 'qformer'},
  'ip_attention': {'double' | 'single': {'to_k_ip', 'to_v_ip'}}} (ip kernels stacked per block
  kind): `train.trainable='subset'` with '/(image_proj|ip_attention)/' trains the adapter alone,
  'subset+lora' adds LoRA on the Flux projections;
- the prompt template: the data's prompt is the text to write; `tokenize` turns it into
  "The text is '{text}'." (a prompt already starting with "The text is " is kept as written);
- velocity, the Flux schedule (shifted by the canvas' token count), embedded guidance (30).
Components: 'denoiser', 'vae', 'text_encoder' (CLIP), 'text_encoder_2' (T5), 'image_encoder' (SigLIP).
"""
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from jax_inpaint_rl.diffusion.guidance import EmbeddedGuidance
from jax_inpaint_rl.diffusion.parameterization import Velocity
from jax_inpaint_rl.models.calligrapher import adapter as adapter_lib
from jax_inpaint_rl.models.calligrapher.adapter import AdapterConfig, ImageProjection, IPFluxTransformer
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.flux.transformer import FluxConfig, FluxTransformer
from jax_inpaint_rl.models.layers import clip_text, siglip, t5
from jax_inpaint_rl.models.layers import vae as vae_lib
from jax_inpaint_rl.models.params_io import check_family, check_shapes, load_params, read_json
from jax_inpaint_rl.models.random_init import random_params

NAME = "calligrapher"
STYLE_RESOLUTION = 512  # the release letterboxes the reference onto 512 x 512 for the image encoder
PROMPT_TEMPLATE = "The text is '{}'."
ADAPTER_COMPONENTS = ("image_proj", "ip_attention")  # stored beside 'transformer'; trained as the denoiser
IMAGE_ENCODER = "image_encoder"
# Flux's tensor-parallel layers, and the image-prompt keys / values (split on their heads like to_k / to_v)
TENSOR_RULES = flux.TENSOR_RULES + ((r"/(to_k_ip|to_v_ip)/kernel$", -1),)


@dataclasses.dataclass(frozen=True)
class Modules:
    flux: flux.Modules  # the Fill model's VAE, CLIP, T5 and config (its plain transformer module is unused)
    transformer: FluxTransformer  # with the image-prompt attention (adapter.IPFluxTransformer)
    projection: ImageProjection
    image_encoder: siglip.SiglipVision
    adapter: AdapterConfig
    style_resolution: int = STYLE_RESOLUTION

    @property
    def factor(self) -> int:
        """Pixels per packed latent cell (VAE factor x 2x2 packing): 16 for Flux."""
        return 2 * self.flux.vae.config.downscale


def template(prompt: str) -> str:
    return prompt if prompt.startswith("The text is ") else PROMPT_TEMPLATE.format(prompt)


def templated(tokenize):
    """A tokenizer that writes each prompt into Calligrapher's template first."""
    def tokenize_text(prompts, inputs=None):
        return tokenize([template(p) for p in prompts], inputs)

    return tokenize_text


# --- the canvas ------------------------------------------------------------------------------------------

def _resize(images, size: int, method: str, width: int | None = None):
    """(B, S, S, C) -> (B, size, width or size, C); an image already that size is returned as it is."""
    shape = (images.shape[0], size, width or size, images.shape[-1])
    return images if images.shape == shape else jax.image.resize(images, shape, method)


def context_strip(style, width: int):
    """The reference as context: the letterboxed style image resized to width x width (bilinear)."""
    return _resize(style, width, "linear")


def canvas(image, mask, style):
    """(strip over image (B, W + H, W, 3), zeros over the binary mask (B, W + H, W, 1))."""
    width = image.shape[2]
    strip = context_strip(style, width).astype(image.dtype)
    canvas_mask = jnp.concatenate([jnp.zeros(mask.shape[:1] + (width, width, 1), mask.dtype), mask], axis=1)
    return jnp.concatenate([strip, image], axis=1), canvas_mask


def encoder_pixels(modules: Modules, style):
    """The style image as SigLIP's processor gives it: resized to image_size (bicubic), values kept in [-1, 1]."""
    size = modules.image_encoder.config.image_size
    return jnp.clip(_resize(style.astype(jnp.float32), size, "cubic"), -1.0, 1.0)


def _check_inputs(modules: Modules, image, mask, style):
    f = modules.factor
    problems = []
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] % f or image.shape[2] % f:
        problems.append(f"image {image.shape}: expected (B, H, W, 3) with H and W multiples of {f}")
    elif mask.shape != image.shape[:3] + (1,):
        problems.append(f"mask {mask.shape}: expected {image.shape[:3] + (1,)} (1 = fill)")
    if style.ndim != 4 or style.shape[-1] != 3 or style.shape[1] != style.shape[2] or style.shape[0] != image.shape[0]:
        problems.append(f"style_image {style.shape}: expected ({image.shape[0]}, S, S, 3), the reference "
                        f"letterboxed onto a square (S = {modules.style_resolution})")
    if problems:
        raise ValueError(f"{NAME}: " + "; ".join(problems))


# --- the family functions --------------------------------------------------------------------------------

def prepare_condition(modules: Modules, params, inputs):
    """{'fill': Fill's conditioning of the canvas (B, (W + H) / 16, W / 16, 320), 'image_embeds': SigLIP's pooled
    embedding of the style image (B, E)}."""
    image, mask, style = inputs["image"], inputs["mask"], inputs["style_image"]
    _check_inputs(modules, image, mask, style)
    image_canvas, mask_canvas = canvas(image, flux.binarize(mask), style)
    fill = flux.prepare_condition(modules.flux, params, {"image": image_canvas, "mask": mask_canvas})["fill"]
    embeds = siglip.encode(modules.image_encoder, params[IMAGE_ENCODER], encoder_pixels(modules, style))
    return {"fill": fill, "image_embeds": embeds}


def image_tokens(modules: Modules, denoiser, image_embeds):
    """The adapter's image tokens (B, T, 4096) from pooled embeddings: mlp (+ qformer)."""
    return modules.projection.apply({"params": denoiser["image_proj"]}, image_embeds)


def denoise(modules: Modules, params, x, t, cond):
    """Velocity for the packed canvas latents x (B, (W + H) / 16, W / 16, 64) at sigma t (B,); the strip rows'
    velocity carries no gradient."""
    denoiser = params["denoiser"]
    h2, w2 = x.shape[1:3]
    hidden = jnp.concatenate([flux.tokens(x), flux.tokens(cond["fill"]).astype(x.dtype)], axis=-1)
    text = cond["text"]
    guidance = cond.get("guidance") if modules.transformer.config.guidance_embeds else None
    tree = adapter_lib.join_ip(denoiser["transformer"], denoiser["ip_attention"])
    out = modules.transformer.apply(
        {"params": tree}, hidden, text, cond["pooled"], jnp.asarray(t, jnp.float32),
        jnp.asarray(flux.image_ids(h2, w2)), jnp.asarray(flux.text_ids(text.shape[1])), guidance,
        (image_tokens(modules, denoiser, cond["image_embeds"]),))
    velocity = out.astype(jnp.float32).reshape(x.shape)
    strip = w2  # the strip is W x W pixels: as many latent rows as columns
    return jnp.concatenate([jax.lax.stop_gradient(velocity[:, :strip]), velocity[:, strip:]], axis=1)


def encode_image(modules: Modules, params, image):
    """(B, H, W, 3) -> canvas latents (B, (W + H) / 16, W / 16, 64): the strip rows zero (the reference is not
    an argument; see the module docstring), the image rows the VAE latents (posterior mean)."""
    latents = flux.encode_latents(modules.flux, params["vae"], image)
    strip = jnp.zeros((latents.shape[0], latents.shape[2]) + latents.shape[2:], latents.dtype)
    return jnp.concatenate([strip, latents], axis=1)


def decode(modules: Modules, params, x0):
    """Canvas latents -> the image below the strip, (B, H, W, 3) in [-1, 1]."""
    images = flux.decode(modules.flux, params, x0)
    return images[:, images.shape[2]:]


def latent_shape(modules: Modules, height: int, width: int) -> tuple[int, int, int]:
    f = modules.factor
    if height % f or width % f:
        raise ValueError(f"{NAME}: {height}x{width} is not a multiple of {f}")
    return (width + height) // f, width // f, 4 * modules.flux.vae.config.latent_channels


def make_family(modules: Modules, tokenize) -> Family:
    bind = lambda fn: functools.partial(fn, modules)  # noqa: E731
    return Family(
        name=NAME, parameterization=Velocity(), guidance=EmbeddedGuidance(), schedule=flux.schedule,
        inputs=("image", "mask", "style_image"), denoiser_key="denoiser", tokenize=templated(tokenize),
        encode_prompt=bind(lambda m, *args: flux.encode_prompt(m.flux, *args)),
        prepare_condition=bind(prepare_condition), denoise=bind(denoise), encode_image=bind(encode_image),
        decode=bind(decode), latent_shape=bind(latent_shape), tensor_rules=TENSOR_RULES,
        text_encoders=flux.TEXT_ENCODERS, text_embeddings=flux.TEXT_EMBEDDINGS,
        style_resolution=modules.style_resolution)


# --- modules, shapes, loading ----------------------------------------------------------------------------

def build_modules(transformer: FluxConfig, vae: vae_lib.VAEConfig, clip: clip_text.CLIPTextConfig,
                  t5_config: t5.T5Config, image_encoder: siglip.SiglipVisionConfig, adapter: AdapterConfig,
                  dtype: Any = jnp.float32, remat: bool = False, source: str = NAME,
                  style_resolution: int = STYLE_RESOLUTION) -> Modules:
    """Check the components fit together (Fill's channels, the encoder's width, SigLIP's pooling head)."""
    base = flux.build_modules("flux_fill", transformer, vae, clip, t5_config, dtype, remat, source)
    problems = []
    if adapter.image_embed_dim != image_encoder.hidden_size:
        problems.append(f"adapter image_embed_dim={adapter.image_embed_dim} != image encoder hidden_size="
                        f"{image_encoder.hidden_size}")
    if not image_encoder.vision_use_head:
        problems.append("image encoder vision_use_head=False: the adapter reads the pooled (head) output")
    if adapter.use_qformer and transformer.joint_attention_dim % adapter.qformer_heads:
        problems.append(f"qformer_heads={adapter.qformer_heads} does not divide the token width "
                        f"{transformer.joint_attention_dim}")
    if problems:
        raise ValueError(f"{source}: components do not fit together: " + "; ".join(problems))
    dtype = jnp.dtype(dtype)
    return Modules(base, IPFluxTransformer(transformer, adapter, dtype, remat),
                   ImageProjection(adapter, transformer.joint_attention_dim, dtype),
                   siglip.SiglipVision(image_encoder, dtype), adapter, style_resolution)


def param_shapes(modules: Modules):
    """Every component's parameter tree as jax.ShapeDtypeStruct, the denoiser nested as the family holds it."""
    shapes = flux.param_shapes(modules.flux)
    config = modules.transformer.config
    denoiser = {"transformer": shapes.pop("transformer"), **adapter_lib.param_shapes(config, modules.adapter)}
    return {"denoiser": denoiser, **shapes, IMAGE_ENCODER: siglip.param_shapes(modules.image_encoder.config)}


def nest(params):
    """Components as stored in a converted folder (transformer, image_proj, ip_attention side by side) -> the
    family's tree (those three under 'denoiser')."""
    params = dict(params)
    return {"denoiser": {name: params.pop(name) for name in ("transformer",) + ADAPTER_COMPONENTS}, **params}


def folder_family(model_dir: str, dtype: Any = "float32", remat: bool = False,
                  t5_length: int = flux.T5_LENGTH) -> tuple[Family, Modules]:
    """The Family (and modules) of a folder written by `python -m tools.convert_weights calligrapher`: configs and
    tokenizers only, no weights read."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: converted Calligrapher folder not found")
    check_family(model_dir, NAME)
    config = lambda folder: os.path.join(model_dir, folder, "config.json")  # noqa: E731
    modules = build_modules(
        FluxConfig.from_diffusers(read_json(config("transformer")), config("transformer")),
        vae_lib.VAEConfig.from_diffusers(read_json(config("vae")), config("vae")),
        clip_text.CLIPTextConfig.from_transformers(read_json(config("text_encoder")), config("text_encoder")),
        t5.T5Config.from_transformers(read_json(config("text_encoder_2")), config("text_encoder_2")),
        siglip.SiglipVisionConfig.from_transformers(read_json(config(IMAGE_ENCODER)), config(IMAGE_ENCODER)),
        AdapterConfig.from_dict(read_json(config("adapter")), config("adapter")),
        dtype, remat, source=model_dir)
    tokenize = flux.hf_tokenize(clip_text.load_tokenizer(os.path.join(model_dir, "tokenizer")),
                                t5.load_tokenizer(os.path.join(model_dir, "tokenizer_2")), t5_length)
    return make_family(modules, tokenize), modules


def load(model_dir: str, dtype: Any = "float32", remat: bool = False, t5_length: int = flux.T5_LENGTH,
         skip: tuple[str, ...] = ()):
    """(Family, params) from a converted folder, every shape checked against its configs; components in `skip`
    (text encoders whose embeddings the data supplies) are not read."""
    family, modules = folder_family(model_dir, dtype, remat, t5_length)
    params_dir = os.path.join(model_dir, "params")
    params = nest(load_params(params_dir, skip))
    check_shapes(params_dir, params, {k: v for k, v in param_shapes(modules).items() if k not in skip})
    return family, params


def tiny_configs():
    """Flux Fill's tiny configs (models/flux) with a 2-layer SigLIP of width 16 on 24 px and a 4-token adapter."""
    transformer, vae, clip, t5_config = flux.tiny_configs("flux_fill")
    image_encoder = siglip.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=24, patch_size=6)
    adapter = AdapterConfig(num_tokens=4, image_embed_dim=16, qformer_heads=2, qformer_query_tokens=2)
    return transformer, vae, clip, t5_config, image_encoder, adapter


TINY_STYLE_RESOLUTION = 32


def tiny_modules(dtype: Any = "float32", remat: bool = False) -> Modules:
    return build_modules(*tiny_configs(), dtype=dtype, remat=remat, source="tiny",
                         style_resolution=TINY_STYLE_RESOLUTION)


def tiny(seed: int = 0, dtype: Any = "float32", remat: bool = False):
    """(Family, params) of a tiny random Calligrapher (seconds on a CPU at 32 x 32)."""
    modules = tiny_modules(dtype, remat)
    return make_family(modules, flux.hash_tokenize), random_params(param_shapes(modules), seed)


def build(name: str, *, path: str | None, seed: int = 0, dtype: Any = "float32", remat: bool = False,
          embeddings: frozenset[str] = frozenset(), weights: bool = True):
    """The registry's factory (models/family.py): a converted folder at `path`, or the tiny model; with
    weights=False the family alone. Text encoders whose outputs `embeddings` supply are not loaded."""
    if name != NAME:
        raise ValueError(f"model.family={name!r}: this factory builds {NAME!r}")
    if not weights:
        return (make_family(tiny_modules(dtype, remat), flux.hash_tokenize) if path is None
                else folder_family(path, dtype, remat)[0]), None
    skip = tuple(flux.TEXT_EMBEDDINGS[e] for e in sorted(embeddings) if e in flux.TEXT_EMBEDDINGS)
    if path is not None:
        return load(path, dtype, remat, skip=skip)
    family, params = tiny(seed, dtype, remat)
    return family, {component: value for component, value in params.items() if component not in skip}
