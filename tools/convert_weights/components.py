"""Key tables and I/O for the components SD1.5 and Flux share: diffusers UNet2DConditionModel, AutoencoderKL,
transformers CLIPTextModel; plus reading a diffusers component folder as a stream of numpy tensors.

Rules use named groups so a block prefix and a layer suffix compose without renumbering. Flax paths are
the torch names with `.N` folded into `_N` and `.` turned into `/` (see the model modules).
"""
import json
import os
import re
from typing import Iterator

import numpy as np

from tools.convert_weights.common import Rule, conv_to_flax, identity, linear_to_flax

KINDS = {"conv": ("kernel", conv_to_flax), "dense": ("kernel", linear_to_flax), "norm": ("scale", identity),
         "embed": ("embedding", identity)}
# Buffers some checkpoints carry that are not parameters (transformers' position ids).
CLIP_PREFIX = r"(?:text_model\.)?"
IGNORED_TORCH_KEYS = (rf"{CLIP_PREFIX}embeddings\.position_ids",)


def module(torch_prefix: str, flax_prefix: str, kind: str) -> list[Rule]:
    """weight (and bias when present) of one torch module -> its Flax module."""
    leaf, transform = KINDS[kind]
    return [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/{leaf}", transform),
            Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias")]


def resnet_rules(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [rule for name, kind in (("norm1", "norm"), ("conv1", "conv"), ("time_emb_proj", "dense"),
                                    ("norm2", "norm"), ("conv2", "conv"), ("conv_shortcut", "conv"))
            for rule in module(rf"{torch_prefix}\.{name}", f"{flax_prefix}/{name}", kind)]


def transformer2d_rules(torch_prefix: str, flax_prefix: str, use_linear_projection: bool) -> list[Rule]:
    block_t, block_f = rf"{torch_prefix}\.transformer_blocks\.(?P<t>\d+)", rf"{flax_prefix}/transformer_blocks_\g<t>"
    projection = "dense" if use_linear_projection else "conv"
    return [
        *module(rf"{torch_prefix}\.norm", f"{flax_prefix}/norm", "norm"),
        *module(rf"{torch_prefix}\.(?P<proj>proj_in|proj_out)", rf"{flax_prefix}/\g<proj>", projection),
        *module(rf"{block_t}\.(?P<n>norm[123])", rf"{block_f}/\g<n>", "norm"),
        *module(rf"{block_t}\.(?P<a>attn[12])\.(?P<p>to_[qkv])", rf"{block_f}/\g<a>/\g<p>", "dense"),
        *module(rf"{block_t}\.(?P<a>attn[12])\.to_out\.0", rf"{block_f}/\g<a>/to_out_0", "dense"),
        *module(rf"{block_t}\.ff\.net\.0\.proj", f"{block_f}/ff_net_0_proj", "dense"),
        *module(rf"{block_t}\.ff\.net\.2", f"{block_f}/ff_net_2", "dense"),
    ]


def unet_rules(use_linear_projection: bool) -> list[Rule]:
    """diffusers UNet2DConditionModel -> jax_inpaint_rl.models.sd15.unet."""
    blocks_t, blocks_f = r"(?P<blocks>down_blocks|up_blocks)\.(?P<b>\d+)", r"\g<blocks>_\g<b>"
    return [
        *module("conv_in", "conv_in", "conv"),
        *module(r"time_embedding\.linear_(?P<i>[12])", r"time_embedding_linear_\g<i>", "dense"),
        *resnet_rules(rf"{blocks_t}\.resnets\.(?P<r>\d+)", rf"{blocks_f}/resnets_\g<r>"),
        *resnet_rules(r"mid_block\.resnets\.(?P<r>\d+)", r"mid_block/resnets_\g<r>"),
        *transformer2d_rules(rf"{blocks_t}\.attentions\.(?P<at>\d+)", rf"{blocks_f}/attentions_\g<at>",
                             use_linear_projection),
        *transformer2d_rules(r"mid_block\.attentions\.(?P<at>\d+)", r"mid_block/attentions_\g<at>",
                             use_linear_projection),
        *module(rf"{blocks_t}\.(?P<s>downsamplers|upsamplers)\.0\.conv", rf"{blocks_f}/\g<s>_0/conv", "conv"),
        *module("conv_norm_out", "conv_norm_out", "norm"),
        *module("conv_out", "conv_out", "conv"),
    ]


def vae_rules() -> list[Rule]:
    """diffusers AutoencoderKL -> models.layers.vae (old attention names query/key/value/proj_attn too)."""
    part = r"(?P<part>encoder|decoder)"
    mid_attention_t, mid_attention_f = rf"{part}\.mid_block\.attentions\.0", r"\g<part>/mid_block/attentions_0"
    return [
        *module(rf"{part}\.(?P<c>conv_in|conv_out)", r"\g<part>/\g<c>", "conv"),
        *module(rf"{part}\.conv_norm_out", r"\g<part>/conv_norm_out", "norm"),
        *resnet_rules(rf"{part}\.(?P<blocks>down_blocks|up_blocks)\.(?P<b>\d+)\.resnets\.(?P<r>\d+)",
                      r"\g<part>/\g<blocks>_\g<b>/resnets_\g<r>"),
        *module(rf"{part}\.(?P<blocks>down_blocks|up_blocks)\.(?P<b>\d+)\.(?P<s>downsamplers|upsamplers)\.0\.conv",
                r"\g<part>/\g<blocks>_\g<b>/\g<s>_0/conv", "conv"),
        *resnet_rules(rf"{part}\.mid_block\.resnets\.(?P<r>\d+)", r"\g<part>/mid_block/resnets_\g<r>"),
        *module(rf"{mid_attention_t}\.group_norm", f"{mid_attention_f}/group_norm", "norm"),
        *module(rf"{mid_attention_t}\.(?:to_q|query)", f"{mid_attention_f}/to_q", "dense"),
        *module(rf"{mid_attention_t}\.(?:to_k|key)", f"{mid_attention_f}/to_k", "dense"),
        *module(rf"{mid_attention_t}\.(?:to_v|value)", f"{mid_attention_f}/to_v", "dense"),
        *module(rf"{mid_attention_t}\.(?:to_out\.0|proj_attn)", f"{mid_attention_f}/to_out_0", "dense"),
        *module(r"(?P<q>quant_conv|post_quant_conv)", r"\g<q>", "conv"),
    ]


def clip_text_rules() -> list[Rule]:
    """transformers CLIPTextModel -> jax_inpaint_rl.models.layers.clip_text.

    Checkpoints written by transformers < 5 prefix every key with `text_model.`; 5.x does not: both read.
    """
    layer_t, layer_f = rf"{CLIP_PREFIX}encoder\.layers\.(?P<l>\d+)", r"layers_\g<l>"
    return [
        *module(rf"{CLIP_PREFIX}embeddings\.(?P<e>token_embedding|position_embedding)", r"\g<e>", "embed"),
        *module(rf"{layer_t}\.(?P<n>layer_norm[12])", rf"{layer_f}/\g<n>", "norm"),
        *module(rf"{layer_t}\.self_attn\.(?P<p>[qkv]_proj|out_proj)", rf"{layer_f}/\g<p>", "dense"),
        *module(rf"{layer_t}\.mlp\.(?P<p>fc[12])", rf"{layer_f}/\g<p>", "dense"),
        *module(rf"{CLIP_PREFIX}final_layer_norm", "final_layer_norm", "norm"),
    ]


def is_ignored(torch_key: str) -> bool:
    return any(re.fullmatch(pattern, torch_key) for pattern in IGNORED_TORCH_KEYS)


def weight_files(folder: str) -> list[str]:
    """The weight files of a diffusers / transformers component folder (safetensors preferred, sharded or not)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: component folder not found")
    names = sorted(os.listdir(folder))
    for ext in (".safetensors", ".bin"):
        files = [os.path.join(folder, n) for n in names if n.endswith(ext) and "index" not in n]
        if files:
            return files
    raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weight files")


def read_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (torch key, fp32 numpy array) from safetensors / torch pickle files, one tensor at a time."""
    import torch
    from safetensors import safe_open

    for file in files:
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as reader:
                for key in reader.keys():
                    if not is_ignored(key):
                        yield key, reader.get_tensor(key).float().numpy()
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key in list(state):
                tensor = state.pop(key)
                if not is_ignored(key):
                    yield key, tensor.float().numpy()


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: component config not found")
    with open(path) as f:
        return json.load(f)
