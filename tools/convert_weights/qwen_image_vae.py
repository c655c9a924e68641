"""Qwen-Image's VAE (a diffusers AutoencoderKLQwenImage folder) -> Flax params for
jax_inpaint_rl.models.qwen_image.vae.

Exposed as functions (the family's command line calls them). Output, as the Flux and SD3 converters write a
component:
  params/vae.safetensors   keys 'vae/<flax path>' (vae/encoder/down_blocks_0/conv1/kernel ...)
  vae/config.json          the source's config
Layouts: 3-D conv weights (out, in, kt, kh, kw) -> (kt, kh, kw, in, out), temporal axis kept; 2-D conv
weights (out, in, kh, kw) -> (kh, kw, in, out); RMS norm gammas (C, 1, 1[, 1]) -> (C,). Every unknown,
missing or mis-shaped key is named, by its diffusers key and its Flax path (flux.convert_component).
"""
import os

import numpy as np

from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.qwen_image.vae import QwenVAEConfig, param_shapes
from tools.convert_weights import flux
from tools.convert_weights.common import Rule, conv_to_flax, identity
from tools.convert_weights.flux import Component

NAME = "vae"


def conv3d_to_flax(x: np.ndarray) -> np.ndarray:
    """torch Conv3d weight (out, in, kt, kh, kw) -> (kt, kh, kw, in, out)."""
    return np.ascontiguousarray(x.transpose(2, 3, 4, 1, 0))


def gamma_to_flax(x: np.ndarray) -> np.ndarray:
    """QwenImageRMS_norm gamma (C, 1, 1[, 1]) -> (C,); a gamma of any other shape stays as it is, so the shape
    check names it."""
    return x.reshape(x.shape[0]) if x.ndim > 1 and x.size == x.shape[0] else x


def _module(torch_prefix: str, flax_prefix: str, transform) -> list[Rule]:
    return [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/kernel", transform),
            Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias", identity)]


def conv3d(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return _module(torch_prefix, flax_prefix, conv3d_to_flax)


def conv2d(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return _module(torch_prefix, flax_prefix, conv_to_flax)


def rms_norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(rf"{torch_prefix}\.gamma", f"{flax_prefix}/scale", gamma_to_flax)]


def residual(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [*rms_norm(rf"{torch_prefix}\.(?P<norm>norm[12])", rf"{flax_prefix}/\g<norm>"),
            *conv3d(rf"{torch_prefix}\.(?P<conv>conv1|conv2|conv_shortcut)", rf"{flax_prefix}/\g<conv>")]


def attention(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [*rms_norm(rf"{torch_prefix}\.norm", f"{flax_prefix}/norm"),
            *conv2d(rf"{torch_prefix}\.(?P<layer>to_qkv|proj)", rf"{flax_prefix}/\g<layer>")]


def resample(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [*conv2d(rf"{torch_prefix}\.resample\.1", f"{flax_prefix}/resample_1"),
            *conv3d(rf"{torch_prefix}\.time_conv", f"{flax_prefix}/time_conv")]


def _rules() -> list[Rule]:
    part = r"(?P<part>encoder|decoder)"
    # the encoder's down_blocks is one flat list of residual and resample layers: a key's suffix says which,
    # and the shape check names any index whose layer is not of that kind
    down_t, down_f = r"encoder\.down_blocks\.(?P<b>\d+)", r"encoder/down_blocks_\g<b>"
    up_t, up_f = r"decoder\.up_blocks\.(?P<b>\d+)", r"decoder/up_blocks_\g<b>"
    return [
        *conv3d(r"(?P<q>quant_conv|post_quant_conv)", r"\g<q>"),
        *conv3d(rf"{part}\.(?P<c>conv_in|conv_out)", r"\g<part>/\g<c>"),
        *rms_norm(rf"{part}\.norm_out", r"\g<part>/norm_out"),
        *residual(rf"{part}\.mid_block\.resnets\.(?P<r>\d+)", r"\g<part>/mid_block/resnets_\g<r>"),
        *attention(rf"{part}\.mid_block\.attentions\.(?P<a>\d+)", r"\g<part>/mid_block/attentions_\g<a>"),
        *residual(down_t, down_f),
        *resample(down_t, down_f),
        *residual(rf"{up_t}\.resnets\.(?P<r>\d+)", rf"{up_f}/resnets_\g<r>"),
        *resample(rf"{up_t}\.upsamplers\.0", f"{up_f}/upsamplers_0"),
    ]


VAE_RULES = _rules()


def vae_component(src: str) -> Component:
    """A diffusers AutoencoderKLQwenImage folder (config.json + safetensors)."""
    config = read_json(os.path.join(src, "config.json"))
    shapes = flux.shapes_of(param_shapes(QwenVAEConfig.from_diffusers(config, src)))
    return Component(src, config, tuple(flux.safetensors_files(src, "Qwen-Image VAE")), VAE_RULES, shapes)


def convert_vae(src: str, dst: str, dtype: str = "float32") -> Component:
    """src (diffusers VAE folder) -> dst/params/vae.safetensors + dst/vae/config.json; returns the component,
    which `verify_vae` takes."""
    component = vae_component(src)
    flux.convert_component(component, dst, NAME, dtype)
    return component


def verify_vae(component: Component, dst: str) -> int:
    """Re-read every source tensor; each must equal its written one (after the dtype cast). Returns the count."""
    return flux.verify_component(component, dst, NAME)
