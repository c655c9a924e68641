"""Qwen-Image's transformer (a diffusers QwenImageTransformer2DModel folder) -> Flax params.

Only the transformer so far, exposed as functions (no command: the family does not exist yet). Output, as
the Flux and SD3 converters write it:
  params/transformer.safetensors   keys 'transformer/<flax path>'; the blocks stacked on a leading axis
                                   (transformer/transformer_blocks/attn/to_q/kernel: (num_layers, in, out))
  transformer/config.json          the source's config
Streams one tensor at a time (flux.write_params, streaming.py); every unknown, missing or mis-shaped key is
named, by its diffusers key and its per-block Flax path.
"""
import os

from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.qwen_image.transformer import QwenImageConfig, param_shapes
from tools.convert_weights import flux
from tools.convert_weights.flux import Component, linear, norm_scale

NAME = "transformer"
STACKS = ("transformer_blocks",)

_BLOCK = r"transformer_blocks\.(\d+)"
TRANSFORMER_RULES = [
    *linear(r"(img_in|txt_in|proj_out)", r"\1"),
    *norm_scale(r"txt_norm", "txt_norm"),
    *linear(r"time_text_embed\.timestep_embedder\.(linear_[12])", r"time_text_embed/timestep_embedder/\1"),
    *linear(r"norm_out\.linear", "norm_out/linear"),
    *linear(rf"{_BLOCK}\.(img_mod|txt_mod)\.1", r"transformer_blocks/\1/\2/linear"),
    *linear(rf"{_BLOCK}\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
            r"transformer_blocks/\1/attn/\2"),
    *linear(rf"{_BLOCK}\.attn\.to_out\.0", r"transformer_blocks/\1/attn/to_out"),
    *norm_scale(rf"{_BLOCK}\.attn\.(norm_q|norm_k|norm_added_q|norm_added_k)", r"transformer_blocks/\1/attn/\2"),
    *linear(rf"{_BLOCK}\.(img_mlp|txt_mlp)\.net\.0\.proj", r"transformer_blocks/\1/\2/net_0_proj"),
    *linear(rf"{_BLOCK}\.(img_mlp|txt_mlp)\.net\.2", r"transformer_blocks/\1/\2/net_2"),
]


def transformer_component(src: str) -> Component:
    """A diffusers QwenImageTransformer2DModel folder (config.json + safetensors shards)."""
    config = read_json(os.path.join(src, "config.json"))
    shapes = flux.shapes_of(param_shapes(QwenImageConfig.from_diffusers(config, src)))
    return Component(src, config, tuple(flux.safetensors_files(src, NAME)), TRANSFORMER_RULES, shapes, STACKS)


def convert_transformer(src: str, dst: str, dtype: str = "float32") -> Component:
    """src (diffusers transformer folder) -> dst/params/transformer.safetensors + dst/transformer/config.json;
    returns the component, which `verify_transformer` takes."""
    component = transformer_component(src)
    flux.convert_component(component, dst, NAME, dtype)
    return component


def verify_transformer(component: Component, dst: str) -> int:
    """Re-read every source tensor; each must equal its written row (after the dtype cast). Returns the count."""
    return flux.verify_component(component, dst, NAME)
