"""The Qwen-Image families: `qwen_image_edit`, `qwen_image_edit_plus`, `qwen_image_edit_inpaint`,
`qwen_image_inpaint`.

diffusers' QwenImageEditPipeline, QwenImageEditPlusPipeline (one input image), QwenImageEditInpaintPipeline and
QwenImageInpaintPipeline restated over parameter pytrees `{'transformer' (the 20B MMDiT), 'vae' (the causal 3-D
VAE on single frames), 'text_encoder' (Qwen2.5-VL-7B)}`:
- text: the pipeline's chat template around the prompt (the edit variants put the input image in the user turn,
  Edit Plus as "Picture 1: ..."), the VLM's last hidden state (after its final norm) over the whole sequence
  (image tokens included), the template's system prefix dropped (`drop` tokens: 64 for the edit templates, 34
  for text-to-image), valid tokens first and zero-masked padding after, as the pipelines' `_extract_masked_hidden`
  leaves them. Our sequences have a static length: the template, the image tokens and `prompt_tokens` prompt
  tokens; a longer prompt is refused, never cut. The negative prompt is " " (the pipelines' documented choice).
- the image the VLM reads: the input at the generated size (Edit, Edit-Inpaint: the pipelines resize the input
  to the output size first) or resized to 384 x 384 pixels' area (Edit Plus's CONDITION_IMAGE_SIZE, Lanczos as
  the pipeline resizes), through Qwen2.5-VL's image processor on the host (models/qwen_vl/processor.py).
- guidance: true CFG, one call per prompt, combined neg + s (pos - neg) and rescaled to the positive
  prediction's norm per token (TrueCFG(rescale=True)), scale 4 in the pipelines' examples.
- image conditioning: the input image's latents, 2x2-packed, appended on the sequence after the noisy latents
  with frame index 1 (Edit, Edit Plus, Edit-Inpaint); the transformer's output beyond the target's tokens is
  dropped. Inpainting (Edit-Inpaint, Inpaint): the mask binarised at 0.5 and nearest-resized to the latent grid,
  and after every step the latents outside it are the source's, noised to the next sigma with the initial
  noise (`Family.paste_region`); `sample.strength` < 1 starts from the noised source as the pipelines do.
- velocity prediction; `t` is sigma in [0, 1], passed to the transformer as the pipelines pass timestep / 1000;
  the schedule is linspace(1, 1/N, N) with the dynamic shift linear in the packed token count and the
  `shift_terminal` stretch, all read from the folder's scheduler/scheduler_config.json.
- latents `x`: (B, h/2, w/2, 64) 2x2-packed VAE latents (diffusers' `_pack_latents` order) kept on their grid,
  the VAE's per-channel normalisation ((z - mean) / std) applied. The VAE encodes with the posterior mean (the
  inpaint pipelines sample), so the conditioning is a deterministic function of the inputs.
"""
import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from PIL import Image

from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.guidance import TrueCFG
from jax_inpaint_rl.diffusion.parameterization import Velocity
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.layers.inpaint_utils import latent_mask
from jax_inpaint_rl.models.params_io import check_family, check_shapes, load_params, read_json
from jax_inpaint_rl.models.qwen_image import transformer as qwen_transformer
from jax_inpaint_rl.models.qwen_image import vae as vae_lib
from jax_inpaint_rl.models.qwen_image.transformer import QwenImageConfig, QwenImageTransformer
from jax_inpaint_rl.models.qwen_vl import model as vl_lib
from jax_inpaint_rl.models.qwen_vl import processor as processor_lib
from jax_inpaint_rl.models.random_init import random_params

MARKER = "qwen_image"  # the `<family>.json` the converter writes for every variant
NEGATIVE_PROMPT = " "
PROMPT_TOKENS = 256  # prompt tokens a sequence holds (the edit pipelines set no limit; t2i's is 1024 in all)
TINY_PROMPT_TOKENS = 8
EDIT_SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
               "then explain how the user's text instruction should alter or modify the image. Generate a new image "
               "that meets the user's requirements while maintaining consistency with the original input where "
               "appropriate.")
T2I_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
              "relationships of the objects and background:")
TEMPLATE = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}{}<|im_end|>\n<|im_start|>assistant\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
CONDITION_AREA = 384 * 384  # Edit Plus: the VLM reads the input resized to this many pixels


@dataclasses.dataclass(frozen=True)
class Variant:
    inputs: tuple[str, ...]
    system: str  # the template's system turn
    image_prompt: str  # what precedes the prompt in the user turn ("" when the VLM sees no image)
    drop: int  # the pipeline's prompt_template_encode_start_idx: leading hidden states dropped
    vlm_area: int | None  # the VLM reads the input resized to this area; None: at the generated size
    reference: bool  # the input's latents are appended on the sequence
    pastes: bool  # inpainting: the source is pasted outside the mask after every step

    @property
    def sees_image(self) -> bool:
        return bool(self.image_prompt)


VARIANTS = {
    "qwen_image_edit": Variant(("image",), EDIT_SYSTEM, VISION, 64, None, True, False),
    "qwen_image_edit_plus": Variant(("image",), EDIT_SYSTEM, "Picture 1: " + VISION, 64, CONDITION_AREA, True, False),
    "qwen_image_edit_inpaint": Variant(("image", "mask"), EDIT_SYSTEM, VISION, 64, None, True, True),
    "qwen_image_inpaint": Variant(("image", "mask"), T2I_SYSTEM, "", 34, None, False, True),
}


@dataclasses.dataclass(frozen=True)
class Modules:
    variant: str
    transformer: QwenImageTransformer
    vae: vae_lib.QwenImageVAE
    vlm: vl_lib.QwenVL
    processor: processor_lib.ImageProcessorConfig
    shift: schedules.DynamicShift
    prompt_tokens: int = PROMPT_TOKENS
    drop: int | None = None  # hidden states dropped before the prompt; None: the variant's (the pipeline's)

    @property
    def dropped(self) -> int:
        return self.spec.drop if self.drop is None else self.drop

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def factor(self) -> int:
        """Pixels per packed latent cell (VAE factor x 2x2 packing): 16."""
        return 2 * self.vae.config.downscale


# --- the VLM's view of the input image (host side) ---------------------------------------------------------

def condition_size(area: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) of `area` pixels at the input's aspect ratio, each rounded to a multiple of 32 (the
    pipelines' calculate_dimensions)."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    return round(new_width / ratio / 32) * 32, round(new_width / 32) * 32


def vlm_size(modules: Modules, height: int, width: int) -> tuple[int, int]:
    """The size of the image handed to the VLM's processor (before its own smart resize)."""
    area = modules.spec.vlm_area
    return (height, width) if area is None else condition_size(area, height, width)


def vision_grid(modules: Modules, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the processor makes of an input of height x width: static, from shapes alone."""
    p = modules.processor
    h, w = processor_lib.smart_resize(*vlm_size(modules, height, width), p.factor, p.min_pixels, p.max_pixels)
    return 1, h // p.patch_size, w // p.patch_size


def image_token_count(modules: Modules, height: int, width: int) -> int:
    """The <|image_pad|> tokens one input image becomes (its grid merged merge_size^2 to one)."""
    return math.prod(vision_grid(modules, height, width)) // modules.processor.merge_size ** 2


def vlm_images(modules: Modules, images: np.ndarray) -> list[np.ndarray]:
    """Inputs in [-1, 1] (B, H, W, 3) -> the uint8 images the pipeline hands its processor."""
    pixels = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    height, width = vlm_size(modules, *pixels.shape[1:3])
    if (height, width) == pixels.shape[1:3]:
        return list(pixels)
    return [np.asarray(Image.fromarray(p).resize((width, height), Image.LANCZOS)) for p in pixels]


def prompt_texts(modules: Modules, prompts: list[str], image_tokens: int) -> list[str]:
    """The chat-templated texts, each image placeholder expanded to its tokens as the processor expands it."""
    spec = modules.spec
    user = spec.image_prompt.replace(IMAGE_PAD, IMAGE_PAD * image_tokens)
    return [TEMPLATE.format(spec.system, user, prompt) for prompt in prompts]


def pad_rows(rows: list[list[int]], length: int, prompts: list[str], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows to `length`: (ids (B, L) int32, attention mask (B, L) int32); refuse a longer row."""
    too_long = [f"{prompt!r} ({len(row) - length + limit} prompt tokens)" for row, prompt in zip(rows, prompts)
                if len(row) > length]
    if too_long:
        raise ValueError(f"prompts longer than the {limit} tokens a Qwen-Image sequence holds: {', '.join(too_long)}")
    ids, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    for index, row in enumerate(rows):
        ids[index, :len(row)], mask[index, :len(row)] = row, 1
    return ids, mask


def make_tokenize(modules: Modules, encode_texts: Callable[[list[str]], list[list[int]]]):
    """(prompts, host inputs) -> {'ids', 'mask' (B, L), 'positions' (B, L, 3) multimodal RoPE positions,
    'pixels' (B, N, D) the processor's patches (variants whose VLM sees the image)}. `encode_texts` turns texts
    into token id lists (the folder's tokenizer)."""
    spec = modules.spec

    def tokenize(prompts, inputs=None):
        images = np.asarray(inputs["image"]) if spec.sees_image else None
        count = image_token_count(modules, *images.shape[1:3]) if spec.sees_image else 0
        fixed = len(encode_texts(prompt_texts(modules, [""], count))[0])
        ids, mask = pad_rows(encode_texts(prompt_texts(modules, list(prompts), count)),
                             fixed + modules.prompt_tokens, list(prompts), modules.prompt_tokens)
        grids = np.zeros((0, 3), np.int64)
        out = {"ids": ids, "mask": mask}
        if spec.sees_image:
            patches, grids = processor_lib.preprocess(vlm_images(modules, images), modules.processor)
            out["pixels"] = patches.reshape(len(prompts), -1, patches.shape[-1]).astype(np.float32)
        positions, _ = vl_lib.rope_index(modules.vlm.config, ids, mask, grids)
        out["positions"] = np.ascontiguousarray(np.transpose(positions, (1, 2, 0))).astype(np.int32)
        return out

    return tokenize


# --- the family functions -------------------------------------------------------------------------------

def encode_prompt(modules: Modules, params, tokens, inputs, embeddings):
    """Token arrays -> {'text': (B, L - drop, 3584) the VLM's last hidden states after the system prefix,
    'text_mask': (B, L - drop) 1 on valid tokens}."""
    del embeddings  # the VLM reads the image: no precomputed embedding stands in (the family takes none)
    pixels = grid = None
    if modules.spec.sees_image:
        height, width = inputs["image"].shape[1:3]
        pixels = tokens["pixels"].reshape(-1, tokens["pixels"].shape[-1])
        grid = (vision_grid(modules, height, width),) * tokens["ids"].shape[0]
    hidden, _ = modules.vlm.apply({"params": params["text_encoder"]}, tokens["ids"],
                                  jnp.moveaxis(tokens["positions"], -1, 0), tokens["mask"], pixels, grid)
    drop = modules.dropped
    return {"text": hidden[:, drop:], "text_mask": tokens["mask"][:, drop:]}


def encode_latents(modules: Modules, vae_params, image):
    """Images in [-1, 1] (B, H, W, 3) -> packed normalised latents (B, H/16, W/16, 64), the posterior mean."""
    check_size(modules, *image.shape[1:3])
    return flux.pack(vae_lib.encode_latents(modules.vae, vae_params, image))


def prepare_condition(modules: Modules, params, inputs):
    """{'reference': the input's packed latents (variants with a reference or a source), 'mask': the packed
    latent mask (B, h/2, w/2, 64), inpainting variants}."""
    spec, cond = modules.spec, {}
    if spec.reference or spec.pastes:
        cond["reference"] = encode_latents(modules, params["vae"], inputs["image"])
    if spec.pastes:
        mask = inputs["mask"]
        if mask.shape != inputs["image"].shape[:3] + (1,):
            raise ValueError(f"{modules.variant}: mask {mask.shape}: expected {inputs['image'].shape[:3] + (1,)}")
        grid = cond["reference"].shape[1:3]
        cells = latent_mask((mask >= 0.5).astype(jnp.float32), 2 * grid[0], 2 * grid[1])
        channels = modules.vae.config.latent_channels
        cond["mask"] = flux.pack(jnp.repeat(cells, channels, axis=-1))
    return cond


def paste_region(cond):
    """(the packed latent mask, the source latents): outside the mask the rollout keeps the noised source."""
    return cond["mask"], cond["reference"]


def denoise(modules: Modules, params, x, t, cond):
    """Velocity (fp32) for packed latents x (B, h/2, w/2, 64) at sigma t (B,)."""
    h2, w2 = x.shape[1:3]
    hidden, shapes = flux.tokens(x), ((1, h2, w2),)
    if modules.spec.reference:
        reference = cond["reference"]
        hidden = jnp.concatenate([hidden, flux.tokens(reference).astype(hidden.dtype)], axis=1)
        shapes += ((1, *reference.shape[1:3]),)
    out = modules.transformer.apply({"params": params["transformer"]}, hidden, jnp.asarray(t, jnp.float32),
                                    cond["text"], cond["text_mask"], shapes)
    return out[:, :h2 * w2].astype(jnp.float32).reshape(x.shape)


def decode(modules: Modules, params, x0):
    return vae_lib.decode_latents(modules.vae, params["vae"], flux.unpack(x0))


def check_size(modules: Modules, height: int, width: int) -> None:
    if height % modules.factor or width % modules.factor:
        raise ValueError(f"{modules.variant}: image size {height}x{width}: expected multiples of {modules.factor} "
                         "(VAE factor x 2x2 packing)")


def latent_shape(modules: Modules, height: int, width: int) -> tuple[int, int, int]:
    check_size(modules, height, width)
    return height // modules.factor, width // modules.factor, 4 * modules.vae.config.latent_channels


def schedule(modules: Modules, num_steps: int, latent_shape) -> schedules.Schedule:
    """The pipelines' sigmas, shifted by the target's packed token count."""
    return schedules.shifted_schedule(num_steps, latent_shape[0] * latent_shape[1], modules.shift)


def make_family(modules: Modules, tokenize: Callable) -> Family:
    bind = lambda fn: functools.partial(fn, modules)  # noqa: E731
    return Family(
        name=modules.variant, parameterization=Velocity(), guidance=TrueCFG(rescale=True), schedule=bind(schedule),
        inputs=modules.spec.inputs, denoiser_key="transformer", tokenize=tokenize,
        encode_prompt=bind(encode_prompt), prepare_condition=bind(prepare_condition), denoise=bind(denoise),
        encode_image=lambda params, image: encode_latents(modules, params["vae"], image), decode=bind(decode),
        latent_shape=bind(latent_shape), tensor_rules=flux.TENSOR_RULES, text_encoders=("text_encoder",),
        paste_region=paste_region if modules.spec.pastes else None, negative_prompt=NEGATIVE_PROMPT)


def build_modules(variant: str, transformer: QwenImageConfig, vae: vae_lib.QwenVAEConfig, vlm: vl_lib.QwenVLConfig,
                  processor: processor_lib.ImageProcessorConfig, shift: schedules.DynamicShift,
                  dtype: Any = jnp.float32, remat: bool = False, prompt_tokens: int = PROMPT_TOKENS,
                  drop: int | None = None, source: str = "qwen_image") -> Modules:
    """Check the components fit together (channels, widths) and build the Flax modules."""
    if variant not in VARIANTS:
        raise ValueError(f"{source}: unknown Qwen-Image variant {variant!r}; expected one of {sorted(VARIANTS)}")
    problems = []
    packed = 4 * vae.latent_channels
    if transformer.in_channels != packed or transformer.output_channels != packed:
        problems.append(f"transformer in_channels={transformer.in_channels} / output {transformer.output_channels} "
                        f"channels, packed VAE latents have {packed}")
    if transformer.joint_attention_dim != vlm.text.hidden_size:
        problems.append(f"joint_attention_dim={transformer.joint_attention_dim} != the VLM's hidden_size="
                        f"{vlm.text.hidden_size}")
    if problems:
        raise ValueError(f"{source}: components do not fit together: " + "; ".join(problems))
    dtype = jnp.dtype(dtype)
    return Modules(variant, QwenImageTransformer(transformer, dtype, remat), vae_lib.QwenImageVAE(vae, dtype),
                   vl_lib.QwenVL(vlm, dtype, remat=remat), processor, shift, prompt_tokens, drop)


def param_shapes(modules: Modules, lm_head: bool = False):
    """Every component's parameter tree as jax.ShapeDtypeStruct (traced, never allocated); `lm_head`: the text
    encoder with its language-model head (the VLM policy's logits; the DiT's conditioning needs none)."""
    return {"transformer": qwen_transformer.param_shapes(modules.transformer.config),
            "vae": vae_lib.param_shapes(modules.vae.config),
            "text_encoder": vl_lib.param_shapes(modules.vlm.config, lm_head)}


# --- building from a converted folder or from scratch -------------------------------------------------

def hf_encode_texts(tokenizer):
    """Texts -> token id lists with the folder's Qwen2 tokenizer (special tokens parsed, nothing added)."""
    return lambda texts: [list(row) for row in tokenizer(texts)["input_ids"]]


def folder_family(model_dir: str, name: str = "qwen_image_edit", dtype: Any = "float32",
                  remat: bool = False) -> tuple[Family, Modules]:
    """The Family (and its modules) of a converted folder: configs, processor and tokenizer only, no weights."""
    from transformers import AutoTokenizer  # host-side tokenisation only (the library never imports torch)

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: converted Qwen-Image folder not found")
    check_family(model_dir, MARKER)
    path = lambda *parts: os.path.join(model_dir, *parts)  # noqa: E731
    config = lambda folder, file="config.json": (read_json(path(folder, file)), path(folder, file))  # noqa: E731
    modules = build_modules(
        name, QwenImageConfig.from_diffusers(*config("transformer")), vae_lib.QwenVAEConfig.from_diffusers(
            *config("vae")), vl_lib.QwenVLConfig.from_transformers(*config("text_encoder")),
        processor_lib.ImageProcessorConfig.from_file(path("processor", "preprocessor_config.json")),
        schedules.DynamicShift.from_diffusers(*config("scheduler", "scheduler_config.json")), dtype, remat,
        source=model_dir)
    return make_family(modules, make_tokenize(modules, hf_encode_texts(AutoTokenizer.from_pretrained(
        path("tokenizer"))))), modules


def load(model_dir: str, name: str = "qwen_image_edit", dtype: Any = "float32", remat: bool = False,
         lm_head: bool = False):
    """(Family, params) from a folder written by `python -m tools.convert_weights qwen-image-edit`, every shape
    checked against the folder's configs (with `lm_head`, the folder was converted with --lm-head)."""
    family, _, params = load_modules(model_dir, name, dtype, remat, lm_head)
    return family, params


def load_modules(model_dir: str, name: str = "qwen_image_edit", dtype: Any = "float32", remat: bool = False,
                 lm_head: bool = False) -> tuple[Family, Modules, dict]:
    """`load`, with the modules (the VLM policy runs the text encoder's module beyond the family's functions)."""
    family, modules = folder_family(model_dir, name, dtype, remat)
    params_dir = os.path.join(model_dir, "params")
    params = load_params(params_dir)
    if not lm_head:  # a folder converted with --lm-head (for the VLM policy) serves the DiT's text encoder too
        params["text_encoder"]["language_model"].pop("lm_head", None)
    check_shapes(params_dir, params, param_shapes(modules, lm_head))
    return family, modules, params


# --- the tiny family ----------------------------------------------------------------------------------------

TINY_VOCAB = 96  # the last SPECIAL_TOKENS ids are the special tokens, the rest hashed words
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>", "<|endoftext|>")
TINY_IDS = {token: TINY_VOCAB - len(SPECIAL_TOKENS) + i for i, token in enumerate(SPECIAL_TOKENS)}


def tiny_encode_texts(texts: list[str]) -> list[list[int]]:
    """Stand-in tokenizer for the tiny models: special tokens to their ids, every other word hashed to one id."""
    pattern = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
    ids = []
    for text in texts:
        row = []
        for piece in pattern.split(text):
            if piece in TINY_IDS:
                row.append(TINY_IDS[piece])
            else:
                row += [sum(map(ord, w)) % (TINY_VOCAB - len(SPECIAL_TOKENS) - 1) + 1 for w in piece.split()]
        ids.append(row)
    return ids


def tiny_drop(variant: str) -> int:
    """The tiny tokenizer's system prefix: the template's tokens before the user turn's content (what the
    pipelines' drop indices count with the real tokenizer)."""
    spec = VARIANTS[variant]
    prefix = TEMPLATE.format(spec.system, "", "").split("<|im_end|>\n<|im_start|>assistant")[0]
    return len(tiny_encode_texts([prefix])[0])


def tiny_configs():
    """Small configs with Qwen-Image-Edit's structure: a 2-block MMDiT (16 latent channels packed to 64), the
    2x VAE, a 2-layer Qwen2.5-VL (grouped-query attention, mrope, a 2-block windowed vision tower with one
    full-attention block) whose hidden size is the MMDiT's text width."""
    vae = vae_lib.tiny_config()
    text = vl_lib.TextConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4,
                             mrope_section=(2, 1, 1))
    vision = vl_lib.VisionConfig(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=14,
                                 spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                 fullatt_block_indexes=(1,), out_hidden_size=32)
    vlm = vl_lib.QwenVLConfig(text, vision, image_token_id=TINY_IDS[IMAGE_PAD],
                              video_token_id=TINY_IDS["<|video_pad|>"],
                              vision_start_token_id=TINY_IDS["<|vision_start|>"],
                              vision_end_token_id=TINY_IDS["<|vision_end|>"])
    transformer = QwenImageConfig(patch_size=2, in_channels=4 * vae.z_dim, out_channels=vae.z_dim, num_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  axes_dims_rope=(4, 6, 6))
    processor = processor_lib.ImageProcessorConfig(min_pixels=28 * 28, max_pixels=56 * 56)
    return transformer, vae, vlm, processor


def tiny_modules(name: str = "qwen_image_edit", dtype: Any = "float32", remat: bool = False) -> Modules:
    return build_modules(name, *tiny_configs(), schedules.DynamicShift(max_seq_len=8192, max_shift=0.9,
                                                                      shift_terminal=0.02),
                         dtype, remat, TINY_PROMPT_TOKENS, tiny_drop(name), source="tiny")


def tiny(name: str = "qwen_image_edit", seed: int = 0, dtype: Any = "float32", remat: bool = False,
         lm_head: bool = False):
    """(Family, params) of a tiny random Qwen-Image family, built in JAX (`lm_head`: the VLM's head too)."""
    modules = tiny_modules(name, dtype, remat)
    return (make_family(modules, make_tokenize(modules, tiny_encode_texts)),
            random_params(param_shapes(modules, lm_head), seed))


def build(name: str, *, path: str | None, seed: int = 0, dtype: Any = "float32", remat: bool = False,
          embeddings: frozenset[str] = frozenset(), weights: bool = True):
    """The registry's factory (models/family.py): a converted folder at `path`, or the tiny model; with
    weights=False the family alone. `embeddings` must be empty: the VLM reads the input image."""
    if embeddings:
        raise ValueError(f"{name}: precomputed embeddings {sorted(embeddings)} given; the Qwen-Image families take "
                         "none (the text encoder reads the input image, and the negative prompt needs it too)")
    if not weights:
        if path is None:
            modules = tiny_modules(name, dtype, remat)
            return make_family(modules, make_tokenize(modules, tiny_encode_texts)), None
        return folder_family(path, name, dtype, remat)[0], None
    return tiny(name, seed, dtype, remat) if path is None else load(path, name, dtype, remat)
