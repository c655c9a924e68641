"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration) in Flax Linen: vision tower + language model.

`QwenVL` embeds the token ids, puts the image features (the vision tower's output for `patches` / `grid_thw`, or
precomputed `image_features`) into the <|image_pad|> slots in order (row-major over the batch, as transformers'
masked_scatter does), and runs the language model: last hidden state after the final norm (what Qwen-Image-Edit
conditions on) and the updated KV cache; `logits` for a policy. Parameters: `language_model/...` (embed_tokens,
layers stacked, norm, lm_head when owned) and `visual/...` (vision.py).

Positions are host-side NumPy (`rope_index`), because they depend on where the images sit in each prompt: text
counts up by one on all three axes; an image of t x h x w merged tokens takes (start + frame, start + row,
start + column), and the text after it resumes at start + max(h, w). Padding is skipped (its ids stay 0). This is
transformers' get_rope_index for images; videos (and their time scaling) are not ported. Note transformers 5 uses
these positions only when the forward receives `mm_token_type_ids`; without them (diffusers 0.42's
QwenImageEditPipeline passes none) it numbers every slot 0 .. L-1 on all three axes.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.qwen_vl import language, vision
from jax_inpaint_rl.models.qwen_vl.language import QwenLM, TextConfig
from jax_inpaint_rl.models.qwen_vl.vision import VisionConfig, VisionTransformer

TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @property
    def spatial_merge_size(self) -> int:
        return self.vision.spatial_merge_size

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], source: str = "config") -> "QwenVLConfig":
        """From a Qwen2_5_VLConfig config.json dict: transformers >= 4.52 nest the text fields in `text_config`
        (older saves may repeat them at the top level: they must agree), older ones keep them flat; `vision_config`
        is nested in both. `tie_word_embeddings` counts at either level (transformers 5 reads both)."""
        nested = config.get("text_config")
        flat = {k: v for k, v in config.items() if k in language.CONFIG_KEYS}
        known = language.CONFIG_KEYS | set(TOKEN_KEYS) | {"text_config", "vision_config"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown Qwen2.5-VL config keys {unknown}; expected text_config, "
                             f"vision_config, {list(TOKEN_KEYS)} or the text config keys "
                             f"{sorted(language.CONFIG_KEYS)} (older configs keep them flat)")
        if "vision_config" not in config:
            raise ValueError(f"{source}: no vision_config; expected a Qwen2_5_VLForConditionalGeneration config.json")
        text = dict(nested) if nested is not None else flat
        fields = {f.name for f in dataclasses.fields(TextConfig)} - {"tie_word_embeddings"}
        disagree = sorted(k for k in flat.keys() & text.keys() & fields if flat[k] != text[k])
        if disagree:
            raise ValueError(f"{source}: top-level {disagree} differ from text_config's "
                             f"({[(flat[k], text[k]) for k in disagree]}); transformers reads text_config")
        text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        return cls(TextConfig.from_transformers(text, f"{source}: text_config"),
                   VisionConfig.from_transformers(config["vision_config"], f"{source}: vision_config"),
                   **{k: int(config[k]) for k in TOKEN_KEYS if k in config})


def rope_index(config: QwenVLConfig, input_ids, attention_mask=None, image_grid_thw=None):
    """Multimodal RoPE positions (3, B, L) int32 and per-row deltas (B, 1) int32 (a row's next token after its last
    one sits at its token count + delta: `decode_positions`). `image_grid_thw` (n, 3): the patch grids of the
    batch's images in order (row by row); each maximal run of <|image_pad|> tokens is one image and must hold its
    grid's t h w / spatial_merge_size^2 tokens. Host-side NumPy; every mismatch is named."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"rope_index: input_ids {ids.shape} and attention_mask {mask.shape}: expected the same "
                         "(batch, length)")
    if np.any(ids[mask] == config.video_token_id):
        raise ValueError(f"rope_index: the prompts hold video tokens (id {config.video_token_id}); videos are not "
                         "supported (only images)")
    positions, deltas = np.zeros((3, *ids.shape), np.int32), np.zeros((ids.shape[0], 1), np.int32)
    used = 0
    for row in range(ids.shape[0]):
        kept = np.flatnonzero(mask[row])
        pieces, used = _row_positions(config, ids[row, kept], grids, used, row)
        if pieces:
            row_positions = np.concatenate(pieces, axis=1)
            positions[:, row, kept] = row_positions
            deltas[row] = row_positions.max() + 1 - len(kept)
    if used != len(grids):
        raise ValueError(f"rope_index: image_grid_thw has {len(grids)} grids but the prompts hold {used} images")
    return positions, deltas


def _row_positions(config: QwenVLConfig, ids: np.ndarray, grids: np.ndarray, used: int, row: int):
    """One row's unpadded tokens -> list of (3, run) position blocks (text runs and image runs) and the grids used."""
    is_image = ids == config.image_token_id
    pieces, start = [], 0
    for run in np.split(np.arange(len(ids)), np.flatnonzero(np.diff(is_image)) + 1):
        if not len(run):
            continue
        if not is_image[run[0]]:
            pieces.append(np.broadcast_to(start + np.arange(len(run)), (3, len(run))))
            start += len(run)
            continue
        if used == len(grids):
            raise ValueError(f"rope_index: row {row} holds more images than image_grid_thw's {len(grids)} grids")
        frames, height, width = (int(n) for n in grids[used])
        height, width = height // config.spatial_merge_size, width // config.spatial_merge_size
        if frames * height * width != len(run):
            raise ValueError(f"rope_index: row {row}, image {used}: {len(run)} <|image_pad|> tokens but grid "
                             f"{tuple(int(n) for n in grids[used])} merges to {frames * height * width} (adjacent "
                             "images need a token between them)")
        grid = np.stack(np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij"))
        pieces.append(start + grid.reshape(3, -1))
        start, used = start + max(height, width), used + 1
    return pieces, used


def decode_positions(lengths, rope_deltas):
    """(3, B, 1) positions of each row's next token: `lengths` (B,) tokens the row holds so far (its unpadded
    prompt plus generated tokens), `rope_deltas` (B, 1) from `rope_index`. Works on NumPy and traced arrays."""
    return jnp.broadcast_to((jnp.asarray(lengths)[:, None] + rope_deltas)[None], (3, len(rope_deltas), 1))


def scatter_image_features(embeds, is_image, features):
    """Put features (n, D) into the n slots where `is_image` (B, L) is set, in row-major order."""
    flat = is_image.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    placed = jnp.where(flat[:, None], features.astype(embeds.dtype)[index], embeds.reshape(flat.shape[0], -1))
    return placed.reshape(embeds.shape)


class QwenVL(nn.Module):
    """`__call__(input_ids, positions, attention_mask, patches=None, grid_thw=None, image_features=None,
    cache=None, cache_index=None)` -> (last hidden state after the final norm (B, L, D), updated cache or None);
    `logits(hidden)` (fp32). Images come as processor patches with their static `grid_thw` (run through the
    vision tower) or as `image_features` (n, D) already computed; their count must match the <|image_pad|>
    tokens (rope_index checks it on the host)."""
    config: QwenVLConfig
    dtype: Any = jnp.float32  # compute dtype; parameters keep their own dtype
    with_lm_head: bool = False  # own the lm_head (untied checkpoints; the text encoder does not need it)
    remat: bool = False  # rematerialise each layer / block in the backward pass

    def setup(self):
        c = self.config
        self.language_model = QwenLM(c.text, self.dtype, self.with_lm_head, self.remat)
        self.visual = VisionTransformer(c.vision, self.dtype, self.remat)

    def __call__(self, input_ids, positions, attention_mask, patches=None, grid_thw=None, image_features=None,
                 cache=None, cache_index=None):
        if patches is not None and image_features is not None:
            raise ValueError("QwenVL: pass patches (with grid_thw) or image_features, not both")
        if (patches is None) != (grid_thw is None):
            raise ValueError("QwenVL: patches and grid_thw go together")
        embeds = self.language_model.embed(input_ids)
        if patches is not None:
            image_features = self.visual(patches, grid_thw)
        if image_features is not None:
            if image_features.ndim != 2 or image_features.shape[1] != self.config.text.hidden_size:
                raise ValueError(f"QwenVL: image_features {image_features.shape}: expected (n, "
                                 f"{self.config.text.hidden_size})")
            embeds = scatter_image_features(embeds, input_ids == self.config.image_token_id, image_features)
        return self.language_model(embeds, positions, attention_mask, cache, cache_index)

    def logits(self, hidden):
        return self.language_model.logits(hidden)


def _every_parameter(module: QwenVL, ids, positions, attention_mask, patches, grid_thw):
    """Touches every submodule (vision tower, embedding, layers, norm, lm_head) so `init` creates them all."""
    hidden, _ = module(ids, positions, attention_mask, patches, grid_thw)
    c = module.config.text
    return module.logits(hidden) if module.with_lm_head or c.tie_word_embeddings else hidden


def init_params(config: QwenVLConfig, key, lm_head: bool = False):
    """Random parameters (Flax default initialisers), fp32."""
    patches, grid_thw = vision.example_inputs(config.vision)
    inputs = language.example_inputs(config.text)
    return QwenVL(config, with_lm_head=lm_head).init(key, inputs["ids"], inputs["positions"],
                                                     inputs["attention_mask"], patches, grid_thw,
                                                     method=_every_parameter)["params"]


def param_shapes(config: QwenVLConfig, lm_head: bool = False):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating (works for the 8B model)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), lm_head))
