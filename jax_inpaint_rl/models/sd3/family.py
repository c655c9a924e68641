"""The Stable Diffusion 3 / 3.5 families: `sd3` (text to image) and `sd3_inpaint` (image + mask).

Both are diffusers' pipelines restated over parameter pytrees `{'transformer', 'vae', 'text_encoder' (CLIP-L),
'text_encoder_2' (CLIP-G), 'text_encoder_3' (T5; absent when the folder has none)}`:
- text (StableDiffusion3Pipeline.encode_prompt): each CLIP's penultimate hidden states (the tokenizer's
  model_max_length tokens, 77) side by side on features, zero-padded to the T5 width, then T5's last hidden
  state (`t5_length` tokens, the pipelines' max_sequence_length, 256) after them on the sequence; without a T5
  that part is zeros (B, t5_length, joint_attention_dim), as the pipelines make it. Pooled: CLIP-L's and CLIP-G's
  text_embeds side by side. No precomputed embeddings: the negative prompt is encoded with every encoder
  (programs.make_encode passes it none), so none of them can be left unloaded.
- guidance: real classifier-free guidance on the batch [negative; positive] (BatchedCFG); the negative prompt
  is "", the pipelines' default.
- `sd3_inpaint` (StableDiffusion3InpaintPipeline, strength 1), in the pipeline's two modes, chosen by the
  checkpoint's transformer: the mask binarised at 0.5 (its mask_processor) and nearest-resized to the latent
  grid; with 33 input channels the image with the fill region zeroed (image * (mask < 0.5)) goes through the
  VAE and the transformer sees [noisy latents, mask, masked-image latents] on channels (16 + 1 + 16); with 16
  (any SD3 / SD3.5 checkpoint) the source's latents are pasted outside the mask after every step, noised to the
  next sigma with the initial noise (`Family.paste_region`; the log-probs cover the mask's latents only). The
  VAE encodes with the posterior mean (the pipeline samples), so the conditioning is a deterministic function
  of the inputs.
- velocity prediction; `t` is sigma in [0, 1] and the transformer receives sigma x num_train_timesteps (the
  scheduler's timesteps, 0..1000); the schedule is flow-match Euler with the static shift of the folder's
  scheduler/scheduler_config.json (3.0 for SD3 and SD3.5, and for the tiny model).
- latents `x`: (B, H/f, W/f, 16) channels-last VAE latents, (z - shift_factor) x scaling_factor from the VAE's
  config; `decode` inverts that as StableDiffusion3Pipeline does (diffusers' inpaint pipeline, as of 0.42,
  leaves the shift out when it decodes: its latents match ours, its images differ by that shift).
"""
import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.guidance import BatchedCFG
from jax_inpaint_rl.diffusion.parameterization import Velocity
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.layers import clip_text, t5
from jax_inpaint_rl.models.layers import vae as vae_lib
from jax_inpaint_rl.models.layers.inpaint_utils import check_image_and_mask, latent_mask, masked_image
from jax_inpaint_rl.models.params_io import check_family, check_shapes, load_params, read_json
from jax_inpaint_rl.models.random_init import random_params
from jax_inpaint_rl.models.sd3 import transformer as sd3_transformer
from jax_inpaint_rl.models.sd3.transformer import SD3Config, SD3Transformer

VARIANTS = ("sd3", "sd3_inpaint")
INPUTS = {"sd3": (), "sd3_inpaint": ("image", "mask")}
MARKER = "sd3"  # the `<family>.json` the converter writes for either variant (tools/convert_weights/sd3.py)
T5_LENGTH = 256  # the SD3 pipelines' default max_sequence_length
TINY_T5_LENGTH = 16  # flux.hash_tokenize's T5 length
CLIP_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G
T5_ENCODER = "text_encoder_3"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# scheduler settings that would change the sigmas away from the static shift, with the value that keeps them
STATIC_SHIFT_ONLY = {"use_dynamic_shifting": False, "shift_terminal": None, "use_karras_sigmas": False,
                     "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False,
                     "stochastic_sampling": False}
# tensor parallelism (parallel/partition.py): projections into heads (both streams, and the dual-attention blocks'
# attn2) and the first MLP layer split their outputs, projections out of them their inputs
TENSOR_RULES = ((r"/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|net_0_proj)/kernel$", -1),
                (r"/(to_out|to_add_out|net_2)/kernel$", -2))


@dataclasses.dataclass(frozen=True)
class FlowShift:
    """The part of a FlowMatchEulerDiscreteScheduler config the SD3 pipelines' sigmas depend on."""
    shift: float = 3.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "scheduler config") -> "FlowShift":
        """Read the static shift; refuse another scheduler or a setting that changes the sigmas, naming it."""
        problems = []
        if config.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
            problems.append(f"_class_name={config['_class_name']!r}, expected {SCHEDULER_CLASS!r}")
        problems += [f"{key}={config[key]!r} (supported: {value!r})" for key, value in STATIC_SHIFT_ONLY.items()
                     if config.get(key, value) != value]
        if problems:
            raise ValueError(f"{source}: unsupported scheduler settings: {', '.join(problems)}")
        return cls(float(config.get("shift", 1.0)), int(config.get("num_train_timesteps", 1000)))


@dataclasses.dataclass(frozen=True)
class Modules:
    variant: str
    transformer: SD3Transformer
    vae: vae_lib.AutoencoderKL
    clip_l: clip_text.CLIPTextTransformer
    clip_g: clip_text.CLIPTextTransformer
    t5: t5.T5Encoder | None  # None: the T5 part of the prompt embedding is zeros
    flow: FlowShift
    t5_length: int = T5_LENGTH

    @property
    def factor(self) -> int:
        """Pixels per transformer patch along each side (VAE factor x patch size)."""
        return self.vae.config.downscale * self.transformer.config.patch_size


def text_encoders(modules: Modules) -> tuple[str, ...]:
    return CLIP_ENCODERS + ((T5_ENCODER,) if modules.t5 is not None else ())


# --- the family functions ------------------------------------------------------------------------------

def encode_prompt(modules: Modules, params, token_ids, inputs, embeddings):
    """{'clip_l', 'clip_g'(, 't5')} ids -> {'text': (B, 77 + t5_length, joint_attention_dim), 'pooled':
    (B, pooled_projection_dim)}."""
    del inputs, embeddings  # the encoders read the prompt only; no precomputed embedding stands in (docstring)
    clip_l = modules.clip_l.apply({"params": params["text_encoder"]}, token_ids["clip_l"])
    clip_g = modules.clip_g.apply({"params": params["text_encoder_2"]}, token_ids["clip_g"])
    clip = jnp.concatenate([clip_l["penultimate_hidden_state"], clip_g["penultimate_hidden_state"]], axis=-1)
    width = modules.transformer.config.joint_attention_dim
    if modules.t5 is None:
        t5_states = jnp.zeros((clip.shape[0], modules.t5_length, width), clip.dtype)
    else:
        t5_states = modules.t5.apply({"params": params[T5_ENCODER]}, token_ids["t5"]).astype(clip.dtype)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    pooled = jnp.concatenate([clip_l["text_embeds"], clip_g["text_embeds"]], axis=-1)
    return {"text": jnp.concatenate([clip, t5_states], axis=1), "pooled": pooled.astype(jnp.float32)}


def _check_size(modules: Modules, height: int, width: int) -> None:
    f, largest = modules.factor, modules.factor * modules.transformer.config.pos_embed_max_size
    if height % f or width % f or max(height, width) > largest:
        raise ValueError(f"{modules.variant}: image size {height}x{width}: expected multiples of {f} (VAE factor x "
                         f"patch size), at most {largest} per side (patch_size x pos_embed_max_size latents)")


def encode_latents(modules: Modules, vae_params, image):
    """Images in [-1, 1] (B, H, W, 3) -> model-space latents (B, H/f, W/f, 16), the posterior mean."""
    _check_size(modules, image.shape[1], image.shape[2])
    return vae_lib.vae_encode(modules.vae, vae_params, image)


def pastes_source(modules: Modules) -> bool:
    """sd3_inpaint with a plain 16-channel transformer: the source is pasted outside the mask (docstring)."""
    channels = modules.transformer.config.in_channels
    return bool(INPUTS[modules.variant]) and channels == modules.vae.config.latent_channels


def prepare_condition(modules: Modules, params, inputs):
    """sd3: {}; sd3_inpaint: {'mask': (B, h, w, 1) binary on the latent grid, and 'masked_latents' (33 channels)
    or 'source_latents' (16 channels: pasted outside the mask), (B, h, w, 16)}."""
    if not INPUTS[modules.variant]:
        return {}
    image, mask = inputs["image"], inputs["mask"]
    check_image_and_mask(image, mask, modules.factor)
    binary = (mask >= 0.5).astype(jnp.float32)  # the pipeline's mask_processor binarises before anything else
    if pastes_source(modules):
        latents = encode_latents(modules, params["vae"], image)
        return {"mask": latent_mask(binary, *latents.shape[1:3]), "source_latents": latents}
    masked_latents = encode_latents(modules, params["vae"], masked_image(image, binary))
    return {"mask": latent_mask(binary, *masked_latents.shape[1:3]), "masked_latents": masked_latents}


def paste_region(cond):
    """(the latent mask, the source latents): outside the mask the rollout keeps the noised source."""
    return cond["mask"], cond["source_latents"]


def denoise(modules: Modules, params, x, t, cond):
    """Velocity (fp32) for latents x (B, h, w, 16) at sigma t (B,)."""
    hidden = x
    if INPUTS[modules.variant] and not pastes_source(modules):
        hidden = jnp.concatenate([x, cond["mask"].astype(x.dtype), cond["masked_latents"].astype(x.dtype)], -1)
    timestep = jnp.asarray(t, jnp.float32) * modules.flow.num_train_timesteps
    out = modules.transformer.apply({"params": params["transformer"]}, hidden, timestep, cond["text"],
                                    cond["pooled"])
    return out.astype(jnp.float32)


def decode(modules: Modules, params, x0):
    return vae_lib.vae_decode(modules.vae, params["vae"], x0)


def latent_shape(modules: Modules, height: int, width: int) -> tuple[int, int, int]:
    _check_size(modules, height, width)
    downscale = modules.vae.config.downscale
    return height // downscale, width // downscale, modules.vae.config.latent_channels


def schedule(modules: Modules, num_steps: int, latent_shape) -> schedules.Schedule:
    """The pipelines' sigmas: static shift, whatever the image size."""
    del latent_shape
    return schedules.sd3_schedule(num_steps, modules.flow.shift, modules.flow.num_train_timesteps)


def make_family(modules: Modules, tokenize: Callable) -> Family:
    bind = lambda fn: functools.partial(fn, modules)  # noqa: E731
    return Family(
        name=modules.variant, parameterization=Velocity(), guidance=BatchedCFG(), schedule=bind(schedule),
        inputs=INPUTS[modules.variant], denoiser_key="transformer", tokenize=tokenize,
        encode_prompt=bind(encode_prompt), prepare_condition=bind(prepare_condition), denoise=bind(denoise),
        encode_image=lambda params, image: encode_latents(modules, params["vae"], image), decode=bind(decode),
        latent_shape=bind(latent_shape), tensor_rules=TENSOR_RULES, text_encoders=text_encoders(modules),
        paste_region=paste_region if pastes_source(modules) else None)


def expected_in_channels(variant: str, vae: vae_lib.VAEConfig) -> tuple[int, ...]:
    """Latents, and for 33-channel inpainting the mask and the masked image's latents (a 16-channel transformer
    inpaints by pasting)."""
    return (vae.latent_channels, 2 * vae.latent_channels + 1) if INPUTS[variant] else (vae.latent_channels,)


def build_modules(variant: str, transformer: SD3Config, vae: vae_lib.VAEConfig, clip_l: clip_text.CLIPTextConfig,
                  clip_g: clip_text.CLIPTextConfig, t5_config: t5.T5Config | None, flow: FlowShift = FlowShift(),
                  dtype: Any = jnp.float32, remat: bool = False, t5_length: int = T5_LENGTH,
                  source: str = "sd3") -> Modules:
    """Check the components fit together (channels, widths) and build the Flax modules."""
    if variant not in VARIANTS:
        raise ValueError(f"{source}: unknown SD3 variant {variant!r}; expected one of {VARIANTS}")
    problems = []
    want = expected_in_channels(variant, vae)
    if transformer.in_channels not in want:
        fits = [v for v in VARIANTS if transformer.in_channels in expected_in_channels(v, vae)]
        problems.append(f"transformer in_channels={transformer.in_channels}, {variant} with this VAE needs "
                        f"{' or '.join(map(str, want))}" + (f" (a transformer for {fits[0]})" if fits else ""))
    if transformer.output_channels != vae.latent_channels:
        problems.append(f"transformer outputs {transformer.output_channels} channels, the VAE latents have "
                        f"{vae.latent_channels}")
    for name, clip in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
        if clip.projection_dim is None:
            problems.append(f"{name} has no text_projection (SD3 needs a {clip_text.WITH_PROJECTION})")
    if clip_l.projection_dim and clip_g.projection_dim and (
            clip_l.projection_dim + clip_g.projection_dim != transformer.pooled_projection_dim):
        problems.append(f"pooled_projection_dim={transformer.pooled_projection_dim} != CLIP projection dims "
                        f"{clip_l.projection_dim} + {clip_g.projection_dim}")
    if clip_l.hidden_size + clip_g.hidden_size > transformer.joint_attention_dim:
        problems.append(f"joint_attention_dim={transformer.joint_attention_dim} < CLIP widths {clip_l.hidden_size} "
                        f"+ {clip_g.hidden_size} (they are zero-padded to it)")
    if t5_config is not None and t5_config.d_model != transformer.joint_attention_dim:
        problems.append(f"joint_attention_dim={transformer.joint_attention_dim} != T5 d_model={t5_config.d_model}")
    if problems:
        raise ValueError(f"{source}: components do not fit together: " + "; ".join(problems))
    dtype = jnp.dtype(dtype)
    return Modules(variant, SD3Transformer(transformer, dtype, remat), vae_lib.AutoencoderKL(vae, dtype=dtype),
                   clip_text.CLIPTextTransformer(clip_l, dtype), clip_text.CLIPTextTransformer(clip_g, dtype),
                   None if t5_config is None else t5.T5Encoder(t5_config, dtype), flow, t5_length)


def param_shapes(modules: Modules):
    """Every component's parameter tree as jax.ShapeDtypeStruct (traced, never allocated)."""
    key = jax.random.key(0)
    shapes = {
        "transformer": sd3_transformer.param_shapes(modules.transformer.config),
        "vae": jax.eval_shape(lambda: vae_lib.init_params(modules.vae, key)),
        "text_encoder": jax.eval_shape(lambda: clip_text.init_params(modules.clip_l, key)),
        "text_encoder_2": jax.eval_shape(lambda: clip_text.init_params(modules.clip_g, key)),
    }
    if modules.t5 is not None:
        shapes[T5_ENCODER] = t5.param_shapes(modules.t5.config)
    return shapes


# --- building from a converted folder or from scratch -------------------------------------------------

def hf_tokenize(clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer, t5_length: int):
    """Both CLIPs padded to the first tokenizer's model_max_length, as the pipelines pad them (their pad tokens
    differ: CLIP-G pads with '!'); the T5 (when there is one) to t5_length."""
    clip_length = clip_l_tokenizer.model_max_length

    def tokenize(prompts, inputs=None):
        del inputs
        ids = {"clip_l": clip_text.tokenize(clip_l_tokenizer, prompts, clip_length),
               "clip_g": clip_text.tokenize(clip_g_tokenizer, prompts, clip_length)}
        if t5_tokenizer is not None:
            ids["t5"] = t5.tokenize(t5_tokenizer, prompts, t5_length)
        return ids

    return tokenize


def _read_config(model_dir: str, folder: str, file: str = "config.json") -> tuple[dict, str]:
    """(a component's config dict, its path): the arguments of the configs' from_* readers."""
    path = os.path.join(model_dir, folder, file)
    return read_json(path), path


def folder_family(model_dir: str, name: str = "sd3", dtype: Any = "float32", remat: bool = False,
                  t5_length: int = T5_LENGTH) -> tuple[Family, Modules]:
    """The Family (and its modules) of a converted folder: configs and tokenizers only, no weights read. The T5
    is there when text_encoder_3/ is."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: converted SD3 folder not found")
    check_family(model_dir, MARKER)
    path = lambda *parts: os.path.join(model_dir, *parts)  # noqa: E731
    has_t5 = os.path.isdir(path(T5_ENCODER))
    modules = build_modules(
        name, SD3Config.from_diffusers(*_read_config(model_dir, "transformer")),
        vae_lib.VAEConfig.from_diffusers(*_read_config(model_dir, "vae")),
        clip_text.CLIPTextConfig.from_transformers(*_read_config(model_dir, "text_encoder")),
        clip_text.CLIPTextConfig.from_transformers(*_read_config(model_dir, "text_encoder_2")),
        t5.T5Config.from_transformers(*_read_config(model_dir, T5_ENCODER)) if has_t5 else None,
        FlowShift.from_diffusers(*_read_config(model_dir, "scheduler", "scheduler_config.json")),
        dtype, remat, t5_length, source=model_dir)
    tokenize = hf_tokenize(clip_text.load_tokenizer(path("tokenizer")), clip_text.load_tokenizer(path("tokenizer_2")),
                           t5.load_tokenizer(path("tokenizer_3")) if has_t5 else None, t5_length)
    return make_family(modules, tokenize), modules


def load(model_dir: str, name: str = "sd3", dtype: Any = "float32", remat: bool = False,
         t5_length: int = T5_LENGTH):
    """(Family, params) from a folder written by `python -m tools.convert_weights sd3`, every shape checked
    against the folder's configs."""
    family, modules = folder_family(model_dir, name, dtype, remat, t5_length)
    params_dir = os.path.join(model_dir, "params")
    params = load_params(params_dir)
    check_shapes(params_dir, params, param_shapes(modules))
    return family, params


def tiny_configs():
    """Small configs with SD3.5-Medium's structure (QK norm, a dual-attention block, the context-pre-only last
    block; 16 input channels: the tiny sd3_inpaint pastes the source, as SD3 / SD3.5 checkpoints inpaint), a 2x
    VAE with SD3's latent factors, CLIP-L and CLIP-G narrower than the T5 (padded), 2-layer encoders."""
    vae = vae_lib.VAEConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16,
                            norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False)
    clip_l = clip_text.CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=flux.CLIP_LENGTH,
                                      eos_token_id=63, projection_dim=16)
    clip_g = dataclasses.replace(clip_l, hidden_size=16, intermediate_size=32, hidden_act="gelu")
    t5_config = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    transformer = SD3Config(sample_size=32, patch_size=2, in_channels=vae.latent_channels,
                            out_channels=vae.latent_channels, num_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                            pooled_projection_dim=32, pos_embed_max_size=32, dual_attention_layers=(0,),
                            qk_norm="rms_norm")
    return transformer, vae, clip_l, clip_g, t5_config


def hash_tokenize(prompts, inputs=None):
    """Stand-in tokenizer for the tiny models (flux.hash_tokenize's ids): both CLIPs read the same ids."""
    ids = flux.hash_tokenize(prompts, inputs, t5_length=TINY_T5_LENGTH)
    return {"clip_l": ids["clip"], "clip_g": ids["clip"], "t5": ids["t5"]}


def tiny_modules(name: str = "sd3", dtype: Any = "float32", remat: bool = False) -> Modules:
    return build_modules(name, *tiny_configs(), dtype=dtype, remat=remat, t5_length=TINY_T5_LENGTH,
                         source="tiny")


def tiny(name: str = "sd3", seed: int = 0, dtype: Any = "float32", remat: bool = False):
    """(Family, params) of a tiny random SD3 family, built in JAX (seconds on CPU at 32x32)."""
    modules = tiny_modules(name, dtype, remat)
    return make_family(modules, hash_tokenize), random_params(param_shapes(modules), seed)


def build(name: str, *, path: str | None, seed: int = 0, dtype: Any = "float32", remat: bool = False,
          embeddings: frozenset[str] = frozenset(), weights: bool = True):
    """The registry's factory (models/family.py): a converted folder at `path`, or the tiny model; with
    weights=False the family alone. `embeddings` must be empty: the SD3 families take none (docstring)."""
    if embeddings:
        raise ValueError(f"{name}: precomputed embeddings {sorted(embeddings)} given; the SD3 families take none "
                         "(the negative prompt needs every text encoder)")
    if not weights:
        return (make_family(tiny_modules(name, dtype, remat), hash_tokenize) if path is None
                else folder_family(path, name, dtype, remat)[0]), None
    return tiny(name, seed, dtype, remat) if path is None else load(path, name, dtype, remat)
