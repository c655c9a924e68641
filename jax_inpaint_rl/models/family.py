"""The contract every model family fulfils, and the registry that names the families.

A family is a value: pure functions over a parameter pytree
`{'transformer' | 'unet': ..., 'vae': ..., 'text_encoder': ...}` (component names
are the family's own) plus the values that say how it samples and trains (its
parameterization, guidance and schedule) and which example fields it reads. The
trainer only calls these, so adding a family is one folder under `models/` and
one line in `FAMILIES` (or a "module:factory" name in `model.family`).

Conventions (all arrays channels-last, fp32 unless the config says otherwise):
- images: (B, H, W, 3) in [-1, 1]; masks: (B, H, W, 1) with 1 = region to fill.
- `inputs`: the example fields the family conditions on besides the prompt, as
  device arrays {name: (B, ...)}: 'image' (the source / reference / edit input),
  'mask', 'style_image'; an edit family reads ('image',), text-to-image ().
- latents `x`: whatever shape the denoiser works on ((B, h, w, C) for a UNet,
  packed (B, h/2, w/2, 4C) tokens for Flux); `latent_shape` gives it.
- `t`: per-sample (B,) model time: sigma in [0, 1] for velocity families,
  the integer-valued DDPM timestep for epsilon families.
- precomputed text embeddings: `text_embeddings` maps an embedding name found in
  the data (`<name>_embedding_path`) to the params component it replaces;
  `encode_prompt` uses the embedding instead of running that encoder, which then
  need not be loaded.
"""
import dataclasses
from typing import Any, Callable, Mapping

from jax_inpaint_rl.diffusion.schedules import Schedule
from jax_inpaint_rl.registry import resolve

Params = Mapping[str, Any]
Cond = Mapping[str, Any]
Inputs = Mapping[str, Any]
INPUT_FIELDS = ("image", "mask", "style_image")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    parameterization: Any  # diffusion.parameterization.Velocity() | Epsilon(): x_t, targets, x0 estimates
    guidance: Any  # diffusion.guidance.BatchedCFG() | EmbeddedGuidance() | TrueCFG(): how the scale enters
    # (num_steps, latent_shape) -> the sampling schedule (diffusion/schedules.py)
    schedule: Callable[[int, tuple[int, ...]], Schedule]
    inputs: tuple[str, ...]  # example fields read besides the prompt, a subset of INPUT_FIELDS
    denoiser_key: str  # the params entry that RL trains ("unet", "transformer")
    # host side: (prompts, host inputs) -> integer token arrays for every text encoder
    tokenize: Callable[[list[str], Inputs], dict[str, Any]]
    # (params, tokens, inputs, precomputed embeddings {name: (B, ...)}) -> text conditioning (batch-leading);
    # `inputs` lets an encoder that sees the image (a VLM) read it
    encode_prompt: Callable[[Params, dict[str, Any], Inputs, Mapping[str, Any]], Cond]
    # (params, inputs) -> image conditioning pytree (masked-image latents, mask, reference latents ...)
    prepare_condition: Callable[[Params, Inputs], Cond]
    # (params, x, t, cond) -> epsilon or velocity, without guidance; cond = text | image (| guidance)
    denoise: Callable[[Params, Any, Any, Cond], Any]
    # (params, image) -> clean latents x0 in the denoiser's layout (SFT targets, one-step GRPO)
    encode_image: Callable[[Params, Any], Any]
    # (params, x0) -> images in [-1, 1]
    decode: Callable[[Params, Any], Any]
    # (height, width) -> latent shape without the batch axis
    latent_shape: Callable[[int, int], tuple[int, ...]]
    # (regex on a denoiser parameter path, axis split over the mesh's 'tensor' axis); see parallel/partition.py
    tensor_rules: tuple[tuple[str, int], ...] = ()
    # the params components only `encode_prompt` uses (model.offload_text_encoders keeps them in host memory)
    text_encoders: tuple[str, ...] = ()
    # precomputed embedding name -> the text encoder (a `text_encoders` entry) it stands in for
    text_embeddings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # side of the square 'style_image' (the target cropped to the mask's box) a family with that input reads
    style_resolution: int = 0
    # cond -> (region (B, *latent_shape) 1 where the latents are generated, source latents x0): a family that
    # generates only a region (SD3's 16-channel inpainting). After every step the rollout sets the latents outside
    # the region to the source noised to the next step's time with the initial noise, and log-probs average over
    # the region alone (the rest is not sampled). Flow-matching schedules only. None: every latent is generated.
    paste_region: Callable[[Cond], tuple[Any, Any]] | None = None
    # the negative prompt of guidances that need one (the pipelines' default: "" for SD1.5 / SD3, " " for Qwen-Image)
    negative_prompt: str = ""

    def __post_init__(self):
        unknown = set(self.inputs) - set(INPUT_FIELDS)
        if unknown:
            raise ValueError(f"family {self.name}: inputs {sorted(unknown)} unknown; expected a subset of "
                             f"{INPUT_FIELDS}")
        if ("style_image" in self.inputs) != (self.style_resolution > 0):
            raise ValueError(f"family {self.name}: style_resolution={self.style_resolution} must be > 0 exactly when "
                             "'style_image' is one of its inputs")
        if self.paste_region is not None and self.parameterization.name != "velocity":
            raise ValueError(f"family {self.name}: paste_region needs a flow-matching (velocity) family; its "
                             f"parameterization is {self.parameterization.name!r}")
        if not set(self.text_embeddings.values()) <= set(self.text_encoders):
            raise ValueError(f"family {self.name}: text_embeddings {dict(self.text_embeddings)} name components "
                             f"outside text_encoders {self.text_encoders}")


# name -> "module:factory"; factory(name, *, path (None: the tiny model), seed, dtype, remat, embeddings,
# weights) -> (Family, params), where `embeddings` names the precomputed text embeddings every example supplies
# (the encoders they replace are not loaded) and weights=False reads configs only (params None)
FAMILIES = {
    "sd15_inpaint": "jax_inpaint_rl.models.sd15.family:build",
    "flux_fill": "jax_inpaint_rl.models.flux.family:build",
    "flux_kontext": "jax_inpaint_rl.models.flux.family:build",
    "flux_dev": "jax_inpaint_rl.models.flux.family:build",
    "calligrapher": "jax_inpaint_rl.models.calligrapher.family:build",
    "sd3": "jax_inpaint_rl.models.sd3.family:build",
    "sd3_inpaint": "jax_inpaint_rl.models.sd3.family:build",
    "qwen_image_edit": "jax_inpaint_rl.models.qwen_image.family:build",
    "qwen_image_edit_plus": "jax_inpaint_rl.models.qwen_image.family:build",
    "qwen_image_edit_inpaint": "jax_inpaint_rl.models.qwen_image.family:build",
    "qwen_image_inpaint": "jax_inpaint_rl.models.qwen_image.family:build",
}


def factory(name: str) -> Callable[..., tuple[Family, dict]]:
    """The builder registered as `name`, or named directly as "package.module:function"."""
    return resolve(name, FAMILIES, "model.family")
