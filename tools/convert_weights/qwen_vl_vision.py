"""Qwen2.5-VL's vision tower (the `visual.*` tensors of a transformers checkpoint) -> Flax params of
jax_inpaint_rl.models.qwen_vl.vision.

`vision_rules(prefix)` is the key table: torch keys under `prefix` ('' for a bare
Qwen2_5_VisionTransformerPretrainedModel, 'visual.' in released Qwen2.5-VL checkpoints, 'model.visual.' as
transformers 5 saves Qwen2_5_VLForConditionalGeneration) -> Flax paths under `into` ('visual/' by default:
the tower's subtree in a whole Qwen2.5-VL param tree). The blocks are stacked on a leading axis: their
per-layer paths are `<into>blocks/<i>/...`, the stack is STACKS = ('blocks',) inside the `visual` subtree.
The patch embedding's Conv3d weight (out, C, T, p, p) becomes a Dense kernel (C * T * p * p, out): the order
in which the image processor flattens a patch.

`convert_vision` writes the tower alone, as the Flux and SD3 converters write a component:
  params/visual.safetensors   keys 'visual/<flax path>' (visual/blocks/attn/qkv/kernel: (depth, in, out))
  visual/config.json          the source's vision config
streamed one tensor at a time (flux.write_params); every unknown, missing or mis-shaped key is named.
"""
import functools
import os
import re
from typing import Iterator

import numpy as np

from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.qwen_vl.vision import VisionConfig, param_shapes
from tools.convert_weights import flux
from tools.convert_weights.common import Rule
from tools.convert_weights.flux import Component, linear, norm_scale

NAME = "visual"
STACKS = ("blocks",)  # inside the `visual` subtree


def conv3d_to_dense(x: np.ndarray) -> np.ndarray:
    """torch Conv3d weight (out, C, T, p, p) with kernel = stride -> Dense kernel (C * T * p * p, out)."""
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def vision_rules(prefix: str, into: str = f"{NAME}/") -> list[Rule]:
    """torch keys `<prefix>patch_embed.proj.weight`, `<prefix>blocks.<i>....`, `<prefix>merger....` -> Flax
    paths `<into>patch_embed/kernel`, `<into>blocks/<i>/...`, `<into>merger/...`."""
    p = re.escape(prefix)
    block = rf"{p}blocks\.(\d+)"
    return [
        Rule(rf"{p}patch_embed\.proj\.weight", f"{into}patch_embed/kernel", conv3d_to_dense),
        *norm_scale(rf"{block}\.(norm1|norm2)", rf"{into}blocks/\1/\2"),
        *linear(rf"{block}\.attn\.(qkv|proj)", rf"{into}blocks/\1/attn/\2"),
        *linear(rf"{block}\.mlp\.(gate_proj|up_proj|down_proj)", rf"{into}blocks/\1/mlp/\2"),
        *norm_scale(rf"{p}merger\.ln_q", f"{into}merger/ln_q"),
        *linear(rf"{p}merger\.mlp\.(0|2)", rf"{into}merger/mlp_\1"),
    ]


def under_prefix(tensors: Iterator[tuple[str, np.ndarray]], prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """Only the tensors whose key starts with `prefix` (a whole Qwen2.5-VL checkpoint: the tower's)."""
    return ((key, value) for key, value in tensors if key.startswith(prefix))


def vision_component(src: str, prefix: str = "") -> Component:
    """A transformers folder (config.json + safetensors shards): a bare vision tower (prefix ''), or a whole
    Qwen2.5-VL model whose tower sits under `prefix` ('visual.' or 'model.visual.'; the other tensors are
    left to the language model's converter)."""
    config = read_json(os.path.join(src, "config.json"))
    vision = config.get("vision_config", config)
    shapes = flux.shapes_of(param_shapes(VisionConfig.from_transformers(vision, src)))
    return Component(src, vision, tuple(flux.safetensors_files(src, "Qwen2.5-VL vision tower")),
                     vision_rules(prefix, into=""), shapes, STACKS,
                     rename=functools.partial(under_prefix, prefix=prefix))


def convert_vision(src: str, dst: str, prefix: str = "", dtype: str = "float32") -> Component:
    """src -> dst/params/visual.safetensors + dst/visual/config.json; returns the component, which
    `verify_vision` takes."""
    component = vision_component(src, prefix)
    flux.convert_component(component, dst, NAME, dtype)
    return component


def verify_vision(component: Component, dst: str) -> int:
    """Re-read every source tensor; each must equal its written row (after the dtype cast). Returns the count."""
    return flux.verify_component(component, dst, NAME)
