"""Qwen2.5-VL (a transformers Qwen2_5_VLForConditionalGeneration folder, as Qwen-Image's `text_encoder/` holds it)
-> Flax params of jax_inpaint_rl.models.qwen_vl.model.QwenVL.

Functions (qwen_image.py's pipeline conversion calls them). Output, as the other converters write a component:
  params/text_encoder.safetensors   keys 'text_encoder/<flax path>': language_model/... (decoder layers stacked on a
                                    leading axis: language_model/layers/self_attn/q_proj/kernel (layers, in, out))
                                    and visual/... (blocks stacked: visual/blocks/...)
  text_encoder/config.json          the source's config
Both checkpoint layouts are read: transformers < 4.52 (and transformers 5's save_pretrained) store `model.*` for
the language model and `visual.*`; transformers 4.52 - 4.57 store `model.language_model.*` and `model.visual.*`; the
layout is told by the keys, and keys of the other one are then named as unknown. `lm_head.weight` is converted only
with lm_head=True: the text encoder needs no logits, so without it the tensor is skipped, and so is a stored copy of
a tied lm_head (tie_word_embeddings: the logits use the embedding). Every other unknown, missing or mis-shaped key is
named, by its source key and its per-layer Flax path.

Streams one tensor at a time (streaming.py: peak memory a few copies of the largest tensor, the 545M-entry
embedding). The stacks sit inside subtrees ('language_model/layers', 'visual/blocks'): flux.split_layer finds them
by prefix.
"""
import functools
import os
import re
from typing import Iterator

import numpy as np

from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.qwen_vl.model import QwenVLConfig, param_shapes
from tools.convert_weights import common, flux
from tools.convert_weights.common import Rule, identity
from tools.convert_weights.flux import Component, linear, norm_scale
from tools.convert_weights.qwen_vl_vision import vision_rules
from tools.convert_weights.streaming import read_header

NAME = "text_encoder"
STACKS = ("language_model/layers", "visual/blocks")
LAYOUTS = {  # layout -> (language-model key prefix, vision key prefix)
    "model.layers": ("model.", "visual."),
    "model.language_model.layers": ("model.language_model.", "model.visual."),
}
LM_HEAD = "lm_head.weight"


def language_rules(prefix: str, into: str = "language_model/") -> list[Rule]:
    """torch keys `<prefix>embed_tokens.weight`, `<prefix>layers.<i>....`, `<prefix>norm.weight` -> Flax paths under
    `into`."""
    p = re.escape(prefix)
    layer = rf"{p}layers\.(\d+)"
    return [
        Rule(rf"{p}embed_tokens\.weight", f"{into}embed_tokens/embedding", identity),
        *linear(rf"{layer}\.self_attn\.(q_proj|k_proj|v_proj)", rf"{into}layers/\1/self_attn/\2"),
        *linear(rf"{layer}\.self_attn\.o_proj", rf"{into}layers/\1/self_attn/o_proj", bias=False),
        *linear(rf"{layer}\.mlp\.(gate_proj|up_proj|down_proj)", rf"{into}layers/\1/mlp/\2", bias=False),
        *norm_scale(rf"{layer}\.(input_layernorm|post_attention_layernorm)", rf"{into}layers/\1/\2"),
        *norm_scale(rf"{p}norm", f"{into}norm"),
    ]


def detect_layout(src: str, files) -> str:
    """Which of LAYOUTS the checkpoint uses, from its keys (headers only)."""
    keys = {key for path in files for key in read_header(path)[0]}
    found = [layout for layout in LAYOUTS if any(k.startswith(layout + ".") for k in keys)]
    if len(found) != 1:
        raise common.ConversionError(f"{src}: expected decoder layers under exactly one of {sorted(LAYOUTS)}; found "
                                     f"{found or 'neither'} (keys such as {sorted(keys)[:4]})")
    return found[0]


def _drop(tensors: Iterator[tuple[str, np.ndarray]], skipped: tuple[str, ...]):
    return ((key, value) for key, value in tensors if key not in skipped)


def text_encoder_component(src: str, lm_head: bool = False) -> Component:
    """A transformers Qwen2_5_VLForConditionalGeneration folder (config.json + safetensors shards)."""
    config = read_json(os.path.join(src, "config.json"))
    vl_config = QwenVLConfig.from_transformers(config, src)
    files = tuple(flux.safetensors_files(src, "Qwen2.5-VL text encoder"))
    layout = detect_layout(src, files)
    language_prefix, vision_prefix = LAYOUTS[layout]
    owns_head = lm_head and not vl_config.text.tie_word_embeddings
    rules = language_rules(language_prefix) + vision_rules(vision_prefix)
    if owns_head:
        rules += linear(r"lm_head", "language_model/lm_head", bias=False)
    shapes = flux.shapes_of(param_shapes(vl_config, owns_head))
    rename = functools.partial(_drop, skipped=() if owns_head else (LM_HEAD,))
    return Component(src, config, files, rules, shapes, STACKS, layout, rename)


def convert_text_encoder(src: str, dst: str, dtype: str = "float32", lm_head: bool = False) -> Component:
    """src -> dst/params/text_encoder.safetensors + dst/text_encoder/config.json, streamed; on any problem the
    partial file is removed and the error names every bad key. Returns the component, which
    `verify_text_encoder` takes."""
    component = text_encoder_component(src, lm_head)
    flux.convert_component(component, dst, NAME, dtype)
    return component


def verify_text_encoder(component: Component, dst: str) -> int:
    """Re-read every source tensor; each must equal its written row (after the dtype cast). Returns the count."""
    return flux.verify_component(component, dst, NAME)
