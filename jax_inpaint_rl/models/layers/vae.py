"""diffusers' AutoencoderKL in Flax Linen, channels-last: SD (4 latent channels, quant convs) and Flux
(16 latent channels, shift_factor, no quant convs) from the same code, driven by the diffusers config.

`vae_encode` / `vae_decode` are the entry points the families use: they work on the *model-space*
latents the denoiser sees, (z - shift_factor) * scaling_factor, and on images in [-1, 1].
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_inpaint_rl.models.layers.conv_blocks import (
    Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D, conv, group_norm, maybe_remat)

EPS = 1e-6  # every norm in the autoencoder
UNSUPPORTED_UNLESS = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
IGNORED = {"sample_size", "force_upcast"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "vae config") -> "VAEConfig":
        """Build from a diffusers AutoencoderKL config dict; unsupported settings raise naming the key."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        fields = {f.name for f in dataclasses.fields(cls)}
        problems = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in UNSUPPORTED_UNLESS.items()
                    if config.get(k, v) != v]
        problems += [f"{k} (unknown key)" for k in config if k not in fields | UNSUPPORTED_UNLESS.keys() | IGNORED]
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        made = cls(**values)
        problems += [f"down block {b!r}" for b in made.down_block_types if b != "DownEncoderBlock2D"]
        problems += [f"up block {b!r}" for b in made.up_block_types if b != "UpDecoderBlock2D"]
        if len(made.down_block_types) != len(made.block_out_channels):
            problems.append(f"{len(made.down_block_types)} down blocks for {len(made.block_out_channels)} channels")
        if problems:
            raise ValueError(f"{source}: unsupported AutoencoderKL settings: {', '.join(problems)}")
        return made


class _Part(nn.Module):
    config: VAEConfig
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def resnet(self, channels: int, name: str):
        return maybe_remat(ResnetBlock2D, self.remat)(channels, self.config.norm_num_groups, EPS, 1.0, self.dtype,
                                                       self.param_dtype, name=name)


class ResnetStack(_Part):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional 2x resampling conv."""
    channels: int = 0
    num_layers: int = 0
    resample: str | None = None  # "down", "up" or None

    @nn.compact
    def __call__(self, h):
        for j in range(self.num_layers):
            h = self.resnet(self.channels, f"resnets_{j}")(h)
        if self.resample == "down":
            h = Downsample2D(self.channels, 0, self.dtype, self.param_dtype, name="downsamplers_0")(h)
        elif self.resample == "up":
            h = Upsample2D(self.channels, self.dtype, self.param_dtype, name="upsamplers_0")(h)
        return h


class MidBlock(_Part):
    """UNetMidBlock2D: resnet, single-head spatial attention (unless disabled), resnet."""

    @nn.compact
    def __call__(self, h):
        channels = self.config.block_out_channels[-1]
        h = self.resnet(channels, "resnets_0")(h)
        if self.config.mid_block_add_attention:
            h = SpatialSelfAttention(self.config.norm_num_groups, EPS, self.dtype, self.param_dtype,
                                     name="attentions_0")(h)
        return self.resnet(channels, "resnets_1")(h)


def _head(part: _Part, h, channels: int):
    """GroupNorm, SiLU, 3x3 conv to the output channels (both ends of the autoencoder)."""
    h = nn.silu(group_norm(part.config.norm_num_groups, EPS, part.dtype, part.param_dtype, "conv_norm_out")(h))
    return conv(channels, 3, part.dtype, part.param_dtype, "conv_out")(h)


class Encoder(_Part):
    @nn.compact
    def __call__(self, x):
        c, d, p = self.config, self.dtype, self.param_dtype
        shared = dict(config=c, remat=self.remat, dtype=d, param_dtype=p)
        h = conv(c.block_out_channels[0], 3, d, p, "conv_in")(x)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels):
            h = ResnetStack(channels=channels, num_layers=c.layers_per_block, resample="down" if i < last else None,
                            name=f"down_blocks_{i}", **shared)(h)
        return _head(self, MidBlock(name="mid_block", **shared)(h), 2 * c.latent_channels)


class Decoder(_Part):
    @nn.compact
    def __call__(self, z):
        c, d, p = self.config, self.dtype, self.param_dtype
        shared = dict(config=c, remat=self.remat, dtype=d, param_dtype=p)
        h = MidBlock(name="mid_block", **shared)(conv(c.block_out_channels[-1], 3, d, p, "conv_in")(z))
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels[::-1]):
            h = ResnetStack(channels=channels, num_layers=c.layers_per_block + 1, resample="up" if i < last else None,
                            name=f"up_blocks_{i}", **shared)(h)
        return _head(self, h, c.out_channels)


class AutoencoderKL(nn.Module):
    """`encode` -> (mean, logvar) of the raw posterior; `decode` raw z -> image. Apply with `method=`."""
    config: VAEConfig
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, d, p = self.config, self.dtype, self.param_dtype
        self.encoder = Encoder(c, self.remat, d, p)
        self.decoder = Decoder(c, self.remat, d, p)
        if c.use_quant_conv:
            self.quant_conv = conv(2 * c.latent_channels, 1, d, p, "quant_conv")
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, 1, d, p, "post_quant_conv")

    def encode(self, images):
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images):
        return self.decode(self.encode(images)[0])


def to_model_latents(config: VAEConfig, z):
    """Raw posterior latents -> the denoiser's latents: (z - shift) * scale."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def from_model_latents(config: VAEConfig, latents):
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def vae_encode(vae: AutoencoderKL, params, images, key=None):
    """Images (B, H, W, 3) in [-1, 1] -> model-space latents: the posterior mean, or a sample when `key` is given."""
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return to_model_latents(vae.config, z)


def vae_decode(vae: AutoencoderKL, params, latents):
    """Model-space latents -> images (B, H, W, 3), unclipped."""
    return vae.apply({"params": params}, from_model_latents(vae.config, latents), method=AutoencoderKL.decode)


def init_params(vae: AutoencoderKL, key, resolution: int = 32):
    return vae.init(key, jnp.zeros((1, resolution, resolution, vae.config.in_channels), jnp.float32))["params"]
