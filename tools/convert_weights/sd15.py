"""Stable Diffusion 1.5 (inpainting) checkpoints -> a folder `jax_inpaint_rl.models.sd15.family.load` reads.

    python -m tools.convert_weights sd15-inpaint --src SRC --dst DST [--dtype float32|bfloat16] [--verify]
        [--tokenizer DIR]

SRC is a diffusers folder (unet/, vae/, text_encoder/, tokenizer/ with config.json and weights), or one
original (CompVis) .safetensors / .ckpt file; a single file is split with diffusers' LDM key conversion
using the SD1.5 configs below (in_channels read from the checkpoint) and needs `--tokenizer DIR`.

Output folder:
  params/unet.safetensors          Flax params, keys 'unet/<flax path>' (e.g. unet/down_blocks_0/resnets_0/conv1/kernel)
  params/vae.safetensors           keys 'vae/...'
  params/text_encoder.safetensors  keys 'text_encoder/...'
  unet/config.json, vae/config.json, text_encoder/config.json   the source configs
  tokenizer/                       CLIP tokenizer files
  scheduler/, model_index.json     copied when the source has them (used by export-sd15)
  sd15_inpaint.json                {"family", "dtype", "source"}
`--verify` runs the torch components and the converted Flax ones on the same random inputs, prints
max |diff| and max |diff| / max |torch| per output, and fails (exit status 1, `VerificationError` naming
each output) when a relative error exceeds --tolerance (default 1e-4, float32), as the Flux check does.
"""
import json
import os
import shutil
import time

import ml_dtypes
import numpy as np

from jax_inpaint_rl.models import params_io
from tools.convert_weights import common
from tools.convert_weights.components import (clip_text_rules, is_ignored, read_config, read_tensors, unet_rules,
                                              vae_rules, weight_files)

COMPONENTS = ("unet", "vae", "text_encoder")
OUTPUT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
VERIFY_TOLERANCE = 1e-4  # max |flax - torch| / max |torch| of any output in --verify (float32)


class VerificationError(common.ConversionError):
    """Converted outputs differ from the torch reference's beyond the tolerance."""


# runwayml/stable-diffusion-inpainting's component configs (for single-file sources).
SD15_UNET = dict(
    in_channels=9, out_channels=4, sample_size=64, act_fn="silu", attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(
    model_type="clip_text_model", vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def rules_for(component: str, config: dict) -> list[common.Rule]:
    if component == "unet":
        return unet_rules(bool(config.get("use_linear_projection", False)))
    return vae_rules() if component == "vae" else clip_text_rules()


def expected_shapes(configs: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> {flax path: shape}, from the configs, without allocating."""
    from jax_inpaint_rl.models.sd15.family import build_modules

    shapes = build_modules(configs["unet"], configs["vae"], configs["text_encoder"]).param_shapes()
    return {c: {path: tuple(leaf.shape) for path, leaf in params_io.flatten(shapes[c]).items()} for c in COMPONENTS}


def convert_component(source: str, tensors, config: dict, component: str, shapes: dict, dtype) -> dict:
    """Stream (torch key, array) through the component's table into a nested Flax tree of `dtype`."""
    flat = {path: array.astype(dtype) for path, array in
            common.convert(source, tensors, rules_for(component, config), shapes)}
    return params_io.unflatten(flat)


# --- sources -----------------------------------------------------------------------------------------

def folder_source(src: str):
    """diffusers folder -> (configs, {component: (source name, tensor stream)})."""
    configs = {c: read_config(os.path.join(src, c)) for c in COMPONENTS}
    streams = {}
    for c in COMPONENTS:
        files = weight_files(os.path.join(src, c))
        streams[c] = (", ".join(files), read_tensors(files))
    return configs, streams


def single_file_state_dicts(src: str) -> tuple[dict, dict]:
    """Original-layout file -> (configs, {component: diffusers-named torch state dict}) via diffusers' LDM tables."""
    import torch
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from safetensors.torch import load_file

    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: checkpoint not found")
    checkpoint = load_file(src) if src.endswith(".safetensors") else torch.load(src, map_location="cpu",
                                                                                 weights_only=False)
    checkpoint = checkpoint.get("state_dict", checkpoint)
    first_conv = "model.diffusion_model.input_blocks.0.0.weight"
    if first_conv not in checkpoint:
        raise common.ConversionError(f"{src}: {first_conv!r} not found; expected an original SD1.x checkpoint")
    configs = {"unet": {**SD15_UNET, "in_channels": int(checkpoint[first_conv].shape[1])}, "vae": dict(SD15_VAE),
               "text_encoder": dict(SD15_TEXT)}
    state = {"unet": convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
             "vae": convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),
             "text_encoder": convert_ldm_clip_checkpoint(checkpoint)}
    return configs, state


def file_source(src: str):
    configs, state = single_file_state_dicts(src)
    streams = {c: (f"{src} ({c})", ((k, v.float().numpy()) for k, v in state[c].items())) for c in COMPONENTS}
    return configs, streams


# --- writing -----------------------------------------------------------------------------------------

def convert_to_folder(src: str, dst: str, dtype: str = "float32", tokenizer: str | None = None) -> dict:
    """Convert `src` into the folder layout of the module docstring; returns the configs."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}")
    is_folder = os.path.isdir(src)
    tokenizer = tokenizer or (os.path.join(src, "tokenizer") if is_folder else None)
    if tokenizer is None or not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"{tokenizer or src}: no tokenizer folder; pass --tokenizer DIR (a CLIP tokenizer "
                                "folder, e.g. the source pipeline's tokenizer/)")
    configs, streams = folder_source(src) if is_folder else file_source(src)
    shapes = expected_shapes(configs)
    os.makedirs(os.path.join(dst, "params"), exist_ok=True)
    for c in COMPONENTS:
        source, tensors = streams[c]
        tree = convert_component(source, tensors, configs[c], c, shapes[c], OUTPUT_DTYPES[dtype])
        params_io.save_params(os.path.join(dst, "params", f"{c}.safetensors"), {c: tree}, {"source": source})
        os.makedirs(os.path.join(dst, c), exist_ok=True)
        with open(os.path.join(dst, c, "config.json"), "w") as f:
            json.dump(configs[c], f, indent=2)
        del tree
    shutil.copytree(tokenizer, os.path.join(dst, "tokenizer"), dirs_exist_ok=True)
    if is_folder:
        for extra in ("scheduler", "model_index.json"):
            path = os.path.join(src, extra)
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(dst, extra), dirs_exist_ok=True)
            elif os.path.exists(path):
                shutil.copy(path, os.path.join(dst, extra))
    with open(os.path.join(dst, "sd15_inpaint.json"), "w") as f:
        json.dump({"family": "sd15_inpaint", "dtype": dtype, "source": os.path.abspath(src)}, f, indent=2)
    return configs


# --- verification ------------------------------------------------------------------------------------

def torch_components(src: str) -> dict:
    """The source as diffusers / transformers torch modules (fp32, eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if os.path.isdir(src):
        return {"unet": UNet2DConditionModel.from_pretrained(os.path.join(src, "unet")).float().eval(),
                "vae": AutoencoderKL.from_pretrained(os.path.join(src, "vae")).float().eval(),
                "text_encoder": CLIPTextModel.from_pretrained(os.path.join(src, "text_encoder")).float().eval()}
    configs, state = single_file_state_dicts(src)
    models = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
              "vae": AutoencoderKL.from_config(configs["vae"]),
              "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    for c, model in models.items():
        names = set(model.state_dict())
        tensors = {k: v for k, v in state[c].items() if not is_ignored(k)}
        model.load_state_dict({k if k in names else k.removeprefix("text_model."): v for k, v in tensors.items()})
    return {c: m.float().eval() for c, m in models.items()}


def errors(got, ref) -> tuple[float, float]:
    """(max |got - ref|, that divided by max |ref|)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    diff = float(np.abs(got - ref).max())
    return diff, diff / max(float(np.abs(ref).max()), 1e-12)


def compare(torch_models: dict, dst: str, seed: int = 0, latent_size: int = 16, text_length: int | None = None) -> dict:
    """Run torch and the converted Flax components on the same random inputs: name -> (max abs, relative)."""
    import jax
    import jax.numpy as jnp
    import torch

    from jax_inpaint_rl.models.layers import vae as vae_lib
    from jax_inpaint_rl.models.sd15.family import load, modules_from_folder

    modules = modules_from_folder(dst)
    _, params = load(dst)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    rng = np.random.default_rng(seed)
    u, v, t = modules.unet.config, modules.vae.config, modules.text_encoder.config
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    nhwc = lambda a: a.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    length = text_length or t.max_position_embeddings
    ids = rng.integers(0, t.vocab_size, (2, length))
    ids[:, -1] = t.vocab_size - 1 if t.eos_token_id == 2 else t.eos_token_id
    sample = rng.standard_normal((2, latent_size, latent_size, u.in_channels)).astype(np.float32)
    steps = np.array([999.0, 1.0], np.float32)
    context = rng.standard_normal((2, 7, u.cross_attention_dim)).astype(np.float32)
    side = latent_size * v.downscale // 2
    image = rng.uniform(-1, 1, (1, side, side, 3)).astype(np.float32)
    with torch.no_grad():
        text_ref = torch_models["text_encoder"](torch.from_numpy(ids))
        unet_ref = nhwc(torch_models["unet"](nchw(sample), torch.from_numpy(steps), torch.from_numpy(context)).sample)
        posterior = torch_models["vae"].encode(nchw(image)).latent_dist
        decoded_ref = nhwc(torch_models["vae"].decode(posterior.mean).sample)
    text = modules.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids))
    mean, _ = modules.vae.apply({"params": params["vae"]}, image, method=vae_lib.AutoencoderKL.encode)
    decoded = modules.vae.apply({"params": params["vae"]}, nhwc(posterior.mean), method=vae_lib.AutoencoderKL.decode)
    return {
        "text_encoder hidden": errors(text["last_hidden_state"], text_ref.last_hidden_state.numpy()),
        "text_encoder pooled": errors(text["pooled"], text_ref.pooler_output.numpy()),
        "unet epsilon": errors(modules.unet.apply({"params": params["unet"]}, sample, steps, context), unet_ref),
        "vae encode mean": errors(mean, nhwc(posterior.mean)),
        "vae decode": errors(decoded, decoded_ref),
    }


# --- command line ------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--src", required=True, help="diffusers folder, or an original .safetensors / .ckpt file")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(OUTPUT_DTYPES), help="stored parameter dtype")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: SRC/tokenizer)")
    parser.add_argument("--verify", action="store_true", help="compare torch and Flax outputs after converting "
                        "and fail above --tolerance")
    parser.add_argument("--tolerance", type=float, default=VERIFY_TOLERANCE, help="--verify fails when max |diff| "
                        "/ max |torch output| of any output exceeds this (float32 compute)")


def run(args) -> None:
    start = time.perf_counter()
    convert_to_folder(args.src, args.dst, args.dtype, args.tokenizer)
    print(f"wrote {args.dst} in {time.perf_counter() - start:.1f}s")
    if args.verify:
        verify(args.src, args.dst, args.tolerance)


def verify(src: str, dst: str, tolerance: float = VERIFY_TOLERANCE) -> dict:
    """Print the comparison of `compare`; raise VerificationError naming every output above `tolerance`."""
    results = compare(torch_components(src), dst)
    for name, (abs_err, rel_err) in results.items():
        print(f"{name:22s} max|diff| {abs_err:.3e}   relative {rel_err:.3e}")
    failed = {name: rel for name, (_, rel) in results.items() if not rel <= tolerance}  # NaN fails too
    if failed:
        raise VerificationError(f"{dst}: verification against {src} failed (relative error above {tolerance:.0e}): "
                                + ", ".join(f"{name} ({rel:.2e})" for name, rel in failed.items()))
    return results
