"""A diffusers Qwen-Image / Qwen-Image-Edit pipeline folder -> a folder of Flax params the Qwen-Image families
read (the command line is qwen_image_cli.py).

Output, as the Flux and SD3 converters write it:
  params/transformer.safetensors    keys 'transformer/<flax path>'; the blocks stacked on a leading axis
                                    (transformer/transformer_blocks/attn/to_q/kernel: (num_layers, in, out))
  params/vae.safetensors            (qwen_image_vae.py)
  params/text_encoder.safetensors   Qwen2.5-VL, its lm_head only with lm_head=True (qwen_vl.py)
  <component>/config.json           the sources' configs
  tokenizer/, processor/ (edit folders), scheduler/   copied
  qwen_image.json                   {"family": "qwen_image", "dtype", "source"}
Streams one tensor at a time (flux.write_params, streaming.py); every unknown, missing or mis-shaped key is
named, by its diffusers key and its per-block Flax path.
"""
import os
import shutil

from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.qwen_image.transformer import QwenImageConfig, param_shapes
from tools.convert_weights import flux, qwen_image_vae, qwen_vl
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


FAMILY = "qwen_image"  # models/qwen_image/family.py MARKER: one folder serves every Qwen-Image variant
COPIED = ("tokenizer", "scheduler")
PROCESSOR = "processor"  # the edit pipelines' Qwen2VLProcessor folder (the image processor's config)


# pipeline subfolder -> (convert(src, dst, dtype) -> Component, verify(component, dst) -> tensors checked)
CONVERTERS = {NAME: (convert_transformer, verify_transformer),
              qwen_image_vae.NAME: (qwen_image_vae.convert_vae, qwen_image_vae.verify_vae),
              qwen_vl.NAME: (qwen_vl.convert_text_encoder, qwen_vl.verify_text_encoder)}


def convert_pipeline(src: str, dst: str, dtype: str = "float32", check_tensors: bool = False,
                     lm_head: bool = False) -> dict[str, Component]:
    """A diffusers Qwen-Image pipeline folder -> the output folder described in the module docstring;
    `check_tensors`: after writing each component, re-read its source and compare; `lm_head`: the text encoder's
    lm_head too (the VLM policy's logits). Returns the components."""
    missing = [f"{folder}/" for folder in (*CONVERTERS, *COPIED) if not os.path.isdir(os.path.join(src, folder))]
    if missing:
        raise FileNotFoundError(f"{src}: not a diffusers Qwen-Image pipeline folder: missing {', '.join(missing)}")
    components = {}
    for name, (convert, verify) in CONVERTERS.items():
        extra = {"lm_head": lm_head} if name == qwen_vl.NAME else {}
        components[name] = convert(os.path.join(src, name), dst, dtype, **extra)
        if check_tensors:
            print(f"verified {name}: {verify(components[name], dst)} tensors equal their source")
    for folder in COPIED + ((PROCESSOR,) if os.path.isdir(os.path.join(src, PROCESSOR)) else ()):
        shutil.copytree(os.path.join(src, folder), os.path.join(dst, folder), dirs_exist_ok=True)
    flux.write_json(os.path.join(dst, f"{FAMILY}.json"), {"family": FAMILY, "dtype": dtype,
                                                          "source": os.path.abspath(src)})
    return components


def diffusers_shapes(config) -> dict[str, tuple[int, ...]]:
    from diffusers import QwenImageTransformer2DModel

    return flux.meta_shapes(QwenImageTransformer2DModel, config)


def write_diffusers_transformer(config, leaves, read, dst: str, dtype: str | None, source: str) -> None:
    """Flax Qwen-Image transformer params -> a diffusers transformer folder (flux.write_stacked_transformer)."""
    expected = flux.shapes_of(param_shapes(QwenImageConfig.from_diffusers(config, source)))
    flux.write_stacked_transformer(diffusers_shapes(config), TRANSFORMER_RULES, STACKS, expected, config, leaves,
                                   read, dst, dtype, source)
