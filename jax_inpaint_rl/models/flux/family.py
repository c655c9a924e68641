"""The Flux.1 families: `flux_fill` (inpainting), `flux_kontext` (reference-image editing), `flux_dev`.

All three share the transformer, the 16-channel VAE, CLIP-L (pooled) and T5-XXL
text encoders, velocity prediction, the resolution-shifted flow schedule, and an
embedded guidance scale (`cond['guidance']`, per sample). They differ only in the
image conditioning (their `inputs`), built exactly as diffusers' pipelines build it:
- Fill (image, mask): the masked image's latents and the binarised mask,
  pixel-unshuffled by the VAE factor (8x8 -> 64 channels), both 2x2-packed and
  concatenated to the noisy latents on the channel axis (64 + 64 + 256 = 384).
- Kontext (image): the reference image's latents, 2x2-packed, appended on the
  sequence axis with their own position ids (first id 1); only the first L outputs count.
- dev (): text only.
Precomputed text embeddings (`t5`: the T5 hidden states (B, T, 4096), `pooled`:
CLIP's pooled output (B, 768)) stand in for running that encoder.

Latents `x` are the 2x2-packed VAE latents kept on their grid, (B, h/2, w/2, 4C)
for an image of h x w latents (C = 16): the token sequence the transformer
sees is their row-major flattening (diffusers' `_pack_latents` order), and the
grid keeps the image shape for position ids and decoding. `t` is sigma in
[0, 1]; the transformer receives it as diffusers' pipelines pass `timestep/1000`.
The VAE encodes with the posterior mean (diffusers' Fill pipeline samples; Kontext
takes the mode), so conditioning is a deterministic function of the inputs.
"""
import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.guidance import EmbeddedGuidance
from jax_inpaint_rl.diffusion.parameterization import Velocity
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.models.flux import transformer as flux_transformer
from jax_inpaint_rl.models.flux.transformer import FluxConfig, FluxTransformer
from jax_inpaint_rl.models.layers import clip_text, t5, vae as vae_lib
from jax_inpaint_rl.models.params_io import check_family, check_shapes, load_params, read_json
from jax_inpaint_rl.models.random_init import random_params

VARIANTS = ("flux_fill", "flux_kontext", "flux_dev")
CLIP_LENGTH = 77
T5_LENGTH = 512  # the Flux pipelines' default max_sequence_length


# --- packing and position ids (pure array functions) --------------------------------------------

def pack(latents):
    """(B, h, w, C) -> (B, h/2, w/2, 4C), channel order c*4 + dy*2 + dx as diffusers' _pack_latents."""
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents {latents.shape}: height and width must be even to pack 2x2 patches")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, 4 * c)


def unpack(packed):
    """(B, h/2, w/2, 4C) -> (B, h, w, C), the inverse of `pack`."""
    b, h2, w2, c4 = packed.shape
    x = packed.reshape(b, h2, w2, c4 // 4, 2, 2)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h2, 2 * w2, c4 // 4)


def tokens(grid):
    """(B, h2, w2, D) -> (B, h2 * w2, D), the transformer's row-major token order."""
    return grid.reshape(grid.shape[0], -1, grid.shape[-1])


def image_ids(h2: int, w2: int, first: float = 0.0) -> np.ndarray:
    """(h2 * w2, 3) position ids [first, row, col] (diffusers' _prepare_latent_image_ids)."""
    rows, cols = np.meshgrid(np.arange(h2), np.arange(w2), indexing="ij")
    return np.stack([np.full(rows.shape, first), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)


def text_ids(length: int) -> np.ndarray:
    return np.zeros((length, 3), np.float32)


def mask_tokens(mask, factor: int):
    """(B, H, W, 1) binary mask -> (B, H/2f, W/2f, 4 f^2): f x f pixel-unshuffle (channel dy*f + dx), then pack."""
    b, hh, ww, _ = mask.shape
    h, w = hh // factor, ww // factor
    x = mask[..., 0].reshape(b, h, factor, w, factor).transpose(0, 1, 3, 2, 4)
    return pack(x.reshape(b, h, w, factor * factor))


def binarize(mask):
    """diffusers' mask processor: 1 where mask >= 0.5 (the region to fill), else 0."""
    return (mask >= 0.5).astype(jnp.float32)


# --- the family -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Modules:
    variant: str
    transformer: FluxTransformer
    vae: vae_lib.AutoencoderKL
    clip: clip_text.CLIPTextTransformer
    t5: t5.T5Encoder


def _check_images(modules: Modules, image, mask=None):
    factor = 2 * modules.vae.config.downscale
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] % factor or image.shape[2] % factor:
        raise ValueError(f"{modules.variant}: image {image.shape}: expected (B, H, W, 3) with H and W multiples of "
                         f"{factor} (VAE factor x 2x2 packing)")
    if mask is not None and mask.shape != image.shape[:3] + (1,):
        raise ValueError(f"{modules.variant}: mask {mask.shape}: expected {image.shape[:3] + (1,)} (1 = fill)")


def encode_latents(modules: Modules, vae_params, image):
    """Images in [-1, 1] -> packed model-space latents (B, H/2f, W/2f, 4C)."""
    _check_images(modules, image)
    return pack(vae_lib.vae_encode(modules.vae, vae_params, image))


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
# precomputed embedding name -> the text encoder it stands in for
TEXT_EMBEDDINGS = {"t5": "text_encoder_2", "pooled": "text_encoder"}
INPUTS = {"flux_fill": ("image", "mask"), "flux_kontext": ("image",), "flux_dev": ()}


def encode_prompt(modules: Modules, params, token_ids, inputs, embeddings):
    """{'clip', 't5'} ids -> {'text': T5 hidden (B, T, 4096), 'pooled': CLIP pooled (B, 768)}; a precomputed
    't5' / 'pooled' embedding is used instead of running its encoder."""
    del inputs  # the Flux text encoders read the prompt only
    if "pooled" in embeddings:
        pooled = embeddings["pooled"]
    else:
        pooled = modules.clip.apply({"params": params["text_encoder"]}, token_ids["clip"])["pooled"]
    if "t5" in embeddings:
        text = embeddings["t5"]
    else:
        text = modules.t5.apply({"params": params["text_encoder_2"]}, token_ids["t5"])
    return {"text": jnp.asarray(text), "pooled": jnp.asarray(pooled, jnp.float32)}


def prepare_condition(modules: Modules, params, inputs):
    if modules.variant == "flux_fill":
        image, mask = inputs["image"], inputs["mask"]
        _check_images(modules, image, mask)
        mask = binarize(mask)
        masked = encode_latents(modules, params["vae"], image * (1.0 - mask))
        return {"fill": jnp.concatenate([masked, mask_tokens(mask, modules.vae.config.downscale)], axis=-1)}
    if modules.variant == "flux_kontext":
        return {"reference": encode_latents(modules, params["vae"], inputs["image"])}
    return {}


def denoise(modules: Modules, params, x, t, cond):
    """Velocity for packed latents x (B, h2, w2, 4C) at sigma t (B,)."""
    h2, w2 = x.shape[1:3]
    hidden, ids = tokens(x), image_ids(h2, w2)
    if modules.variant == "flux_fill":
        hidden = jnp.concatenate([hidden, tokens(cond["fill"]).astype(hidden.dtype)], axis=-1)
    elif modules.variant == "flux_kontext":
        reference = cond["reference"]
        hidden = jnp.concatenate([hidden, tokens(reference).astype(hidden.dtype)], axis=1)
        ids = np.concatenate([ids, image_ids(reference.shape[1], reference.shape[2], first=1.0)])
    text = cond["text"]
    guidance = cond.get("guidance") if modules.transformer.config.guidance_embeds else None
    out = modules.transformer.apply(
        {"params": params["transformer"]}, hidden, text, cond["pooled"], jnp.asarray(t, jnp.float32),
        jnp.asarray(ids), jnp.asarray(text_ids(text.shape[1])), guidance)
    return out[:, :h2 * w2].astype(jnp.float32).reshape(x.shape)


def decode(modules: Modules, params, x0):
    return vae_lib.vae_decode(modules.vae, params["vae"], unpack(x0))


def latent_shape(modules: Modules, height: int, width: int) -> tuple[int, int, int]:
    factor = 2 * modules.vae.config.downscale
    if height % factor or width % factor:
        raise ValueError(f"{modules.variant}: {height}x{width} is not a multiple of {factor}")
    return height // factor, width // factor, 4 * modules.vae.config.latent_channels


def expected_in_channels(variant: str, vae_config: vae_lib.VAEConfig) -> int:
    packed = 4 * vae_config.latent_channels
    if variant == "flux_fill":
        return 2 * packed + 4 * vae_config.downscale ** 2
    return packed


# tensor parallelism (parallel/partition.py): projections into heads and the first MLP layer split their outputs,
# projections out of them their inputs, in the double blocks (both streams) and the single blocks
TENSOR_RULES = ((r"/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|net_0_proj|proj_mlp)/kernel$", -1),
                (r"/(to_out|to_add_out|net_2)/kernel$", -2))


def schedule(num_steps: int, latent_shape) -> schedules.Schedule:
    """The pipelines' sigmas, shifted by the image token count (the packed grid's area)."""
    return schedules.shifted_schedule(num_steps, image_seq_len=latent_shape[0] * latent_shape[1])


def make_family(modules: Modules, tokenize: Callable) -> Family:
    bind = lambda fn: functools.partial(fn, modules)  # noqa: E731
    return Family(
        name=modules.variant, parameterization=Velocity(), guidance=EmbeddedGuidance(), schedule=schedule,
        inputs=INPUTS[modules.variant], denoiser_key="transformer", tokenize=tokenize,
        encode_prompt=bind(encode_prompt), prepare_condition=bind(prepare_condition), denoise=bind(denoise),
        encode_image=lambda params, image: encode_latents(modules, params["vae"], image), decode=bind(decode),
        latent_shape=bind(latent_shape), tensor_rules=TENSOR_RULES, text_encoders=TEXT_ENCODERS,
        text_embeddings=TEXT_EMBEDDINGS)


def build_modules(variant: str, transformer: FluxConfig, vae: vae_lib.VAEConfig, clip: clip_text.CLIPTextConfig,
                  t5_config: t5.T5Config, dtype: Any = jnp.float32, remat: bool = False,
                  source: str = "flux") -> Modules:
    """Check the components fit together (channels, widths) and build the Flax modules."""
    if variant not in VARIANTS:
        raise ValueError(f"{source}: unknown Flux variant {variant!r}; expected one of {VARIANTS}")
    problems = []
    want = expected_in_channels(variant, vae)
    if transformer.in_channels != want:
        problems.append(f"transformer in_channels={transformer.in_channels}, {variant} with this VAE needs {want}")
    if transformer.output_channels != 4 * vae.latent_channels:
        problems.append(f"transformer outputs {transformer.output_channels} channels, packed VAE latents have "
                        f"{4 * vae.latent_channels}")
    if transformer.joint_attention_dim != t5_config.d_model:
        problems.append(f"joint_attention_dim={transformer.joint_attention_dim} != T5 d_model={t5_config.d_model}")
    if transformer.pooled_projection_dim != clip.hidden_size:
        problems.append(f"pooled_projection_dim={transformer.pooled_projection_dim} != CLIP hidden_size="
                        f"{clip.hidden_size}")
    if problems:
        raise ValueError(f"{source}: components do not fit together: " + "; ".join(problems))
    dtype = jnp.dtype(dtype)
    return Modules(variant, FluxTransformer(transformer, dtype, remat), vae_lib.AutoencoderKL(vae, dtype=dtype),
                   clip_text.CLIPTextTransformer(clip, dtype), t5.T5Encoder(t5_config, dtype))


# --- building from a converted folder or from scratch -------------------------------------------------

def hf_tokenize(clip_tokenizer, t5_tokenizer, t5_length: int):
    def tokenize(prompts, inputs=None):
        del inputs
        return {"clip": clip_text.tokenize(clip_tokenizer, prompts),
                "t5": t5.tokenize(t5_tokenizer, prompts, t5_length)}

    return tokenize


def folder_family(model_dir: str, name: str = "flux_fill", dtype: Any = "float32", remat: bool = False,
                  t5_length: int = T5_LENGTH) -> tuple[Family, Modules]:
    """The Family (and its modules) of a converted folder: configs and tokenizers only, no weights read."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: converted Flux folder not found")
    check_family(model_dir, name)
    config = lambda folder: os.path.join(model_dir, folder, "config.json")  # noqa: E731
    modules = build_modules(
        name,
        FluxConfig.from_diffusers(read_json(config("transformer")), config("transformer")),
        vae_lib.VAEConfig.from_diffusers(read_json(config("vae")), config("vae")),
        clip_text.CLIPTextConfig.from_transformers(read_json(config("text_encoder")), config("text_encoder")),
        t5.T5Config.from_transformers(read_json(config("text_encoder_2")), config("text_encoder_2")),
        dtype, remat, source=model_dir)
    tokenize = hf_tokenize(clip_text.load_tokenizer(os.path.join(model_dir, "tokenizer")),
                           t5.load_tokenizer(os.path.join(model_dir, "tokenizer_2")), t5_length)
    return make_family(modules, tokenize), modules


def load(model_dir: str, name: str = "flux_fill", dtype: Any = "float32", remat: bool = False,
         t5_length: int = T5_LENGTH, skip: tuple[str, ...] = ()):
    """(Family, params) from a folder written by `python -m tools.convert_weights flux-*`, every shape checked
    against the folder's configs. Components in `skip` are not read."""
    family, modules = folder_family(model_dir, name, dtype, remat, t5_length)
    params_dir = os.path.join(model_dir, "params")
    params = load_params(params_dir, skip)
    check_shapes(params_dir, params, {k: v for k, v in param_shapes(modules).items() if k not in skip})
    return family, params


def tiny_configs(variant: str, latent_channels: int = 16):
    """Small configs with Flux's structure: 2+2 blocks, 2 heads of 16, a 2x VAE, 2-layer text encoders."""
    vae = vae_lib.VAEConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                            latent_channels=latent_channels, norm_num_groups=4, scaling_factor=0.3611,
                            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    clip = clip_text.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, eos_token_id=63)
    t5_config = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    transformer = FluxConfig(in_channels=expected_in_channels(variant, vae), out_channels=4 * latent_channels,
                             num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                             joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                             axes_dims_rope=(4, 6, 6))
    return transformer, vae, clip, t5_config


def hash_tokenize(prompts, inputs=None, vocab_size: int = 64, t5_length: int = 16):
    """Stand-in tokenizer for tiny models: words hashed to ids, CLIP EOS = vocab_size - 1, T5 EOS = 1."""
    clip_ids = np.zeros((len(prompts), CLIP_LENGTH), np.int32)
    t5_ids = np.zeros((len(prompts), t5_length), np.int32)
    for row, prompt in enumerate(prompts):
        words = [sum(map(ord, w)) % (vocab_size - 3) + 2 for w in prompt.lower().split()]
        clip_row, t5_row = words[:CLIP_LENGTH - 1] + [vocab_size - 1], words[:t5_length - 1] + [1]
        clip_ids[row, :len(clip_row)] = clip_row
        t5_ids[row, :len(t5_row)] = t5_row
    return {"clip": clip_ids, "t5": t5_ids}


def tiny_modules(name: str = "flux_fill", dtype: Any = "float32", remat: bool = False) -> Modules:
    return build_modules(name, *tiny_configs(name), dtype=dtype, remat=remat, source="tiny")


def param_shapes(modules: Modules):
    """Every component's parameter tree as jax.ShapeDtypeStruct (traced, never allocated)."""
    key = jax.random.key(0)
    return {
        "transformer": flux_transformer.param_shapes(modules.transformer.config),
        "vae": jax.eval_shape(lambda: vae_lib.init_params(modules.vae, key)),
        "text_encoder": jax.eval_shape(lambda: clip_text.init_params(modules.clip, key)),
        "text_encoder_2": t5.param_shapes(modules.t5.config),
    }


def tiny(name: str = "flux_fill", seed: int = 0, dtype: Any = "float32", remat: bool = False):
    """(Family, params) of a tiny random Flux family, built in JAX (seconds on CPU at 32x32 / 64x64)."""
    modules = tiny_modules(name, dtype, remat)
    return tiny_family(modules), random_params(param_shapes(modules), seed)


def tiny_family(modules: Modules) -> Family:
    return make_family(modules, hash_tokenize)


def build(name: str, *, path: str | None, seed: int = 0, dtype: Any = "float32", remat: bool = False,
          embeddings: frozenset[str] = frozenset(), weights: bool = True):
    """The registry's factory (models/family.py): a converted folder at `path`, or the tiny model; with
    weights=False the family alone. The text encoders whose outputs `embeddings` supply are not loaded (the
    seeds' --offload_text_encoder_two, made unnecessary)."""
    if not weights:
        return (tiny_family(tiny_modules(name, dtype, remat)) if path is None
                else folder_family(path, name, dtype, remat)[0]), None
    skip = tuple(TEXT_EMBEDDINGS[name] for name in sorted(embeddings) if name in TEXT_EMBEDDINGS)
    if path is not None:
        return load(path, name, dtype, remat, skip=skip)
    family, params = tiny(name, seed, dtype, remat)
    return family, {component: value for component, value in params.items() if component not in skip}
