"""CLIP ViT vision tower with its projection (transformers' CLIPVisionModelWithProjection), Linen.

Input: pixel values (B, H, W, 3), already resized to `image_size` and normalised
with CLIP's mean / std (see `rewards.clip_score.preprocess`). Output: the projected
image embedding (B, projection_dim) (not L2-normalised) and the last hidden state
(B, 1 + patches, hidden_size). Parameter names follow transformers' module names
so the converter's key table reads one-to-one; `tools/convert_weights/clip.py`
produces them.
"""
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ClipVisionConfig":
        """From a CLIPVisionConfig dict (or a CLIPConfig dict's 'vision_config'); other keys are training-only."""
        names = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in config.items() if k in names})
        if not isinstance(out.image_size, int) or not isinstance(out.patch_size, int):
            raise ValueError(f"clip vision: square images only; got image_size={out.image_size}, patch_size={out.patch_size}")
        if out.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"clip vision: hidden_act {out.hidden_act!r} not supported; known: {sorted(_ACTIVATIONS)}")
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(f"clip vision: hidden_size {out.hidden_size} is not a multiple of {out.num_attention_heads} heads")
        return out


class Attention(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads = self.config.num_attention_heads
        batch, length, width = x.shape
        head_dim = width // heads

        def project(name: str) -> jax.Array:
            return nn.Dense(width, dtype=self.dtype, name=name)(x).reshape(batch, length, heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


class Mlp(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _ACTIVATIONS[self.config.hidden_act](x)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class EncoderLayer(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        x = x + Attention(self.config, self.dtype, name="self_attn")(nn.LayerNorm(eps, dtype=jnp.float32, name="layer_norm1")(x))
        return x + Mlp(self.config, self.dtype, name="mlp")(nn.LayerNorm(eps, dtype=jnp.float32, name="layer_norm2")(x))


class Embeddings(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        patch = (c.patch_size, c.patch_size)
        x = nn.Conv(c.hidden_size, patch, strides=patch, padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding")(pixels)
        x = x.reshape(x.shape[0], -1, c.hidden_size)  # row-major patches, as torch's flatten(2)
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        position_embedding = self.param("position_embedding", nn.initializers.normal(0.02), (num_positions, c.hidden_size))
        cls = jnp.broadcast_to(class_embedding.astype(x.dtype), (x.shape[0], 1, c.hidden_size))
        return jnp.concatenate([cls, x], axis=1) + position_embedding.astype(x.dtype)


class ClipVision(nn.Module):
    """pixels (B, S, S, 3) -> (image_embeds (B, projection_dim), last_hidden_state (B, 1 + N, hidden))."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixels.shape[1:] != expected:
            raise ValueError(f"clip vision: pixels must be (B, {c.image_size}, {c.image_size}, {c.num_channels}), got {pixels.shape}")
        x = Embeddings(c, self.dtype, name="embeddings")(pixels.astype(self.dtype))
        x = nn.LayerNorm(c.layer_norm_eps, dtype=jnp.float32, name="pre_layernorm")(x)
        for i in range(c.num_hidden_layers):
            x = EncoderLayer(c, self.dtype, name=f"layers_{i}")(x)
        pooled = nn.LayerNorm(c.layer_norm_eps, dtype=jnp.float32, name="post_layernorm")(x[:, 0])
        embeds = nn.Dense(c.projection_dim, use_bias=False, dtype=jnp.float32, name="visual_projection")(pooled)
        return embeds, x
