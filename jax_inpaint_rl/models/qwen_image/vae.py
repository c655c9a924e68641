"""Qwen-Image's VAE (diffusers' AutoencoderKLQwenImage, a fine-tuned Wan-2.1 causal 3-D VAE) in Flax Linen,
applied to single frames, channels-last: images (B, H, W, 3) in [-1, 1] <-> latents (B, H/8, W/8, 16).

The Qwen-Image pipelines only ever pass one frame (T = 1), which diffusers runs as the first chunk of its
feature-cached loop. What each 3-D piece computes for that frame, and what this module does instead:
- a causal conv with temporal kernel kt pads kt - 1 zero frames in front (the feature cache is empty on the
  first chunk), so the frame meets only the kernel's last temporal tap: a 2-D conv with kernel[kt - 1] and
  'same' spatial padding;
- the Resample time convs (downsample3d / upsample3d) are skipped on the first chunk (diffusers only fills
  its cache), so the frame count stays 1 and no output depends on them; the rest of a Resample is 2-D (a zero
  pad right / bottom and a 3x3 stride-2 conv; 2x nearest-exact upsampling, i.e. repetition, and a 3x3 conv to
  half the channels);
- the RMS norms act per position over channels, x / max(|x|_2, 1e-12) * sqrt(C) * gamma, and the attention
  (single head over H x W) folds time into the batch: both are per-frame already.
So `temperal_downsample` decides which parameters exist, never what one frame computes.

Parameters keep diffusers' shapes, channels-last: 3-D conv kernels (kt, kh, kw, in, out) with their temporal
axis (the unused time convs included), 2-D conv kernels (kh, kw, in, out), RMS gammas (C,) named `scale`;
the parameter count equals diffusers' exactly. Names follow diffusers with `.N` folded into `_N`
(encoder/down_blocks_3/conv1/kernel, decoder/up_blocks_0/upsamplers_0/resample_1/kernel), so the converter's
key table (tools/convert_weights/qwen_image_vae.py) is a renaming. Dropout is never applied (diffusers' eval
mode; the VAE is not trained here). `attn_scales` must be [] (the published value; diffusers cannot run any
other). Images must have sides that are multiples of the downscale (the pipelines resize to multiples of 16;
diffusers would floor odd sides). Convs run in the compute `dtype`; norms in fp32; encode / decode return fp32.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jax_inpaint_rl.models.layers.conv_blocks import attention, conv

RMS_EPS = 1e-12  # F.normalize's floor on the channel norm
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this
# the published Qwen-Image vae/config.json (also diffusers' defaults): per-channel latent statistics
QWEN_IMAGE_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                           0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_IMAGE_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                          1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class QwenVAEConfig:
    """diffusers' AutoencoderKLQwenImage arguments, with its defaults (the published Qwen-Image VAE)."""
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # only () is supported: see from_diffusers
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # [sic]; per level: a time conv (unused here)
    dropout: float = 0.0  # inference only: never applied
    input_channels: int = 3
    latents_mean: tuple[float, ...] = QWEN_IMAGE_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_IMAGE_LATENTS_STD

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: one 2x Resample per level but the last. diffusers' pipelines use
        2 ** len(temperal_downsample), which `from_diffusers` makes sure is the same number."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config") -> "QwenVAEConfig":
        """Build from a diffusers vae/config.json dict (keys starting with '_' are metadata)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown Qwen-Image VAE config keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        made = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known})
        problems = []
        if not made.dim_mult:
            problems.append("dim_mult is empty")
        if len(made.temperal_downsample) != len(made.dim_mult) - 1:
            problems.append(f"temperal_downsample {made.temperal_downsample} must have one flag per downsampling "
                            f"level, len(dim_mult) - 1 = {len(made.dim_mult) - 1}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(made, name)) != made.z_dim:
                problems.append(f"{name} has {len(getattr(made, name))} values for z_dim {made.z_dim}")
        if made.attn_scales:  # diffusers 0.42's encoder passes its feature cache to these attention blocks
            problems.append(f"attn_scales {made.attn_scales} is not supported (only []: diffusers' encoder raises "
                            "TypeError with down-block attention, so no checkpoint has it; the mid blocks' "
                            "attention is always there)")
        if any(s <= 0 for s in made.latents_std):
            problems.append(f"latents_std {made.latents_std} must be positive")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return made


def tiny_config() -> QwenVAEConfig:
    """The tiny family's VAE: Qwen-Image's structure (16 latent channels, its latent statistics, a 3-D level
    with a time conv) at 2x downscale and 4 / 8 channels; 32 x 32 images run in well under a second on CPU."""
    return QwenVAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 2), num_res_blocks=1, temperal_downsample=(True,))


def conv3d_params(module: nn.Module, in_features: int, features: int, kernel_size: tuple[int, int, int]):
    """kernel (kt, kh, kw, in, out) and bias (out,) of a 3-D conv, created in `module` (compact)."""
    kernel = module.param("kernel", nn.initializers.lecun_normal(), (*kernel_size, in_features, features))
    return kernel, module.param("bias", nn.initializers.zeros_init(), (features,))


class CausalConv3d(nn.Module):
    """diffusers' QwenImageCausalConv3d (stride 1, spatial padding k // 2) on the first and only frame: the
    kt - 1 frames before it are causal zero padding, so it is a 2-D conv with the last temporal tap."""
    features: int
    kernel_size: tuple[int, int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel, bias = conv3d_params(self, x.shape[-1], self.features, self.kernel_size)
        _, kh, kw = self.kernel_size
        out = lax.conv_general_dilated(x.astype(self.dtype), kernel[-1].astype(self.dtype), (1, 1),
                                       ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out + bias.astype(self.dtype)


class TimeConv(nn.Module):
    """A Resample's causal (3, 1, 1) time conv: diffusers skips it on the first chunk, so one frame never
    uses it; only its parameters are created (the count and the checkpoint match diffusers')."""
    in_features: int
    features: int

    @nn.compact
    def __call__(self):
        conv3d_params(self, self.in_features, self.features, (3, 1, 1))


class RMSNorm(nn.Module):
    """diffusers' QwenImageRMS_norm: x / max(|x|_2, 1e-12) * sqrt(C) * scale over channels, in fp32 (its
    optional bias is never enabled in the VAE)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (channels,))
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
        return (x / jnp.maximum(norm, RMS_EPS) * (channels ** 0.5 * scale)).astype(self.dtype)


class ResidualBlock(nn.Module):
    """(RMS norm, SiLU, 3x3x3 causal conv) twice, plus the input (through a 1x1x1 conv when channels change)."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        shortcut = x if x.shape[-1] == self.features else CausalConv3d(self.features, (1, 1, 1), d,
                                                                       name="conv_shortcut")(x)
        h = CausalConv3d(self.features, (3, 3, 3), d, name="conv1")(nn.silu(RMSNorm(d, name="norm1")(x)))
        h = CausalConv3d(self.features, (3, 3, 3), d, name="conv2")(nn.silu(RMSNorm(d, name="norm2")(h)))
        return h + shortcut


class AttentionBlock(nn.Module):
    """The mid blocks' attention: RMS norm, one 1x1 conv to q, k, v (in that order along channels), a single
    head over all H x W positions, a 1x1 output conv, residual."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        d = self.dtype
        qkv = conv(3 * c, 1, d, jnp.float32, "to_qkv")(RMSNorm(d, name="norm")(x))
        q, k, v = jnp.split(qkv.reshape(b, height * width, 3 * c), 3, axis=-1)
        out = attention(q, k, v, heads=1).reshape(b, height, width, c)
        return x + conv(c, 1, d, jnp.float32, "proj")(out)


RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


class Resample(nn.Module):
    """2x down (zero pad right / bottom, 3x3 stride-2 conv, same channels) or 2x up (repeat, 3x3 conv to half
    the channels); the '3d' modes also own a time conv that one frame never runs."""
    mode: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels, down = x.shape[-1], self.mode.startswith("down")
        if down:
            x = conv(channels, 3, self.dtype, jnp.float32, "resample_1", stride=2, padding=((0, 1), (0, 1)))(x)
        else:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = conv(channels // 2, 3, self.dtype, jnp.float32, "resample_1")(x)
        if self.mode.endswith("3d"):
            TimeConv(channels, channels if down else 2 * channels, name="time_conv")()
        return x


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, channels = self.dtype, x.shape[-1]
        x = ResidualBlock(channels, d, name="resnets_0")(x)
        x = AttentionBlock(d, name="attentions_0")(x)
        return ResidualBlock(channels, d, name="resnets_1")(x)


def head(x, features: int, dtype):
    """RMS norm, SiLU, 3x3x3 causal conv to the output channels (both ends of the autoencoder); call inside
    a compact method."""
    return CausalConv3d(features, (3, 3, 3), dtype, name="conv_out")(nn.silu(RMSNorm(dtype, name="norm_out")(x)))


def encoder_layers(config: QwenVAEConfig) -> list[tuple[str, Any]]:
    """diffusers' flat encoder.down_blocks list, in order: per level num_res_blocks ('residual', channels),
    then ('resample', mode) unless it is the last level."""
    layers = []
    for level, mult in enumerate(config.dim_mult):
        layers += [("residual", config.base_dim * mult)] * config.num_res_blocks
        if level < len(config.dim_mult) - 1:
            layers.append(("resample", "downsample3d" if config.temperal_downsample[level] else "downsample2d"))
    return layers


class Encoder(nn.Module):
    config: QwenVAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, d = self.config, self.dtype
        h = CausalConv3d(c.base_dim, (3, 3, 3), d, name="conv_in")(x)
        for index, (kind, arg) in enumerate(encoder_layers(c)):
            name = f"down_blocks_{index}"
            h = (ResidualBlock(arg, d, name=name) if kind == "residual" else Resample(arg, d, name=name))(h)
        h = MidBlock(d, name="mid_block")(h)
        return head(h, 2 * c.z_dim, d)


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then a Resample unless `mode` is None (the last level)."""
    features: int
    num_layers: int
    mode: str | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResidualBlock(self.features, self.dtype, name=f"resnets_{j}")(x)
        return x if self.mode is None else Resample(self.mode, self.dtype, name="upsamplers_0")(x)


class Decoder(nn.Module):
    config: QwenVAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, d = self.config, self.dtype
        h = CausalConv3d(c.base_dim * c.dim_mult[-1], (3, 3, 3), d, name="conv_in")(z)
        h = MidBlock(d, name="mid_block")(h)
        upsample_3d, last = c.temperal_downsample[::-1], len(c.dim_mult) - 1
        for i, mult in enumerate(c.dim_mult[::-1]):
            mode = None if i == last else ("upsample3d" if upsample_3d[i] else "upsample2d")
            h = UpBlock(c.base_dim * mult, c.num_res_blocks + 1, mode, d, name=f"up_blocks_{i}")(h)
        return head(h, c.input_channels, d)


class QwenImageVAE(nn.Module):
    """`encode`: images (B, H, W, input_channels), H and W multiples of `downscale` -> (mean, logvar) of the
    raw posterior, each (B, H / downscale, W / downscale, z_dim), logvar clamped to [-30, 20] as diffusers
    does; `decode`: raw latents -> images clamped to [-1, 1] (diffusers' decode clamps). Apply with `method=`."""
    config: QwenVAEConfig
    dtype: Any = jnp.float32  # compute dtype; parameters keep their own dtype

    def setup(self):
        c, d = self.config, self.dtype
        self.encoder = Encoder(c, d)
        self.decoder = Decoder(c, d)
        self.quant_conv = CausalConv3d(2 * c.z_dim, (1, 1, 1), d)
        self.post_quant_conv = CausalConv3d(c.z_dim, (1, 1, 1), d)

    def encode(self, images):
        _check_input("images", images, self.config.input_channels, self.config.downscale)
        moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents):
        _check_input("latents", latents, self.config.z_dim, 1)
        images = self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)
        return jnp.clip(images, -1.0, 1.0)

    def __call__(self, images):
        return self.decode(self.encode(images)[0])


def _check_input(what: str, array, channels: int, multiple: int) -> None:
    if array.ndim != 4 or array.shape[-1] != channels or array.shape[1] % multiple or array.shape[2] % multiple \
            or 0 in array.shape[1:3]:
        sides = f", H and W positive multiples of {multiple}" if multiple > 1 else ""
        raise ValueError(f"QwenImageVAE {what} {tuple(array.shape)}: expected (B, H, W, {channels}){sides}")


def _latent_stats(config: QwenVAEConfig):
    return jnp.asarray(config.latents_mean, jnp.float32), jnp.asarray(config.latents_std, jnp.float32)


def encode_latents(module: QwenImageVAE, params, images):
    """Images in [-1, 1] -> the denoiser's latents: the posterior mean (the pipelines' sample_mode='argmax'),
    normalised per channel, (z - latents_mean) / latents_std."""
    mean, _ = module.apply({"params": params}, images, method=QwenImageVAE.encode)
    latents_mean, latents_std = _latent_stats(module.config)
    return (mean - latents_mean) / latents_std


def decode_latents(module: QwenImageVAE, params, latents):
    """The denoiser's latents -> images in [-1, 1]: z = latents * latents_std + latents_mean, decoded, clamped."""
    _check_input("latents", latents, module.config.z_dim, 1)
    latents_mean, latents_std = _latent_stats(module.config)
    z = latents.astype(jnp.float32) * latents_std + latents_mean
    return module.apply({"params": params}, z, method=QwenImageVAE.decode)


def init_params(config: QwenVAEConfig, key):
    """Random parameters (Flax default initialisers), fp32."""
    side = config.downscale
    return QwenImageVAE(config).init(key, jnp.zeros((1, side, side, config.input_channels)))["params"]


def param_shapes(config: QwenVAEConfig):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
