"""Qwen2.5-VL's vision tower (transformers' Qwen2_5_VisionTransformerPretrainedModel) in Flax Linen.

Input: the image processor's patches (N, in_channels * temporal_patch_size * patch_size^2) (processor.py),
each row one (C, T, p, p) patch flattened, rows in merge-window order (each spatial_merge_size^2 group of
neighbouring patches consecutive), images and frames one after another; and `grid_thw`, a STATIC tuple of
(frames, rows, columns) patch grids, one per image, in sequence order. Output: (N / spatial_merge_size^2,
out_hidden_size) merged tokens in the input's order, in the compute dtype: what the language model splices
in at its image tokens.

Structure (transformers' names, so the converter's key table reads one-to-one):
- patch_embed: the Conv3d with kernel = stride = (T, p, p) is a linear map of each flattened patch, a Dense
  without bias here;
- the sequence is reordered window by window: windows of `window_size / patch_size` patches a side (a
  window of merge groups; at the bottom and right edges a window holds what is left), frames in order;
- `depth` pre-RMSNorm blocks (attention with a packed qkv and a 2-D RoPE over (row, column), SwiGLU MLP
  with biases), one `nn.scan` over parameters stacked on a leading axis (`blocks/...`). A block attends
  within its window, or, for the blocks in `fullatt_block_indexes`, within its whole frame: both are
  block-diagonal masks built from per-token segment ids, and each layer's choice is a scanned boolean, so
  a forward pass compiles one block whatever the depth and however the full-attention blocks are placed;
- merger: RMSNorm, then each merge group's tokens concatenated and mapped by Linear-GELU-Linear; the merged
  tokens return to the input's order.

Everything that depends on the grids (window order, segment ids, RoPE positions) is NumPy at trace time,
so a new set of grids is a new compile. The masks are dense (N, N): window blocks spend as much attention
compute as full ones, which is fine at the few thousand patches of Qwen-Image-Edit's reference images.
RMSNorms, RoPE and softmax run in fp32.
"""
import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.flux.transformer import RMSNorm, apply_rope, rope_tables
from jax_inpaint_rl.models.layers import clip_text, siglip
from jax_inpaint_rl.models.layers.attention import attend

ACTIVATIONS = {**siglip.ACTIVATIONS, **clip_text.ACTIVATIONS, "silu": jax.nn.silu}
# Keys of a saved vision config that change nothing in the tower: metadata, the initialiser's scale, and
# tokens_per_second (the language model's video positions, read there).
IGNORED_KEYS = ("architectures", "dtype", "torch_dtype", "initializer_range", "model_type", "tokens_per_second",
                "transformers_version", "_name_or_path")
# Duplicates older configs carry; transformers reads only the field they name, so they must agree with it.
DUPLICATES = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """transformers' Qwen2_5_VLVisionConfig fields, with its defaults (a config.json may omit any)."""
    depth: int = 32
    hidden_size: int = 3584  # transformers' default; the released 7B tower is 1280 wide (QWEN2_5_VL_7B)
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels a window side spans
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    rope_theta: float = 10000.0  # rope_parameters['rope_theta']

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (C, T, p, p) patch: a row of the processor's output."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_merges(self) -> int:
        """Merge groups a window side spans."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], source: str = "config") -> "VisionConfig":
        """From a Qwen2_5_VLVisionConfig dict, or a Qwen2_5_VLConfig one (its 'vision_config')."""
        if "vision_config" in config:
            config = config["vision_config"] or {}
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta"}
        known = fields | set(IGNORED_KEYS) | set(DUPLICATES) | {"rope_parameters", "rope_theta"}
        unknown = sorted(k for k in config if k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown Qwen2.5-VL vision config keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        values = {k: v for k, v in config.items() if k in fields}
        if "fullatt_block_indexes" in values:
            values["fullatt_block_indexes"] = tuple(values["fullatt_block_indexes"])
        rope = dict(config.get("rope_parameters") or {})
        problems = []
        if set(rope) - {"rope_theta", "rope_type"} or rope.get("rope_type", "axial") != "axial":
            problems.append(f"rope_parameters={rope}: expected {{'rope_theta': float, 'rope_type': 'axial'}}")
        # transformers: rope_parameters['rope_theta'] wins over a top-level rope_theta
        values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", cls.rope_theta)))
        made = cls(**values)
        problems += [f"{alias}={config[alias]} differs from {name}={getattr(made, name)} (transformers reads "
                     f"only {name})" for alias, name in DUPLICATES.items()
                     if alias in config and config[alias] != getattr(made, name)]
        problems += _problems(made)
        if problems:
            raise ValueError(f"{source}: Qwen2.5-VL vision config not supported: " + "; ".join(problems))
        return made


def _problems(c: VisionConfig) -> list[str]:
    problems = []
    if not all(isinstance(v, int) for v in (c.patch_size, c.temporal_patch_size, c.spatial_merge_size)):
        problems.append(f"patch_size={c.patch_size}, temporal_patch_size={c.temporal_patch_size}, "
                        f"spatial_merge_size={c.spatial_merge_size}: integers expected")
    elif c.window_merges < 1:
        problems.append(f"window_size={c.window_size} is smaller than one merge group (spatial_merge_size * "
                        f"patch_size = {c.spatial_merge_size * c.patch_size} pixels)")
    if c.hidden_size % c.num_heads or c.head_dim % 4:
        problems.append(f"hidden_size={c.hidden_size} / num_heads={c.num_heads}: the head dim must be a multiple of "
                        "4 (the RoPE rotates row and column frequencies in both halves)")
    if c.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act={c.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
    blocks = c.fullatt_block_indexes
    if len(set(blocks)) != len(blocks) or any(not 0 <= i < c.depth for i in blocks):
        problems.append(f"fullatt_block_indexes={list(blocks)}: expected distinct block indexes in [0, depth="
                        f"{c.depth}) (transformers would silently ignore the others)")
    return problems


# The released Qwen2.5-VL-7B vision tower (Qwen-Image-Edit's text encoder sees the edit's input image with it)
QWEN2_5_VL_7B = VisionConfig(hidden_size=1280)


# --- the layout of the sequence, from the grids (NumPy, at trace time) ----------------------------------

class Layout(NamedTuple):
    """Where each token goes, for a tuple of (t, h, w) grids; arrays in the WINDOW order unless named."""
    merge_order: np.ndarray  # (N / m^2,) input index of each merge group, window by window (transformers' window_index)
    windows: np.ndarray  # (N,) window id of each token (window attention segments)
    frames: np.ndarray  # (N,) frame id of each token (full-attention segments: one per frame of each image)
    positions: np.ndarray  # (N, 2) RoPE (row, column) of each token in its frame


def layout(config: VisionConfig, grid_thw) -> Layout:
    m, size = config.spatial_merge_size, config.window_merges
    orders, windows, positions = [], [], []
    groups_before = windows_before = 0
    for t, h, w in grid_thw:
        rows, cols = h // m, w // m
        # window of each merge group, frames and windows numbered row-major
        across, down = -(-cols // size), -(-rows // size)
        window = ((np.arange(t)[:, None, None] * down + np.arange(rows)[None, :, None] // size) * across
                  + np.arange(cols)[None, None, :] // size).reshape(-1)
        order = np.argsort(window, kind="stable")  # row-major within a window, as transformers
        orders.append(groups_before + order)
        windows.append(windows_before + window[order])
        # (row, column) of each patch of a frame, merge groups row-major, patches row-major within a group
        group_row, group_col, row, col = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(m), np.arange(m),
                                                     indexing="ij")
        frame = np.stack([(group_row * m + row).reshape(-1), (group_col * m + col).reshape(-1)], axis=-1)
        positions.append(np.tile(frame.reshape(-1, m * m, 2), (t, 1, 1))[order].reshape(-1, 2))
        groups_before += t * rows * cols
        windows_before += t * down * across
    frame_sizes = [h * w for t, h, w in grid_thw for _ in range(t)]
    return Layout(merge_order=np.concatenate(orders), windows=np.repeat(np.concatenate(windows), m * m),
                  frames=np.repeat(np.arange(len(frame_sizes)), frame_sizes), positions=np.concatenate(positions))


# --- the model -----------------------------------------------------------------------------------------

def pair_halves(x):
    """(..., d) channels [0, d/2, 1, d/2 + 1, ...]: transformers rotates channel i with i + d/2 (rotate_half);
    made adjacent, the Flux RoPE (adjacent pairs) applies. q and k get the same permutation, so q.k is unchanged."""
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).swapaxes(-1, -2).reshape(x.shape)


class Attention(nn.Module):
    """Packed qkv (q | k | v, heads within each), RoPE on q and k, masked softmax attention, output proj."""
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, rope, mask):
        c = self.config
        qkv = nn.Dense(3 * c.hidden_size, dtype=self.dtype, name="qkv")(x)
        q, k, v = (part.reshape(1, x.shape[0], c.num_heads, c.head_dim) for part in jnp.split(qkv, 3, axis=-1))
        q, k = (apply_rope(pair_halves(part), *rope) for part in (q, k))
        out = attend(q, k, v, mask=mask).reshape(x.shape)
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    """down(act(gate(x)) * up(x)), every Linear with a bias."""
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name)  # noqa: E731
        hidden = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "gate_proj")(x))
        return dense(c.hidden_size, "down_proj")(hidden * dense(c.intermediate_size, "up_proj")(x))


class Block(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)); scanned: carry = tokens, `full` = this layer's mask choice."""
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, rope, segments, full):
        windows, frames = segments
        segment = jnp.where(full, frames, windows)
        mask = (segment[:, None] == segment[None, :])[None, None]
        x = x + Attention(self.config, self.dtype, name="attn")(RMSNorm(name="norm1")(x), rope, mask)
        return x + Mlp(self.config, self.dtype, name="mlp")(RMSNorm(name="norm2")(x)), None


class PatchMerger(nn.Module):
    """RMSNorm each token, concatenate each merge group's, then Linear - GELU (exact) - Linear."""
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = RMSNorm(name="ln_q")(x).reshape(-1, c.merge_unit * c.hidden_size)
        x = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_0")(x)
        return nn.Dense(c.out_hidden_size, dtype=self.dtype, name="mlp_2")(jax.nn.gelu(x, approximate=False))


class VisionTransformer(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32  # compute dtype; parameters keep their own dtype
    remat: bool = False  # rematerialise each block in the backward pass

    @nn.compact
    def __call__(self, patches, grid_thw):
        c = self.config
        grid_thw = tuple(tuple(int(n) for n in grid) for grid in grid_thw)
        _check_inputs(c, patches, grid_thw)
        seq = layout(c, grid_thw)
        x = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype, name="patch_embed")(patches.astype(self.dtype))
        x = x.reshape(-1, c.merge_unit, c.hidden_size)[seq.merge_order].reshape(x.shape)
        rope = rope_tables(seq.positions, (c.head_dim // 2,) * 2, c.rope_theta)
        full = np.isin(np.arange(c.depth), c.fullatt_block_indexes)
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, 0), length=c.depth)(c, self.dtype, name="blocks")
        x, _ = blocks(x, rope, (seq.windows, seq.frames), full)
        merged = PatchMerger(c, self.dtype, name="merger")(x)
        return merged[np.argsort(seq.merge_order)]


def _check_inputs(c: VisionConfig, patches, grid_thw):
    problems = []
    m = c.spatial_merge_size
    if not grid_thw or any(len(g) != 3 or min(g) < 1 or g[1] % m or g[2] % m for g in grid_thw):
        problems.append(f"grid_thw {grid_thw}: expected one or more (t, h, w) patch grids, h and w multiples of "
                        f"spatial_merge_size={m}")
    if patches.ndim != 2 or patches.shape[1] != c.patch_dim:
        problems.append(f"patches {patches.shape}: expected (N, {c.patch_dim}) = (N, in_channels * "
                        "temporal_patch_size * patch_size^2)")
    elif not problems and patches.shape[0] != sum(math.prod(g) for g in grid_thw):
        problems.append(f"patches {patches.shape}: grid_thw {grid_thw} hold {sum(math.prod(g) for g in grid_thw)} "
                        "patches")
    if problems:
        raise ValueError("Qwen2.5-VL VisionTransformer inputs: " + "; ".join(problems))


def example_inputs(config: VisionConfig):
    """Zero patches of one merge group's grid (for init and eval_shape)."""
    m = config.spatial_merge_size
    return jnp.zeros((m * m, config.patch_dim)), ((1, m, m),)


def init_params(config: VisionConfig, key):
    """Random parameters (Flax default initialisers), fp32."""
    return VisionTransformer(config).init(key, *example_inputs(config))["params"]


def param_shapes(config: VisionConfig):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
