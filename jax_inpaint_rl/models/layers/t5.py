"""T5 v1.1 encoder (transformers' T5EncoderModel) in Flax Linen, and its tokenizer.

Flux and SD3 use only the encoder's last hidden state, computed over the full
padded sequence without an attention mask (as their diffusers pipelines do).
Blocks differ only in that the first one owns the relative-position bias table;
here that table is a top-level parameter and the bias is computed once and fed to
every block, so the blocks are identical and run as one `nn.scan`.
"""
import dataclasses
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], source: str = "config") -> "T5Config":
        """Pick the encoder fields out of a transformers T5 config.json dict."""
        fields = {f.name for f in dataclasses.fields(cls)}
        made = cls(**{k: v for k, v in config.items() if k in fields})
        if made.feed_forward_proj != "gated-gelu":
            raise ValueError(f"{source}: feed_forward_proj={made.feed_forward_proj!r}; only T5 v1.1 "
                             "('gated-gelu') is supported")
        return made


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) bidirectional bucket index of (key position - query position), as in Mesh TF / HF."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int32) * half
    distance = np.abs(relative)
    max_exact = half // 2
    safe = np.maximum(distance, 1).astype(np.float32)  # distance 0 takes the exact branch below
    large = max_exact + (np.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).astype(np.int32)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


def rms_norm(x, scale, eps: float):
    """T5LayerNorm: no mean subtraction, variance in fp32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * normed).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32), self.eps)


class Block(nn.Module):
    """Pre-norm self-attention (unscaled logits + position bias) and gated-GELU feed-forward."""
    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        inner = c.num_heads * c.d_kv
        heads = lambda y: y.reshape(*y.shape[:-1], c.num_heads, c.d_kv)  # noqa: E731
        h = LayerNorm(c.layer_norm_epsilon, name="attn_norm")(x)
        q, k, v = (heads(dense(inner, n)(h)) for n in ("q", "k", "v"))
        attn = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0, implementation=None)
        x = x + dense(c.d_model, "o")(attn.reshape(*attn.shape[:2], inner))
        h = LayerNorm(c.layer_norm_epsilon, name="ff_norm")(x)
        gated = nn.gelu(dense(c.d_ff, "wi_0")(h), approximate=True) * dense(c.d_ff, "wi_1")(h)
        return x + dense(c.d_model, "wo")(gated), None


class T5Encoder(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        """(B, T) int token ids -> (B, T, d_model) last hidden state."""
        c = self.config
        if ids.ndim != 2:
            raise ValueError(f"T5 token ids {ids.shape}: expected (batch, length)")
        x = nn.Embed(c.vocab_size, c.d_model, name="embed_tokens")(ids).astype(self.dtype)
        table = self.param("relative_attention_bias", nn.initializers.normal(1.0),
                           (c.relative_attention_num_buckets, c.num_heads), jnp.float32)
        buckets = relative_position_buckets(ids.shape[1], c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, heads, T, T)
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=c.num_layers)(c, self.dtype, name="blocks")
        x, _ = blocks(x, bias)
        return LayerNorm(c.layer_norm_epsilon, name="final_norm")(x)


def load_tokenizer(folder: str | os.PathLike):
    """transformers' T5TokenizerFast from a tokenizer folder (tokenizer.json / spiece.model); never torch."""
    from transformers import T5TokenizerFast

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: T5 tokenizer folder not found")
    return T5TokenizerFast.from_pretrained(os.fspath(folder))


def tokenize(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """Pad / truncate to `max_length` as the Flux pipelines do -> (B, max_length) int32."""
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")
    return out["input_ids"].astype(np.int32)


def param_shapes(config: T5Config):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating."""
    return jax.eval_shape(lambda: T5Encoder(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
