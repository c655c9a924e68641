"""Stable Diffusion 1.5 inpainting as a model family (diffusers' StableDiffusionInpaintPipeline conventions).

Params: `{'unet': ..., 'vae': ..., 'text_encoder': ...}`; the UNet is what RL trains. Epsilon
prediction, DDIM schedule (leading spacing, offset 1), CFG by batch concatenation; inputs image + mask.
- tokenize: CLIP ids padded to 77 (`{'input_ids': (B, 77) int32}`).
- encode_prompt: `{'text': (B, 77, 768)}` CLIP last hidden state (after the final LayerNorm).
- prepare_condition: `{'mask': (B, h, w, 1), 'masked_latents': (B, h, w, 4)}`: the mask binarised at 0.5
  (>= 0.5 -> 1, as diffusers' mask_processor does) and resized to the latent grid (torch nearest), and the
  VAE latents of image * (binarised mask < 0.5). The pipeline samples the
  masked-image posterior; here it is its mean, so the condition is deterministic.
- denoise: UNet on [latents 4, mask 1, masked-image latents 4] (9 channels; a 4-channel UNet gets the
  latents only) -> epsilon, in fp32. Unguided; the rollout concatenates uncond / cond for CFG.
- encode_image / decode: VAE posterior mean * scaling_factor, and its inverse.

`load(folder)` reads a folder written by `python -m tools.convert_weights sd15-inpaint`:
`params/*.safetensors` (keys 'unet/...', 'vae/...', 'text_encoder/...'), `unet/config.json`,
`vae/config.json`, `text_encoder/config.json`, `tokenizer/`. `tiny()` builds a random model in
memory (no files) for the demo and trainer tests.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.guidance import BatchedCFG
from jax_inpaint_rl.diffusion.parameterization import Epsilon
from jax_inpaint_rl.models import params_io
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.models.layers import clip_text, vae
from jax_inpaint_rl.models.layers.inpaint_utils import check_image_and_mask, latent_mask, masked_image
from jax_inpaint_rl.models.random_init import random_params
from jax_inpaint_rl.models.sd15 import unet as unet2d

COMPONENTS = ("unet", "vae", "text_encoder")
# tensor parallelism: attention q / k / v and GEGLU input split their outputs, attention out and GEGLU output
# their inputs (parallel/partition.py)
TENSOR_RULES = ((r"/(to_q|to_k|to_v|ff_net_0_proj)/kernel$", -1), (r"/(to_out_0|ff_net_2)/kernel$", -2))

TINY_UNET = dict(in_channels=9, out_channels=4, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4], cross_attention_dim=32)
TINY_VAE = dict(block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4)
TINY_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, eos_token_id=99)


@dataclasses.dataclass(frozen=True)
class Modules:
    """The three Linen modules of the family (hashable, so jitted closures over them are cached)."""
    unet: unet2d.UNet2DConditionModel
    vae: vae.AutoencoderKL
    text_encoder: clip_text.CLIPTextTransformer

    def param_shapes(self) -> dict:
        """Every component's parameter tree as jax.ShapeDtypeStruct (traced, never allocated)."""
        return jax.eval_shape(lambda: init_params(self, jax.random.key(0)))


def build_modules(unet_config: dict, vae_config: dict, text_config: dict, dtype="float32", param_dtype="float32",
                  remat: bool = False, source: str = "config") -> Modules:
    """Modules from the diffusers / transformers config dicts; remat applies to the trained UNet only."""
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    return Modules(
        unet2d.UNet2DConditionModel(unet2d.UNetConfig.from_diffusers(unet_config, f"{source}: unet"), dtype,
                                    param_dtype, remat),
        vae.AutoencoderKL(vae.VAEConfig.from_diffusers(vae_config, f"{source}: vae"), False, dtype, param_dtype),
        clip_text.CLIPTextTransformer(
            clip_text.CLIPTextConfig.from_transformers(text_config, f"{source}: text_encoder"), dtype, param_dtype))


def init_params(modules: Modules, key) -> dict:
    """Random parameters for every component (Flax default initialisers)."""
    keys = jax.random.split(key, 3)
    u = modules.unet.config
    return {
        "unet": modules.unet.init(keys[0], jnp.zeros((1, 8, 8, u.in_channels)), jnp.zeros((1,)),
                                  jnp.zeros((1, 1, u.cross_attention_dim)))["params"],
        "vae": vae.init_params(modules.vae, keys[1], resolution=2 * modules.vae.config.downscale),
        "text_encoder": clip_text.init_params(modules.text_encoder, keys[2]),
    }


def make_family(modules: Modules, tokenize, name: str = "sd15_inpaint") -> Family:
    """The Family of pure functions over `{'unet', 'vae', 'text_encoder'}` params."""
    vae_config = modules.vae.config
    downscale, latent_channels = vae_config.downscale, vae_config.latent_channels

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        if height % downscale or width % downscale:
            raise ValueError(f"image size {height}x{width}: expected multiples of the VAE downscale {downscale}")
        return height // downscale, width // downscale, latent_channels

    def encode_prompt(params, tokens, inputs, embeddings):
        del inputs, embeddings  # CLIP reads the prompt only; no precomputed embedding stands in for it
        out = modules.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(tokens["input_ids"]))
        return {"text": out["last_hidden_state"]}

    def encode_image(params, image):
        return vae.vae_encode(modules.vae, params["vae"], image)

    def prepare_condition(params, inputs):
        image, mask = inputs["image"], inputs["mask"]
        check_image_and_mask(image, mask, downscale)
        height, width, _ = latent_shape(image.shape[1], image.shape[2])
        binary = (mask >= 0.5).astype(jnp.float32)  # diffusers' mask_processor binarises before anything else
        return {"mask": latent_mask(binary, height, width),
                "masked_latents": encode_image(params, masked_image(image, binary))}

    def denoise(params, x, t, cond):
        unet_input = x
        if modules.unet.config.in_channels == latent_channels + 1 + latent_channels:
            unet_input = jnp.concatenate([x, cond["mask"].astype(x.dtype), cond["masked_latents"].astype(x.dtype)], -1)
        eps = modules.unet.apply({"params": params["unet"]}, unet_input, t, cond["text"])
        return eps.astype(jnp.float32)

    def decode(params, x0):
        return vae.vae_decode(modules.vae, params["vae"], x0)

    return Family(name=name, parameterization=Epsilon(), guidance=BatchedCFG(),
                  schedule=lambda num_steps, shape: schedules.ddim_schedule(num_steps), inputs=("image", "mask"),
                  denoiser_key="unet", tokenize=tokenize, encode_prompt=encode_prompt,
                  prepare_condition=prepare_condition, denoise=denoise, encode_image=encode_image, decode=decode,
                  latent_shape=latent_shape, tensor_rules=TENSOR_RULES, text_encoders=("text_encoder",))


def clip_tokenize(tokenizer):
    """Host-side prompts -> {'input_ids'} with the pipeline's padding to model_max_length."""
    return lambda prompts, inputs=None: {"input_ids": clip_text.tokenize(tokenizer, prompts)}


def char_tokenize(config: clip_text.CLIPTextConfig):
    """A file-free stand-in for the tiny model: BOS, one id per character, EOS, padded with EOS."""
    bos, eos, length = config.vocab_size - 2, config.vocab_size - 1, config.max_position_embeddings
    if config.eos_token_id != eos:
        raise ValueError(f"char tokenizer: eos_token_id={config.eos_token_id}, expected vocab_size - 1 = {eos}")

    def tokenize(prompts, inputs=None):
        del inputs
        ids = np.full((len(prompts), length), eos, np.int32)
        for row, prompt in enumerate(prompts):
            body = [1 + ord(ch) % (config.vocab_size - 3) for ch in prompt][: length - 2]
            ids[row, : len(body) + 2] = [bos, *body, eos]
        return {"input_ids": ids}

    return tokenize


def modules_from_folder(model_dir: str, dtype="float32", remat: bool = False) -> Modules:
    """The modules a converted folder's configs describe; a folder whose `<family>.json` names another family
    is refused by name."""
    params_io.check_family(model_dir, "sd15_inpaint")
    configs = {c: params_io.read_json(os.path.join(model_dir, c, "config.json")) for c in COMPONENTS}
    return build_modules(configs["unet"], configs["vae"], configs["text_encoder"], dtype, remat=remat,
                         source=model_dir)


def family_from_folder(model_dir: str, name: str = "sd15_inpaint", dtype="float32", remat: bool = False,
                       modules: Modules | None = None) -> Family:
    """The family described by a converted folder's configs and tokenizer (parameters not read)."""
    modules = modules or modules_from_folder(model_dir, dtype, remat)
    return make_family(modules, clip_tokenize(clip_text.load_tokenizer(os.path.join(model_dir, "tokenizer"))), name)


def load(model_dir: str, name: str = "sd15_inpaint", dtype="float32", remat: bool = False,
         skip: tuple[str, ...] = ()) -> tuple[Family, dict]:
    """(Family, params) from a converted folder, every shape checked against the configs; params keep their
    stored dtype. Components in `skip` are not read. A folder whose `<family>.json` names another family
    (a Flux conversion) is refused by name."""
    modules = modules_from_folder(model_dir, dtype, remat)
    family = family_from_folder(model_dir, name, modules=modules)
    params_dir = os.path.join(model_dir, "params")
    params = params_io.load_params(params_dir, skip)
    expected = {k: v for k, v in modules.param_shapes().items() if k not in skip}
    params_io.check_shapes(params_dir, params, expected)
    return family, jax.tree.map(jnp.asarray, params)


def tiny_family(name: str = "sd15_inpaint", dtype="float32", remat: bool = False, unet_config: dict | None = None,
                vae_config: dict | None = None, text_config: dict | None = None) -> tuple[Family, Modules]:
    """The small family (VAE downscale 4, 2-level UNet, 2-layer CLIP) and its modules; no files needed."""
    modules = build_modules(unet_config or TINY_UNET, vae_config or TINY_VAE, text_config or TINY_TEXT, dtype,
                            remat=remat, source="tiny")
    return make_family(modules, char_tokenize(modules.text_encoder.config), name), modules


def tiny(name: str = "sd15_inpaint", seed: int = 0, dtype="float32", remat: bool = False,
         unet_config: dict | None = None, vae_config: dict | None = None,
         text_config: dict | None = None) -> tuple[Family, dict]:
    """The small family with random parameters."""
    family, modules = tiny_family(name, dtype, remat, unet_config, vae_config, text_config)
    return family, random_params(modules.param_shapes(), seed, modules.unet.param_dtype)


def build(name: str, *, path: str | None, seed: int = 0, dtype="float32", remat: bool = False,
          embeddings: frozenset[str] = frozenset(), weights: bool = True) -> tuple[Family, dict | None]:
    """The registry's factory (models/family.py): a converted folder at `path`, or the tiny model; with
    weights=False the family alone. CLIP runs on every prompt (no precomputed embedding stands in for it), so
    `embeddings` changes nothing."""
    del embeddings
    if not weights:
        return (tiny_family(name, dtype, remat)[0] if path is None else family_from_folder(path, name, dtype, remat),
                None)
    return tiny(name, seed, dtype, remat) if path is None else load(path, name, dtype, remat)
