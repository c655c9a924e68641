"""SigLIP vision tower (transformers' SiglipVisionModel) in Flax Linen: the image encoder of Calligrapher.

Input: pixel values (B, S, S, 3) with S = `image_size`, normalised as SigLIP's image
processor does (mean = std = 0.5, i.e. [0, 1] -> [-1, 1]: the range our images already
have). Output: `pooler_output` (B, hidden_size) from the attention-pooling head, and the
last hidden state (B, patches, hidden_size) after the post-LayerNorm.

Structure (transformers' names, so the converter's key table reads one-to-one):
- embeddings: a patch Conv (kernel = stride = patch_size, VALID: with 384 px and
  patch 14 the last 6 rows / columns are never seen, as in torch) + learned positions;
- encoder: `num_hidden_layers` pre-LN blocks (self-attention, MLP with tanh-GELU), one
  `nn.scan` over parameters stacked on a leading layer axis (`layers/...`);
- post_layernorm, then the head: one learned probe token attends to every patch
  (torch.nn.MultiheadAttention, its packed q/k/v projection kept packed as `in_proj`),
  then a residual MLP after a LayerNorm; the probe's output is the pooled embedding.

Defaults are transformers' SiglipVisionConfig defaults (a saved config may omit a
field equal to them); `SO400M` is google/siglip-so400m-patch14-384's vision tower.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_inpaint_rl.models.layers.attention import attend

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    @property
    def grid(self) -> int:
        """Patches per side (VALID convolution: the remainder of image_size / patch_size is not seen)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], source: str = "config") -> "SiglipVisionConfig":
        """From a SiglipVisionConfig config.json dict, or a SiglipConfig one (its 'vision_config')."""
        if "vision_config" in config:
            config = config["vision_config"] or {}
        names = {f.name for f in dataclasses.fields(cls)}
        made = cls(**{k: v for k, v in config.items() if k in names})
        problems = []
        if not isinstance(made.image_size, int) or not isinstance(made.patch_size, int):
            problems.append(f"image_size={made.image_size}, patch_size={made.patch_size}: square sizes (ints) only")
        if made.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act={made.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        if made.hidden_size % made.num_attention_heads:
            problems.append(f"hidden_size={made.hidden_size} is not a multiple of num_attention_heads="
                            f"{made.num_attention_heads}")
        if problems:
            raise ValueError(f"{source}: SigLIP vision config not supported: " + "; ".join(problems))
        return made


# google/siglip-so400m-patch14-384 (Calligrapher's image encoder): 27 layers of width 1152, 16 heads
SO400M = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=384, patch_size=14)


def _attend(q, k, v, heads: int):
    """(B, Lq, D), (B, Lk, D), (B, Lk, D) -> (B, Lq, D): softmax(q k^T / sqrt(d)) v per head, softmax in fp32."""
    split = lambda x: x.reshape(*x.shape[:2], heads, x.shape[-1] // heads)  # noqa: E731
    out = attend(split(q), split(k), split(v))
    return out.reshape(*out.shape[:2], -1)


class Mlp(nn.Module):
    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[self.config.hidden_act](x)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class SelfAttention(nn.Module):
    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = self.config.hidden_size
        q, k, v = (nn.Dense(width, dtype=self.dtype, name=name)(x) for name in ("q_proj", "k_proj", "v_proj"))
        out = _attend(q, k, v, self.config.num_attention_heads)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


def _norm(config: SiglipVisionConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then + mlp(LN2(x)); scanned (carry = hidden states)."""
    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, _):
        c = self.config
        x = x + SelfAttention(c, self.dtype, name="self_attn")(_norm(c, "layer_norm1")(x).astype(self.dtype))
        x = x + Mlp(c, self.dtype, name="mlp")(_norm(c, "layer_norm2")(x).astype(self.dtype))
        return x, None


class PoolingHead(nn.Module):
    """torch.nn.MultiheadAttention pooling: a learned probe attends to the tokens, then LN + residual MLP."""
    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        width = c.hidden_size
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, width), jnp.float32)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, width))
        pooled = PackedAttention(width, c.num_attention_heads, self.dtype, name="attention")(probe, x)
        normed = _norm(c, "layernorm")(pooled).astype(self.dtype)
        pooled = pooled + Mlp(c, self.dtype, name="mlp")(normed)
        return pooled[:, 0]


class PackedAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first, key = value): `in_proj` (D, 3D) packing q | k | v, `out_proj`."""
    width: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, context):
        in_proj = nn.Dense(3 * self.width, dtype=self.dtype, name="in_proj")
        w = self.width
        q = in_proj(query)[..., :w]
        packed = in_proj(context)
        k, v = packed[..., w:2 * w], packed[..., 2 * w:]
        return nn.Dense(self.width, dtype=self.dtype, name="out_proj")(_attend(q, k, v, self.heads))


class SiglipVision(nn.Module):
    """pixels (B, S, S, 3) in [-1, 1] -> {'pooled': (B, hidden), 'last_hidden_state': (B, patches, hidden)}."""
    config: SiglipVisionConfig
    dtype: Any = jnp.float32  # compute dtype; LayerNorms and softmax in fp32

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(f"siglip vision: pixels {pixels.shape}: expected (B, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}) in [-1, 1]")
        x = _Embeddings(c, self.dtype, name="embeddings")(pixels.astype(self.dtype))
        layers = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=c.num_hidden_layers)(c, self.dtype, name="layers")
        x, _ = layers(x, None)
        x = _norm(c, "post_layernorm")(x)
        out = {"last_hidden_state": x}
        if c.vision_use_head:
            out["pooled"] = PoolingHead(c, self.dtype, name="head")(x.astype(self.dtype)).astype(jnp.float32)
        return out


class _Embeddings(nn.Module):
    config: SiglipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        patch = (c.patch_size, c.patch_size)
        x = nn.Conv(c.hidden_size, patch, strides=patch, padding="VALID", dtype=self.dtype,
                    name="patch_embedding")(pixels)
        x = x.reshape(x.shape[0], -1, c.hidden_size)  # row-major patches, as torch's flatten(2).transpose(1, 2)
        positions = nn.Embed(c.num_patches, c.hidden_size, name="position_embedding")(jnp.arange(c.num_patches))
        return x + positions.astype(x.dtype)[None]


def example_pixels(config: SiglipVisionConfig, batch: int = 1):
    return jnp.zeros((batch, config.image_size, config.image_size, config.num_channels))


def param_shapes(config: SiglipVisionConfig):
    """The parameter tree as jax.ShapeDtypeStruct (traced, never allocated)."""
    model = SiglipVision(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), example_pixels(config))["params"])


def encode(model: SiglipVision, params, pixels):
    """The pooled embedding (B, hidden_size), float32."""
    if not model.config.vision_use_head:
        raise ValueError("siglip vision: vision_use_head=False has no pooled output (Calligrapher reads it)")
    return model.apply({"params": params}, pixels)["pooled"]
