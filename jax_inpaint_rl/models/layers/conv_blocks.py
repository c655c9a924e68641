"""Convolutional building blocks shared by the SD UNet and the AutoencoderKL (diffusers' ResnetBlock2D,
Downsample2D, Upsample2D and the VAE's single-head spatial attention), channels-last.

Submodule names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`, ...) so the
converters' key tables read as a renaming only.
"""
import flax.linen as nn
import jax.numpy as jnp

from jax_inpaint_rl.models.layers.attention import attend


def group_norm(groups: int, eps: float, dtype, param_dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm: statistics over (H, W, channels of the group), in fp32, two-pass variance."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype, param_dtype, name: str, stride: int = 1, padding=None) -> nn.Conv:
    """torch Conv2d with symmetric padding kernel // 2 unless `padding` is given."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def nearest_resize(x, height: int, width: int):
    """torch.nn.functional.interpolate(mode='nearest') on (B, H, W, C): source index floor(i * in / out)."""
    rows = jnp.floor(jnp.arange(height) * (x.shape[1] / height)).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(width) * (x.shape[2] / width)).astype(jnp.int32)
    return x[:, jnp.minimum(rows, x.shape[1] - 1)][:, :, jnp.minimum(cols, x.shape[2] - 1)]


def maybe_remat(module_cls, remat: bool):
    """Rematerialise a block in the backward pass when asked (gradient checkpointing)."""
    return nn.remat(module_cls, prevent_cse=False) if remat else module_cls


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block; adds a projected time embedding after conv1 when `temb` is given."""
    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        d, p = self.dtype, self.param_dtype
        h = nn.silu(group_norm(self.groups, self.eps, d, p, "norm1")(x))
        h = conv(self.out_channels, 3, d, p, "conv1")(h)
        if temb is not None:
            time = nn.Dense(self.out_channels, dtype=d, param_dtype=p, name="time_emb_proj")(nn.silu(temb))
            h = h + time[:, None, None]
        h = nn.silu(group_norm(self.groups, self.eps, d, p, "norm2")(h))
        h = conv(self.out_channels, 3, d, p, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, d, p, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; padding 0 means diffusers' asymmetric (0, 1) zero pad (the VAE encoder)."""
    channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        padding = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(self.channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to an explicit size for odd skip shapes) then a 3x3 conv."""
    channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: tuple[int, int] | None = None):
        height, width = size or (2 * x.shape[1], 2 * x.shape[2])
        if (height, width) == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = nearest_resize(x, height, width)
        return conv(self.channels, 3, self.dtype, self.param_dtype, "conv")(x)


def attention(q, k, v, heads: int, is_causal: bool = False):
    """(B, T, heads*D) projections -> (B, T, heads*D); softmax(q k^T / sqrt(D)) v (model.attention's kernel)."""
    split = lambda a: a.reshape(*a.shape[:2], heads, a.shape[-1] // heads)  # noqa: E731
    out = attend(split(q), split(k), split(v), is_causal=is_causal)
    return out.reshape(*out.shape[:2], -1)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all H*W positions, residual."""
    groups: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        d, p = self.dtype, self.param_dtype
        h = group_norm(self.groups, self.eps, d, p, "group_norm")(x).reshape(b, height * width, c)
        q, k, v = (nn.Dense(c, dtype=d, param_dtype=p, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        out = nn.Dense(c, dtype=d, param_dtype=p, name="to_out_0")(attention(q, k, v, heads=1))
        return x + out.reshape(b, height, width, c)
