"""CLIP-based rewards: CLIP score, and heads on CLIP image embeddings (aesthetic / preference scorers).

Weights come from `tools/convert_weights/clip.py` (a folder with config.json,
vision.safetensors, text.safetensors and tokenizer/, see there; real weights by
path). The towers run jitted on the default JAX device; images are preprocessed
on the host as CLIP does: bicubic resize of the short side to image_size,
centre crop, CLIP mean / std.

- clip_score: cosine between the image embedding and its target's:
  target="prompt" (the prompts), "target_text" (meta['target_text']) or
  "reference" (meta['reference'] image: how close the fill is to the reference;
  pair it with `region` to compare only the filled region).
- clip_head: a stack of dense layers on the L2-normalised image embedding, the
  shape of the LAION aesthetic predictors; head params are a safetensors file
  with layers_<i>/kernel (in, out) and layers_<i>/bias, applied without
  activations between them (as those predictors do).
score = scale * max(cosine, 0) for clip_score (scale 2.5 as in CLIPScore), sub-score 'cosine'.
"""
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jax_inpaint_rl.models.layers.clip_text import CLIPTextConfig, CLIPTextTransformer, load_tokenizer, tokenize
from jax_inpaint_rl.models.layers.clip_vision import ClipVision, ClipVisionConfig
from jax_inpaint_rl.models.params_io import load_params, read_json
from jax_inpaint_rl.rewards.base import Meta, Scores, check_images, check_prompts, meta_image, meta_texts

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, size, size, 3): short side to `size` (bicubic), centre crop, normalise."""
    out = []
    for image in images:
        height, width = image.shape[:2]
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC), np.float32)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out.append(resized[top : top + size, left : left + size])
    return (np.stack(out) / 255.0 - CLIP_MEAN) / CLIP_STD


def _normalized(embeds: jax.Array) -> np.ndarray:
    embeds = np.asarray(embeds, np.float32)
    return embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)


class ClipImageEncoder:
    """Images -> L2-normalised CLIP image embeddings (numpy, fp32)."""

    def __init__(self, config: ClipVisionConfig, params: Mapping[str, Any]):
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)
        model = ClipVision(config)
        self._embed = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Already preprocessed (B, S, S, 3) float pixels."""
        return _normalized(self._embed(self.params, pixels))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.embed_pixels(preprocess(images, self.config.image_size))


class ClipTextEncoder:
    """Texts -> L2-normalised CLIP text embeddings (numpy, fp32): pooled EOS state through the projection."""

    def __init__(self, config: CLIPTextConfig, params: Mapping[str, Any], tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.params = jax.tree.map(jnp.asarray, params)
        model = CLIPTextTransformer(config)
        self._embed = jax.jit(lambda p, ids: model.apply({"params": p["encoder"]}, ids)["pooled"] @ p["projection"]["kernel"])

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return tokenize(self.tokenizer, list(texts), max_length=self.config.max_position_embeddings)

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        return _normalized(self._embed(self.params, ids))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_ids(self.tokenize(texts))


def _clip_config(path: str) -> dict[str, Any]:
    return read_json(os.path.join(path, "config.json"))


@functools.lru_cache(maxsize=4)
def load_image_encoder(path: str) -> ClipImageEncoder:
    """The vision tower of a converted CLIP folder, cached so several rewards share one copy."""
    config = ClipVisionConfig.from_dict(_clip_config(path)["vision_config"])
    return ClipImageEncoder(config, load_params(os.path.join(path, "vision.safetensors")))


@functools.lru_cache(maxsize=4)
def load_text_encoder(path: str) -> ClipTextEncoder:
    """The text tower, projection and tokenizer of a converted CLIP folder, cached."""
    config = CLIPTextConfig.from_transformers(_clip_config(path)["text_config"], source=os.path.join(path, "config.json"))
    params = load_params(os.path.join(path, "text.safetensors"))
    return ClipTextEncoder(config, params, load_tokenizer(os.path.join(path, "tokenizer")))


def clip_similarity(image_embeds: np.ndarray, target_embeds: np.ndarray, scale: float) -> Scores:
    cosine = np.sum(image_embeds * target_embeds, axis=-1)
    return {"score": scale * np.maximum(cosine, 0.0), "cosine": cosine}


def make_clip_score(path: str, target: str = "prompt", scale: float = 2.5):
    """CLIP score of each image against its target (see module docstring)."""
    if target not in ("prompt", "target_text", "reference"):
        raise ValueError(f"clip_score: target must be 'prompt', 'target_text' or 'reference', got {target!r}")
    path = os.fspath(path)
    image_encoder = load_image_encoder(path)
    text_encoder = load_text_encoder(path) if target != "reference" else None

    def target_embeds(images: np.ndarray, prompts: list[str], meta: Meta) -> np.ndarray:
        if target == "reference":
            return image_encoder(meta_image(meta, "reference", images, "clip_score"))
        if target == "target_text":
            return text_encoder(meta_texts(meta, "target_text", len(images), "clip_score"))
        return text_encoder(prompts)

    def clip_score(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        prompts = check_prompts(prompts, len(images))
        return clip_similarity(image_encoder(images), target_embeds(images, prompts, meta), scale)

    return clip_score


def apply_head(head: Mapping[str, Mapping[str, np.ndarray]], embeds: np.ndarray) -> np.ndarray:
    """Dense layers layers_0, layers_1, ... in order, no activations; output (B,)."""
    x = embeds
    for index in range(len(head)):
        layer = head.get(f"layers_{index}")
        if layer is None:
            raise KeyError(f"clip_head: head params must be layers_0..layers_{len(head) - 1}; got {sorted(head)}")
        x = x @ layer["kernel"] + layer["bias"]
    if x.shape[-1] != 1:
        raise ValueError(f"clip_head: last layer must have 1 output, has {x.shape[-1]}")
    return x[:, 0]


def make_clip_head(path: str, head_path: str):
    """A scalar head (aesthetic / preference) on the CLIP image embedding."""
    encoder = load_image_encoder(os.fspath(path))
    head = {name: {k: np.asarray(v, np.float32) for k, v in layer.items()} for name, layer in load_params(head_path).items()}

    def clip_head(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        check_prompts(prompts, len(images))
        return {"score": apply_head(head, encoder(images))}

    return clip_head
