"""A converted SD1.5 folder (Flax params) -> a diffusers folder, loadable with diffusers' from_pretrained.

    python -m tools.convert_weights export-sd15 --src CONVERTED --dst DIFFUSERS_DIR

Writes unet/, vae/ (diffusion_pytorch_model.safetensors + config.json), text_encoder/ (model.safetensors +
config.json), tokenizer/, and scheduler/ + model_index.json when the converted folder kept them. The torch
key set comes from the diffusers / transformers models built on the meta device from the configs, so
every key the torch model has must be produced (and fp32 round trips are exact).
"""
import json
import os
import shutil

from safetensors.numpy import save_file

from jax_inpaint_rl.models import params_io
from tools.convert_weights import common
from tools.convert_weights.sd15 import COMPONENTS, rules_for

WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}


def torch_keys(component: str, config: dict) -> list[str]:
    """State-dict keys of the torch model the config describes (built on the meta device: nothing allocated)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            model = AutoencoderKL.from_config(config)
        else:
            model = CLIPTextModel(CLIPTextConfig(**config))
    return list(model.state_dict())


def export_folder(src: str, dst: str) -> None:
    params = params_io.load_params(os.path.join(src, "params"))
    for c in COMPONENTS:
        if c not in params:
            raise common.ConversionError(f"{src}/params: no '{c}/...' parameters")
        config = params_io.read_json(os.path.join(src, c, "config.json"))
        state = common.export(params_io.flatten(params[c]), rules_for(c, config), torch_keys(c, config))
        os.makedirs(os.path.join(dst, c), exist_ok=True)
        save_file(state, os.path.join(dst, c, WEIGHT_FILES[c]), metadata={"format": "pt"})
        with open(os.path.join(dst, c, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    for extra in ("tokenizer", "scheduler", "model_index.json"):
        path = os.path.join(src, extra)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst, extra), dirs_exist_ok=True)
        elif os.path.exists(path):
            shutil.copy(path, os.path.join(dst, extra))


def add_arguments(parser) -> None:
    parser.add_argument("--src", required=True, help="folder written by `sd15-inpaint`")
    parser.add_argument("--dst", required=True, help="output diffusers folder")


def run(args) -> None:
    export_folder(args.src, args.dst)
    print(f"wrote {args.dst}")
