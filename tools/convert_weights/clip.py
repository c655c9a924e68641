"""transformers CLIPModel (or CLIPVisionModelWithProjection) -> Flax params for the CLIP score reward.

    python -m tools.convert_weights.clip --model openai/clip-vit-large-patch14 --out /path/clip [--verify]

Output folder (read by `jax_inpaint_rl.rewards.clip_score`):
  config.json          the CLIPConfig dict (vision_config, text_config)
  vision.safetensors   models/clip_vision.ClipVision params (embeddings, layers_i, projection)
  text.safetensors     {"encoder": models/clip_text params, "projection": {"kernel"}}
  tokenizer/           the source's tokenizer files
`--verify` runs the converted towers and transformers' CLIPModel on the same random
pixels and prompts and prints the largest image-text cosine difference.
"""
import argparse
import json
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.layers.clip_text import CLIPTextConfig, CLIPTextTransformer, init_params
from jax_inpaint_rl.models.layers.clip_vision import ClipVision, ClipVisionConfig
from jax_inpaint_rl.models.params_io import flatten, save_params, unflatten
from tools.convert_weights import common
from tools.convert_weights.common import Rule, conv_to_flax, identity, linear_to_flax
from tools.convert_weights.components import clip_text_rules, is_ignored

_LAYER = r"vision_model\.encoder\.layers\.(\d+)"


def _norm(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/scale"), Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias")]


def _linear(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [
        Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/kernel", linear_to_flax),
        Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias", identity),
    ]


VISION_RULES: list[Rule] = [
    Rule(r"vision_model\.embeddings\.class_embedding", "embeddings/class_embedding"),
    Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "embeddings/patch_embedding/kernel", conv_to_flax),
    Rule(r"vision_model\.embeddings\.position_embedding\.weight", "embeddings/position_embedding"),
    *_norm(r"vision_model\.pre_layrnorm", "pre_layernorm"),  # sic: transformers' spelling
    *_linear(rf"{_LAYER}\.self_attn\.(q|k|v|out)_proj", r"layers_\1/self_attn/\2_proj"),
    *_linear(rf"{_LAYER}\.mlp\.(fc1|fc2)", r"layers_\1/mlp/\2"),
    *_norm(rf"{_LAYER}\.(layer_norm1|layer_norm2)", r"layers_\1/\2"),
    *_norm(r"vision_model\.post_layernorm", "post_layernorm"),
    Rule(r"visual_projection\.weight", "visual_projection/kernel", linear_to_flax),
]
VISION_PREFIXES = ("vision_model.", "visual_projection.")

# the text tower's table is shared with SD1.5 / Flux (components.py), nested under "encoder"
TEXT_RULES: list[Rule] = [
    *(Rule(rule.torch_pattern, f"encoder/{rule.flax_template}", rule.transform) for rule in clip_text_rules()),
    Rule(r"text_projection\.weight", "projection/kernel", linear_to_flax),
]
TEXT_PREFIXES = ("text_model.", "text_projection.")


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


def vision_shapes(vision_config: Mapping) -> dict[str, tuple[int, ...]]:
    """Flat Flax path -> shape for a ClipVision built from `vision_config`, without allocating params."""
    config = ClipVisionConfig.from_dict(vision_config)
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    return _shapes(jax.eval_shape(ClipVision(config).init, jax.random.key(0), pixels)["params"])


def text_shapes(text_config: Mapping, projection_dim: int) -> dict[str, tuple[int, ...]]:
    config = CLIPTextConfig.from_transformers(text_config)
    encoder = jax.eval_shape(lambda: init_params(CLIPTextTransformer(config), jax.random.key(0)))
    return {**_shapes({"encoder": encoder}), "projection/kernel": (config.hidden_size, projection_dim)}


def _tower(state_dict: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The tensors of one tower: keys under `prefixes` (the other tower's keys belong to its own table)."""
    return {k: np.asarray(v, np.float32) for k, v in state_dict.items() if k.startswith(prefixes) and not is_ignored(k)}


def convert_vision(state_dict: Mapping[str, np.ndarray], vision_config: Mapping, source: str = "state dict") -> dict:
    """CLIPModel / CLIPVisionModelWithProjection state dict -> ClipVision params; unknown or missing keys raise."""
    tensors = _tower(state_dict, VISION_PREFIXES)
    return unflatten(dict(common.convert(source, tensors, VISION_RULES, vision_shapes(vision_config))))


def convert_text(state_dict: Mapping[str, np.ndarray], config: Mapping, source: str = "state dict") -> dict:
    """CLIPModel state dict + CLIPConfig dict -> {"encoder": clip_text params, "projection": {"kernel"}}."""
    shapes = text_shapes(config["text_config"], config["projection_dim"])
    return unflatten(dict(common.convert(source, _tower(state_dict, TEXT_PREFIXES), TEXT_RULES, shapes)))


def write_folder(out: str, state_dict: Mapping[str, np.ndarray], config: Mapping, tokenizer, source: str) -> None:
    """The output folder described in the module docstring."""
    os.makedirs(out, exist_ok=True)
    save_params(os.path.join(out, "vision.safetensors"), convert_vision(state_dict, config["vision_config"], source), {"source": source})
    save_params(os.path.join(out, "text.safetensors"), convert_text(state_dict, config, source), {"source": source})
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, default=str)


def verify(model, folder: str, prompts=("a photo of a cat", "a red sign that says open"), seed: int = 0) -> float:
    """Max |cosine(flax) - cosine(torch)| over random images x `prompts`, from the written folder."""
    import torch

    from jax_inpaint_rl.rewards.clip_score import load_image_encoder, load_text_encoder

    images, texts = load_image_encoder(folder), load_text_encoder(folder)
    size = images.config.image_size
    pixels = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
    ids = texts.tokenize(list(prompts))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch.from_numpy(pixels))
        expected = (out.logits_per_image / model.logit_scale.exp()).numpy()
    got = images.embed_pixels(pixels.transpose(0, 2, 3, 1)) @ texts.embed_ids(ids).T
    return float(np.abs(got - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="transformers CLIPModel folder or hub name")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--verify", action="store_true", help="compare with transformers after converting")
    args = parser.parse_args()

    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(args.model).eval()
    state_dict = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    write_folder(args.out, state_dict, model.config.to_dict(), CLIPTokenizer.from_pretrained(args.model), args.model)
    print(f"wrote {args.out}")
    if args.verify:
        error = verify(model, args.out)
        print(f"image-text cosine: max |flax - torch| = {error:.2e}")
        if error > 1e-4:
            raise SystemExit(f"verification failed: cosine error {error:.2e} > 1e-4")


if __name__ == "__main__":
    main()
