"""The contract every model family fulfils (`jax_inpaint_rl.setup.FAMILY_MODULES` names them).

A family is a bundle of pure functions over a parameter pytree
`{'denoiser': ..., 'vae': ..., 'text': ...}` (component names are the family's
own). The trainer only ever calls these functions, so adding a family never
touches the loop.

Conventions (all arrays channels-last, fp32 unless the config says otherwise):
- images: (B, H, W, 3) in [-1, 1]; masks: (B, H, W, 1) with 1 = region to fill.
- latents `x`: whatever shape the denoiser works on ((B, h, w, C) for a UNet,
  packed (B, L, D) tokens for a transformer); `latent_shape` gives it.
- `t`: per-sample (B,) model time: sigma in [0, 1] for velocity families,
  the integer-valued DDPM timestep for epsilon families.
"""
import dataclasses
from typing import Any, Callable, Mapping

Params = Mapping[str, Any]
Cond = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    prediction: str  # "epsilon" (DDIM-style schedule) or "velocity" (flow matching)
    guidance: str  # "cfg" (batch-concatenated uncond/cond) or "embedded" (guidance is a model input)
    denoiser_key: str  # the params entry that RL trains ("unet", "transformer")
    # host side: prompts -> integer token arrays for every text encoder
    tokenize: Callable[[list[str]], dict[str, Any]]
    # (params, tokens) -> text conditioning pytree (batch-leading arrays)
    encode_prompt: Callable[[Params, dict[str, Any]], Cond]
    # (params, image, mask) -> image conditioning pytree (masked-image latents, mask ...)
    prepare_condition: Callable[[Params, Any, Any], Cond]
    # (params, x, t, cond) -> epsilon or velocity, without guidance; cond = text | image (| guidance)
    denoise: Callable[[Params, Any, Any, Cond], Any]
    # (params, image) -> clean latents x0 in the denoiser's layout (SFT / NFT / DPO targets)
    encode_image: Callable[[Params, Any], Any]
    # (params, x0) -> images in [-1, 1]
    decode: Callable[[Params, Any], Any]
    # (height, width) -> latent shape without the batch axis
    latent_shape: Callable[[int, int], tuple[int, ...]]
    # (regex on a denoiser parameter path, axis split over the mesh's 'tensor' axis); see parallel/partition.py
    tensor_rules: tuple[tuple[str, int], ...] = ()
