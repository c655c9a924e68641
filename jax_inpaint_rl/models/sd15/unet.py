"""diffusers' UNet2DConditionModel in Flax Linen, channels-last, for the SD1.x / SD2.x family of configs.

Built from the diffusers config.json dict (`UNetConfig.from_diffusers`): CrossAttnDownBlock2D /
DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D, linear or 1x1-conv
projections, per-block head counts. Config keys for features this port does not implement must
hold their default value, or loading fails naming the key, so an unsupported checkpoint never
runs silently wrong.

Inputs: sample (B, H, W, in_channels), timesteps (B,) (DDPM integer timesteps as floats),
encoder_hidden_states (B, T, cross_attention_dim). Output (B, H, W, out_channels).
Like diffusers, `attention_head_dim` (when `num_attention_heads` is null) is the number of heads.
"""
import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jax_inpaint_rl.models.layers.conv_blocks import (
    Downsample2D, ResnetBlock2D, Upsample2D, attention, conv, group_norm, maybe_remat)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Config keys of features not ported: they must hold these values (diffusers' defaults).
UNSUPPORTED_UNLESS = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "act_fn": "silu", "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
# Keys that change nothing at inference / in this layout.
IGNORED = {"sample_size", "dropout", "upcast_attention"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "unet config") -> "UNetConfig":
        """Build from a diffusers UNet2DConditionModel config dict; unsupported settings raise naming the key."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        problems = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in UNSUPPORTED_UNLESS.items()
                    if k in config and config[k] != v]
        fields = {f.name for f in dataclasses.fields(cls)} | {"attention_head_dim"}
        problems += [f"{k} (unknown key)" for k in config if k not in fields | UNSUPPORTED_UNLESS.keys() | IGNORED]
        if problems:
            raise ValueError(f"{source}: unsupported UNet settings: {', '.join(problems)}")
        blocks = len(config.get("block_out_channels", cls.block_out_channels))
        per_block = lambda value: tuple(value) if isinstance(value, (list, tuple)) else (value,) * blocks  # noqa: E731
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        values = {k: config[k] for k in fields - {"attention_head_dim"} if k in config}
        values.update(num_attention_heads=per_block(heads),
                      layers_per_block=per_block(config.get("layers_per_block", 2)),
                      transformer_layers_per_block=per_block(config.get("transformer_layers_per_block", 1)))
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in values:
                values[key] = tuple(values[key])
        made = cls(**values)
        made._check(source)
        return made

    def _check(self, source: str) -> None:
        n = len(self.block_out_channels)
        lengths = {k: len(getattr(self, k)) for k in ("down_block_types", "up_block_types", "layers_per_block",
                                                       "transformer_layers_per_block", "num_attention_heads")}
        bad = [f"{k} has {v} entries" for k, v in lengths.items() if v != n]
        bad += [f"down block {b!r}" for b in self.down_block_types if b not in DOWN_BLOCKS]
        bad += [f"up block {b!r}" for b in self.up_block_types if b not in UP_BLOCKS]
        bad += [f"block_out_channels {c} not divisible by norm_num_groups {self.norm_num_groups}"
                for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"{source}: expected {n} blocks ({len(self.block_out_channels)} block_out_channels) "
                             f"of types {DOWN_BLOCKS} / {UP_BLOCKS}: {'; '.join(bad)}")


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """diffusers get_timestep_embedding: sinusoids of (B,) timesteps, [sin, cos] or flipped [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class CrossAttention(nn.Module):
    """diffusers Attention as BasicTransformerBlock uses it: bias-free q/k/v, biased output projection."""
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        dim = x.shape[-1]
        context = x if context is None else context
        dense = lambda name, bias=False: nn.Dense(dim, use_bias=bias, dtype=self.dtype,  # noqa: E731
                                                  param_dtype=self.param_dtype, name=name)
        out = attention(dense("to_q")(x), dense("to_k")(context), dense("to_v")(context), self.heads)
        return dense("to_out_0", bias=True)(out)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; each pre-LayerNorm and residual."""
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        d, p = self.dtype, self.param_dtype
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=d, param_dtype=p, use_fast_variance=False,  # noqa: E731
                                         name=name)
        x = x + CrossAttention(self.heads, d, p, name="attn1")(norm("norm1")(x))
        x = x + CrossAttention(self.heads, d, p, name="attn2")(norm("norm2")(x), context)
        dim = x.shape[-1]
        hidden, gate = jnp.split(nn.Dense(8 * dim, dtype=d, param_dtype=p, name="ff_net_0_proj")(norm("norm3")(x)), 2,
                                 axis=-1)
        return x + nn.Dense(dim, dtype=d, param_dtype=p, name="ff_net_2")(hidden * nn.gelu(gate, approximate=False))


class Transformer2DModel(nn.Module):
    """GroupNorm, project in (1x1 conv or linear), transformer blocks over H*W tokens, project out, residual."""
    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, height, width, c = x.shape
        d, p = self.dtype, self.param_dtype
        project = (lambda name: nn.Dense(c, dtype=d, param_dtype=p, name=name)) if self.use_linear_projection \
            else (lambda name: conv(c, 1, d, p, name))
        h = group_norm(self.groups, 1e-6, d, p, "norm")(x)
        if self.use_linear_projection:
            h = project("proj_in")(h.reshape(b, height * width, c))
        else:
            h = project("proj_in")(h).reshape(b, height * width, c)
        block = maybe_remat(BasicTransformerBlock, self.remat)
        for i in range(self.num_layers):
            h = block(self.heads, d, p, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = project("proj_out")(h).reshape(b, height, width, c)
        else:
            h = project("proj_out")(h.reshape(b, height, width, c))
        return x + h


class _Blocks(nn.Module):
    """Shared fields of the UNet's down / mid / up blocks."""
    kind: str
    channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    config: "UNetConfig"
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def resnet(self, name: str, scale: float = 1.0):
        return maybe_remat(ResnetBlock2D, self.remat)(self.channels, self.config.norm_num_groups,
                                                       self.config.norm_eps, scale, self.dtype, self.param_dtype,
                                                       name=name)

    def transformer(self, name: str):
        return Transformer2DModel(self.heads, self.transformer_layers, self.config.norm_num_groups,
                                  self.config.use_linear_projection, self.remat, self.dtype, self.param_dtype,
                                  name=name)


class DownBlock(_Blocks):
    """CrossAttnDownBlock2D / DownBlock2D: returns the output and every skip it hands to the up path."""
    add_downsample: bool = True

    @nn.compact
    def __call__(self, h, temb, context):
        skips = []
        for j in range(self.num_layers):
            h = self.resnet(f"resnets_{j}")(h, temb)
            if self.kind == "CrossAttnDownBlock2D":
                h = self.transformer(f"attentions_{j}")(h, context)
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(self.channels, self.config.downsample_padding, self.dtype, self.param_dtype,
                             name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(_Blocks):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, h, temb, context):
        h = self.resnet("resnets_0", self.config.mid_block_scale_factor)(h, temb)
        h = self.transformer("attentions_0")(h, context)
        return self.resnet("resnets_1", self.config.mid_block_scale_factor)(h, temb)


class UpBlock(_Blocks):
    """CrossAttnUpBlock2D / UpBlock2D: each layer concatenates the latest skip; upsamples to the next skip's size."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, temb, context, skips, upsample_size):
        for j in range(self.num_layers):
            h = self.resnet(f"resnets_{j}")(jnp.concatenate([h, skips[-1 - j]], axis=-1), temb)
            if self.kind == "CrossAttnUpBlock2D":
                h = self.transformer(f"attentions_{j}")(h, context)
        if self.add_upsample:
            h = Upsample2D(self.channels, self.dtype, self.param_dtype, name="upsamplers_0")(h, upsample_size)
        return h


class UNet2DConditionModel(nn.Module):
    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # rematerialise resnets and transformer blocks in the backward pass

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        c, d, p = self.config, self.dtype, self.param_dtype
        n = len(c.block_out_channels)
        shared = dict(config=c, remat=self.remat, dtype=d, param_dtype=p)
        emb = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).astype(d)
        emb = nn.Dense(c.time_embed_dim, dtype=d, param_dtype=p, name="time_embedding_linear_1")(emb)
        temb = nn.Dense(c.time_embed_dim, dtype=d, param_dtype=p, name="time_embedding_linear_2")(nn.silu(emb))
        context = encoder_hidden_states.astype(d)

        h = conv(c.block_out_channels[0], 3, d, p, "conv_in")(sample.astype(d))
        skips = [h]
        for i, kind in enumerate(c.down_block_types):
            h, block_skips = DownBlock(kind, c.block_out_channels[i], c.layers_per_block[i], c.num_attention_heads[i],
                                       c.transformer_layers_per_block[i], add_downsample=i < n - 1,
                                       name=f"down_blocks_{i}", **shared)(h, temb, context)
            skips += block_skips

        h = MidBlock("mid", c.block_out_channels[-1], 1, c.num_attention_heads[-1], c.transformer_layers_per_block[-1],
                     name="mid_block", **shared)(h, temb, context)

        for i, kind in enumerate(c.up_block_types):
            b = n - 1 - i  # the matching down block
            layers = c.layers_per_block[b] + 1
            block_skips, skips = skips[-layers:], skips[:-layers]
            upsample_size = skips[-1].shape[1:3] if skips else None
            h = UpBlock(kind, c.block_out_channels[b], layers, c.num_attention_heads[b],
                        c.transformer_layers_per_block[b], add_upsample=i < n - 1, name=f"up_blocks_{i}",
                        **shared)(h, temb, context, block_skips, upsample_size)

        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, d, p, "conv_norm_out")(h))
        return conv(c.out_channels, 3, d, p, "conv_out")(h)
