"""The SD3 / SD3.5 MM-DiT (diffusers' SD3Transformer2DModel) in Flax Linen.

One implementation serves SD3-Medium (no QK norm), SD3.5-Large (RMS QK norm) and SD3.5-Medium (RMS QK norm
and, in its first blocks, a second image-only attention); the variant is read from the diffusers config.
Parameter names follow diffusers so the converter's key table stays readable. Blocks come in kinds (with or
without the second attention; the last block, whose text stream only feeds the attention), so each run of
consecutive equal blocks is one `nn.scan` over parameters stacked on a leading axis, named
`blocks_<first>_to_<last>` by diffusers' block indices (SD3.5-Medium: blocks_0_to_12, blocks_13_to_22,
blocks_23_to_23); a forward pass compiles one block per run whatever the depth.

Inputs: latents channels-last (B, h, w, in_channels) in model space, h and w multiples of patch_size;
timestep (B,) on the pipeline's 0..1000 scale (1000 sigma, passed as is, unlike the Flux port); text
(B, T, joint_attention_dim); pooled text (B, pooled_projection_dim). Output: (B, h, w, out_channels).
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.flux.transformer import (FeedForward, MLPEmbedder, Modulation, RMSNorm, attention,
                                                    layer_norm, modulate, stack_blocks, timestep_embedding)

QK_NORMS = (None, "rms_norm")
POSITION_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """diffusers' SD3Transformer2DModel arguments, with its defaults (a config.json may omit any of them)."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config") -> "SD3Config":
        """Build from a diffusers transformer config.json dict (keys starting with '_' are metadata)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown SD3 transformer config keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        values = {k: v for k, v in config.items() if k in known}
        values["dual_attention_layers"] = tuple(values.get("dual_attention_layers") or ())
        made = cls(**values)
        problems = []
        if made.qk_norm not in QK_NORMS:
            problems.append(f"qk_norm={made.qk_norm!r}, supported: {list(QK_NORMS)}")
        if made.caption_projection_dim != made.inner_dim:
            problems.append(f"caption_projection_dim {made.caption_projection_dim} must equal num_attention_heads x "
                            f"attention_head_dim = {made.inner_dim} (the text stream joins the blocks at that width)")
        if made.pos_embed_max_size is None:
            problems.append("pos_embed_max_size is None; SD3 checkpoints crop a fixed position table and set it")
        if made.inner_dim % 4:
            problems.append(f"inner dim {made.inner_dim} must be a multiple of 4 (2-D sin-cos position table)")
        outside = [i for i in made.dual_attention_layers if not 0 <= i < made.num_layers]
        if outside:
            problems.append(f"dual_attention_layers {outside} outside 0..{made.num_layers - 1}")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return made


@dataclasses.dataclass(frozen=True)
class BlockRun:
    """Consecutive blocks `first`..`last` (diffusers' indices) of one kind: one scanned stack of parameters."""
    first: int
    last: int
    dual_attention: bool  # a second, image-only attention (SD3.5's dual_attention_layers)
    context_pre_only: bool  # the last block: text feeds the attention and is not updated

    @property
    def name(self) -> str:
        return f"blocks_{self.first}_to_{self.last}"

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def block_runs(config: SD3Config) -> tuple[BlockRun, ...]:
    """The blocks grouped into runs of equal kind, in order."""
    kinds = [(i in config.dual_attention_layers, i == config.num_layers - 1) for i in range(config.num_layers)]
    runs, first = [], 0
    for i in range(1, config.num_layers + 1):
        if i == config.num_layers or kinds[i] != kinds[first]:
            runs.append(BlockRun(first, i - 1, *kinds[first]))
            first = i
    return tuple(runs)


def axis_embedding(config: SD3Config) -> np.ndarray:
    """(pos_embed_max_size, inner_dim / 2) [sin, cos] of each grid coordinate along one axis.

    Built as diffusers builds its buffer: coordinates in float32, scaled so that sample_size / patch_size
    patches span the same range whatever pos_embed_max_size is, angles and sin / cos in float64, rounded once.
    """
    size, base = config.pos_embed_max_size, config.sample_size // config.patch_size
    coords = (np.arange(size, dtype=np.float32) / np.float32(size / base)).astype(np.float64)
    quarter = config.inner_dim // 4
    freqs = 1.0 / POSITION_THETA ** (np.arange(quarter, dtype=np.float64) / quarter)
    angles = coords[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def position_embedding(config: SD3Config, height: int, width: int) -> np.ndarray:
    """(height * width, inner_dim) the centre crop of the pos_embed_max_size^2 table, rows major: channels hold
    the column's embedding, then the row's. A host constant, so a jitted call folds it in."""
    size, half = config.pos_embed_max_size, config.inner_dim // 2
    top, left = (size - height) // 2, (size - width) // 2
    along = axis_embedding(config)
    columns = np.broadcast_to(along[None, left:left + width], (height, width, half))
    rows = np.broadcast_to(along[top:top + height, None], (height, width, half))
    return np.concatenate([columns, rows], axis=-1).reshape(height * width, 2 * half)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (a stride-p convolution), plus the position table's crop (added in fp32)."""
    config: SD3Config
    dtype: Any

    @nn.compact
    def __call__(self, latents):
        c, p = self.config, self.config.patch_size
        tokens = nn.Conv(c.inner_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(
            latents.astype(self.dtype))
        batch, height, width, dim = tokens.shape
        tokens = tokens.reshape(batch, height * width, dim).astype(jnp.float32)
        return (tokens + position_embedding(c, height, width)).astype(self.dtype)


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(timestep)) + MLP(pooled text) (diffusers' CombinedTimestepTextProjEmbeddings)."""
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, timestep, pooled):
        temb = MLPEmbedder(self.features, self.dtype, name="timestep_embedder")(
            timestep_embedding(timestep).astype(self.dtype))
        return temb + MLPEmbedder(self.features, self.dtype, name="text_embedder")(pooled.astype(self.dtype))


IMG_NAMES = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
TXT_NAMES = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


def qkv_heads(x, heads: int, head_dim: int, qk_norm: bool, dtype, names=IMG_NAMES):
    """Q, K, V projections split into heads (B, S, N, H), Q and K RMS-normed when `qk_norm`; call inside a
    compact method (names its params)."""
    split = lambda y: y.reshape(*y.shape[:-1], heads, head_dim)  # noqa: E731
    q, k, v = (split(nn.Dense(heads * head_dim, dtype=dtype, name=n)(x)) for n in names[:3])
    if qk_norm:
        q, k = RMSNorm(name=names[3])(q), RMSNorm(name=names[4])(k)
    return q, k, v


class JointAttention(nn.Module):
    """One attention over [image, text] with per-stream projections (diffusers' JointAttnProcessor2_0).
    `context_pre_only` (the last block): the text's output is not needed, so there is no to_add_out."""
    heads: int
    head_dim: int
    qk_norm: bool
    context_pre_only: bool
    dtype: Any

    @nn.compact
    def __call__(self, img, txt):
        img_q, img_k, img_v = qkv_heads(img, self.heads, self.head_dim, self.qk_norm, self.dtype, IMG_NAMES)
        txt_q, txt_k, txt_v = qkv_heads(txt, self.heads, self.head_dim, self.qk_norm, self.dtype, TXT_NAMES)
        joint = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
        out = attention(joint(img_q, txt_q), joint(img_k, txt_k), joint(img_v, txt_v))
        out = out.reshape(*out.shape[:2], -1)
        tokens, dim = img.shape[1], img.shape[-1]
        img_out = nn.Dense(dim, dtype=self.dtype, name="to_out")(out[:, :tokens])
        if self.context_pre_only:
            return img_out, None
        return img_out, nn.Dense(dim, dtype=self.dtype, name="to_add_out")(out[:, tokens:])


class SelfAttention(nn.Module):
    """The image-only second attention of SD3.5's dual-attention blocks (attn2)."""
    heads: int
    head_dim: int
    qk_norm: bool
    dtype: Any

    @nn.compact
    def __call__(self, img):
        out = attention(*qkv_heads(img, self.heads, self.head_dim, self.qk_norm, self.dtype))
        return nn.Dense(img.shape[-1], dtype=self.dtype, name="to_out")(out.reshape(*out.shape[:2], -1))


class JointBlock(nn.Module):
    """diffusers' JointTransformerBlock: adaLN-zero modulated joint attention and MLPs for image and text.

    Dual attention (SD35AdaLayerNormZeroX): three more modulation vectors drive a second, image-only attention
    on the same normed input, gated into the residual after the joint one. context_pre_only: the text is
    modulated by an AdaLayerNormContinuous (scale, then shift) and leaves the block unchanged (unused after it).
    """
    config: SD3Config
    dual_attention: bool
    context_pre_only: bool
    dtype: Any

    @nn.compact
    def __call__(self, carry, temb):
        img, txt = carry
        c, d = self.config, self.dtype
        heads = dict(heads=c.num_attention_heads, head_dim=c.attention_head_dim, qk_norm=c.qk_norm is not None,
                     dtype=d)
        img_mod = Modulation(9 if self.dual_attention else 6, d, name="norm1")(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = img_mod[:6]
        if self.context_pre_only:
            txt_scale, txt_shift = Modulation(2, d, name="norm1_context")(temb)
        else:
            txt_shift, txt_scale, txt_gate, txt_shift_mlp, txt_scale_mlp, txt_gate_mlp = Modulation(
                6, d, name="norm1_context")(temb)

        img_normed = layer_norm(img)
        img_attn, txt_attn = JointAttention(context_pre_only=self.context_pre_only, name="attn", **heads)(
            modulate(img_normed, shift, scale), modulate(layer_norm(txt), txt_shift, txt_scale))
        img = img + gate[:, None] * img_attn
        if self.dual_attention:
            shift2, scale2, gate2 = img_mod[6:]
            img = img + gate2[:, None] * SelfAttention(name="attn2", **heads)(modulate(img_normed, shift2, scale2))
        img_ff = FeedForward(c.inner_dim, d, name="ff")(modulate(layer_norm(img), shift_mlp, scale_mlp))
        img = img + gate_mlp[:, None] * img_ff

        if not self.context_pre_only:
            txt = txt + txt_gate[:, None] * txt_attn
            txt_ff = FeedForward(c.inner_dim, d, name="ff_context")(
                modulate(layer_norm(txt), txt_shift_mlp, txt_scale_mlp))
            txt = txt + txt_gate_mlp[:, None] * txt_ff
        return (img, txt), None


def unpatchify(tokens, height: int, width: int, patch: int):
    """(B, height * width, patch^2 C) tokens, each a (patch, patch, C) tile -> (B, height patch, width patch, C)."""
    batch = tokens.shape[0]
    tiles = tokens.reshape(batch, height, width, patch, patch, -1).transpose(0, 1, 3, 2, 4, 5)
    return tiles.reshape(batch, height * patch, width * patch, -1)


class SD3Transformer(nn.Module):
    config: SD3Config
    dtype: Any = jnp.float32  # compute dtype; parameters keep their own dtype
    remat: bool = False  # rematerialise each block in the backward pass

    @nn.compact
    def __call__(self, latents, timestep, text, pooled):
        c = self.config
        _check_inputs(c, latents, timestep, text, pooled)
        height, width = latents.shape[1] // c.patch_size, latents.shape[2] // c.patch_size
        img = PatchEmbed(c, self.dtype, name="pos_embed")(latents)
        txt = nn.Dense(c.caption_projection_dim, dtype=self.dtype, name="context_embedder")(text.astype(self.dtype))
        temb = TimeTextEmbed(c.inner_dim, self.dtype, name="time_text_embed")(timestep, pooled)

        for run in block_runs(c):
            blocks = stack_blocks(JointBlock, run.length, self.remat, broadcast=1)  # temb: the same for every block
            (img, txt), _ = blocks(c, run.dual_attention, run.context_pre_only, self.dtype, name=run.name)(
                (img, txt), temb)

        scale, shift = Modulation(2, self.dtype, name="norm_out")(temb)
        img = modulate(layer_norm(img), shift, scale)
        out = nn.Dense(c.patch_size ** 2 * c.output_channels, dtype=self.dtype, name="proj_out")(img)
        return unpatchify(out, height, width, c.patch_size)


def _check_inputs(c: SD3Config, latents, timestep, text, pooled):
    problems = []
    p, size = c.patch_size, c.pos_embed_max_size
    if latents.ndim != 4 or latents.shape[-1] != c.in_channels:
        problems.append(f"latents {latents.shape}: expected (B, h, w, {c.in_channels})")
    elif latents.shape[1] % p or latents.shape[2] % p:
        problems.append(f"latents {latents.shape}: h and w must be multiples of patch_size {p}")
    elif max(latents.shape[1], latents.shape[2]) > p * size:
        problems.append(f"latents {latents.shape}: h and w at most patch_size x pos_embed_max_size = {p * size}")
    if timestep.shape != latents.shape[:1]:
        problems.append(f"timestep {timestep.shape}: expected ({latents.shape[0]},)")
    if text.ndim != 3 or text.shape[-1] != c.joint_attention_dim:
        problems.append(f"text states {text.shape}: expected (B, T, {c.joint_attention_dim})")
    if pooled.ndim != 2 or pooled.shape[-1] != c.pooled_projection_dim:
        problems.append(f"pooled text {pooled.shape}: expected (B, {c.pooled_projection_dim})")
    if problems:
        raise ValueError("SD3Transformer inputs: " + "; ".join(problems))


def example_inputs(config: SD3Config, batch: int = 1, patches: int = 2, text_tokens: int = 2):
    """Zero inputs of the right shapes (for init and eval_shape): a patches x patches grid."""
    side = patches * config.patch_size
    return dict(latents=jnp.zeros((batch, side, side, config.in_channels)), timestep=jnp.zeros((batch,)),
                text=jnp.zeros((batch, text_tokens, config.joint_attention_dim)),
                pooled=jnp.zeros((batch, config.pooled_projection_dim)))


def init_params(config: SD3Config, key):
    """Random parameters (Flax default initialisers), fp32."""
    return SD3Transformer(config).init(key, **example_inputs(config))["params"]


def param_shapes(config: SD3Config):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating (works for the 8B model)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
