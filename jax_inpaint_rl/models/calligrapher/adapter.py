"""Calligrapher's image-prompt adapter in Flax Linen: the image projection and the Flux transformer with
image-prompt attention in every block.

Image projection (SigLIP pooled embedding (B, E) -> image tokens (B, T, C), T = num_tokens,
C = the transformer's joint_attention_dim), two modules whose outputs are summed:
- `mlp`: Linear(E -> 2E), exact GELU, Linear(2E -> T C), reshape (B, T, C), LayerNorm(C);
- `qformer` (optional, `use_qformer`): learned queries (T, C); `id_proj` (Linear(E -> 2E), exact
  GELU, Linear(2E -> Q C)) gives Q key / value tokens; torch.nn.MultiheadAttention (C, `qformer_heads`
  heads, its packed q | k | v projection kept packed as `in_proj`); LayerNorm(attention + queries); a
  final LayerNorm.
The release sums both (`use_qformer=True`); the seeds' RL fork trains the MLP alone.

Image-prompt attention, in each of the transformer's double- and single-stream blocks:
`to_k_ip`, `to_v_ip` (Linear(C -> heads x head_dim), no bias) project the image tokens; the keys
are RMS-normalised per head (eps 1e-5, no scale); the query is the block's image query after its
norm_q and before RoPE (single blocks: the joint text + image query); the image tokens get no RoPE;
a separate softmax over the T image tokens. Its output, times `ip_scale`, is added to the image
stream's attention output before `to_out` in double blocks (so it passes the gate), and to the
whole joint attention output (text and image tokens) before `proj_out` in single blocks.

`IPFluxTransformer` is the Flux transformer (models/flux/transformer.py) with these attention
sub-modules in its blocks: same parameter names, plus `attn/to_k_ip` and `attn/to_v_ip` in both
scanned block stacks. The family stores the adapter apart from the Flux weights (`split_ip` / `join_ip`).
"""
import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_inpaint_rl.models.flux import transformer as ft
from jax_inpaint_rl.models.flux.transformer import FluxConfig
from jax_inpaint_rl.models.layers.siglip import PackedAttention

IP_NAMES = ("to_k_ip", "to_v_ip")
STACKS = {"double": "double_blocks", "single": "single_blocks"}  # adapter tree name -> transformer stack


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    num_tokens: int = 128  # image tokens T
    image_embed_dim: int = 1152  # SigLIP pooled width E
    use_qformer: bool = True  # the release sums MLP + Q-Former; the seeds' RL fork trains the MLP alone
    qformer_heads: int = 8
    qformer_query_tokens: int = 32  # key / value tokens Q of the Q-Former's attention
    ip_scale: float = 1.0  # weight of the image-prompt attention (the release's `scale`)
    ip_norm_eps: float = 1e-5  # RMS norm of the image keys

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "adapter config") -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown adapter config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**{k: v for k, v in config.items() if k in known})


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch.nn.GELU()


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)  # torch.nn.LayerNorm's default eps


class MLPProjection(nn.Module):
    config: AdapterConfig
    width: int  # C
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embeds):
        c = self.config
        x = nn.Dense(2 * c.image_embed_dim, dtype=self.dtype, name="proj_0")(embeds.astype(self.dtype))
        x = nn.Dense(c.num_tokens * self.width, dtype=self.dtype, name="proj_2")(_gelu(x))
        return _layer_norm("norm")(x.reshape(x.shape[0], c.num_tokens, self.width))


class QFormerProjection(nn.Module):
    config: AdapterConfig
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embeds):
        c, width = self.config, self.width
        queries = self.param("query_embeds", nn.initializers.normal(1.0), (c.num_tokens, width), jnp.float32)
        queries = jnp.broadcast_to(queries.astype(self.dtype), (embeds.shape[0], c.num_tokens, width))
        kv = nn.Dense(2 * c.image_embed_dim, dtype=self.dtype, name="id_proj_0")(embeds.astype(self.dtype))
        kv = nn.Dense(c.qformer_query_tokens * width, dtype=self.dtype, name="id_proj_2")(_gelu(kv))
        kv = kv.reshape(kv.shape[0], c.qformer_query_tokens, width)
        attended = PackedAttention(width, c.qformer_heads, self.dtype, name="cross_attn")(queries, kv)
        x = _layer_norm("cross_attn_norm")(attended.astype(jnp.float32) + queries.astype(jnp.float32))
        return _layer_norm("norm")(x)


class ImageProjection(nn.Module):
    """(B, E) pooled image embeddings -> (B, T, C) image tokens: mlp (+ qformer)."""
    config: AdapterConfig
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embeds):
        if embeds.ndim != 2 or embeds.shape[-1] != self.config.image_embed_dim:
            raise ValueError(f"image projection: embeddings {embeds.shape}: expected (B, "
                             f"{self.config.image_embed_dim}) (the image encoder's pooled output)")
        tokens = MLPProjection(self.config, self.width, self.dtype, name="mlp")(embeds)
        if self.config.use_qformer:
            tokens = tokens + QFormerProjection(self.config, self.width, self.dtype, name="qformer")(embeds)
        return tokens


# --- image-prompt attention ---------------------------------------------------------------------------

def rms_norm(x, eps: float):
    """RMS norm over the last axis without a scale (torch RMSNorm, elementwise_affine=False), in fp32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)).astype(x.dtype)


def ip_heads(ip_tokens, heads: int, head_dim: int, dtype):
    """Keys (RMS-normed) and values of the image tokens, (B, T, heads, head_dim); call inside a compact method."""
    split = lambda y: y.reshape(*y.shape[:-1], heads, head_dim)  # noqa: E731
    k = split(nn.Dense(heads * head_dim, use_bias=False, dtype=dtype, name="to_k_ip")(ip_tokens))
    v = split(nn.Dense(heads * head_dim, use_bias=False, dtype=dtype, name="to_v_ip")(ip_tokens))
    return k, v


class _IPDoubleAttention(nn.Module):
    """Flux's double-stream attention (same parameters) plus the image-prompt term on the image stream."""
    heads: int
    head_dim: int
    adapter: AdapterConfig
    dtype: Any

    @nn.compact
    def __call__(self, img, txt, cos, sin, ip_tokens):
        check_ip_tokens(ip_tokens, img.shape[0], ip_tokens.shape[-1])
        ip_tokens = ip_tokens.astype(self.dtype)
        img_q, img_k, img_v = ft.qkv_heads(img, self.heads, self.head_dim, self.dtype, ft.IMG_NAMES)
        txt_q, txt_k, txt_v = ft.qkv_heads(txt, self.heads, self.head_dim, self.dtype, ft.TXT_NAMES)
        ip_k, ip_v = ip_heads(ip_tokens, self.heads, self.head_dim, self.dtype)
        ip = ft.attention(img_q, rms_norm(ip_k, self.adapter.ip_norm_eps), ip_v)  # query: after norm_q, no RoPE
        q = ft.apply_rope(jnp.concatenate([txt_q, img_q], axis=1), cos, sin)
        k = ft.apply_rope(jnp.concatenate([txt_k, img_k], axis=1), cos, sin)
        out = ft.attention(q, k, jnp.concatenate([txt_v, img_v], axis=1))
        out = out.reshape(*out.shape[:2], -1)
        text_len, dim = txt.shape[1], img.shape[-1]
        img_attn = out[:, text_len:] + self.adapter.ip_scale * ip.reshape(*ip.shape[:2], -1).astype(out.dtype)
        img_out = nn.Dense(dim, dtype=self.dtype, name="to_out")(img_attn)
        txt_out = nn.Dense(dim, dtype=self.dtype, name="to_add_out")(out[:, :text_len])
        return img_out, txt_out


class _IPSingleAttention(nn.Module):
    heads: int
    head_dim: int
    adapter: AdapterConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, ip_tokens):
        ip_tokens = ip_tokens.astype(self.dtype)
        q, k, v = ft.qkv_heads(x, self.heads, self.head_dim, self.dtype)
        ip_k, ip_v = ip_heads(ip_tokens, self.heads, self.head_dim, self.dtype)
        ip = ft.attention(q, rms_norm(ip_k, self.adapter.ip_norm_eps), ip_v)
        out = ft.attention(ft.apply_rope(q, cos, sin), ft.apply_rope(k, cos, sin), v)
        out = out + self.adapter.ip_scale * ip.astype(out.dtype)
        return out.reshape(*out.shape[:2], -1)


def IPFluxTransformer(config: FluxConfig, adapter: AdapterConfig, dtype: Any = jnp.float32,  # noqa: N802
                      remat: bool = False) -> ft.FluxTransformer:
    """The Flux transformer whose blocks' attention adds the image-prompt term; apply it with
    extra=(ip_tokens,), ip_tokens (B, T, joint_attention_dim)."""
    return ft.FluxTransformer(config, dtype, remat, double_attention=functools.partial(_IPDoubleAttention,
                                                                                       adapter=adapter),
                              single_attention=functools.partial(_IPSingleAttention, adapter=adapter))


def check_ip_tokens(ip_tokens, batch: int, width: int):
    if ip_tokens.ndim != 3 or ip_tokens.shape[0] != batch or ip_tokens.shape[-1] != width:
        raise ValueError(f"image-prompt attention: image tokens {ip_tokens.shape}: expected ({batch}, T, {width})")


# --- the adapter apart from the Flux weights ---------------------------------------------------------

def split_ip(tree):
    """IPFluxTransformer params -> (Flux transformer params, {'double' | 'single': {to_k_ip, to_v_ip}})."""
    transformer, ip = dict(tree), {}
    for name, stack in STACKS.items():
        attn = dict(tree[stack]["attn"])
        ip[name] = {key: attn.pop(key) for key in IP_NAMES}
        transformer[stack] = {**tree[stack], "attn": attn}
    return transformer, ip


def join_ip(transformer, ip):
    """The inverse of `split_ip`: the IPFluxTransformer parameter tree (no copies: a tree of references)."""
    tree = dict(transformer)
    for name, stack in STACKS.items():
        tree[stack] = {**transformer[stack], "attn": {**transformer[stack]["attn"], **ip[name]}}
    return tree


def example_tokens(config: FluxConfig, adapter: AdapterConfig, batch: int = 1):
    return jnp.zeros((batch, adapter.num_tokens, config.joint_attention_dim))


def param_shapes(config: FluxConfig, adapter: AdapterConfig):
    """{'image_proj': ..., 'ip_attention': ...} as jax.ShapeDtypeStruct (never allocated; works at full size)."""
    key = jax.random.key(0)
    projection = ImageProjection(adapter, config.joint_attention_dim)
    image_proj = jax.eval_shape(lambda: projection.init(key, jnp.zeros((1, adapter.image_embed_dim)))["params"])
    model = IPFluxTransformer(config, adapter)
    tree = jax.eval_shape(lambda: model.init(key, **ft.example_inputs(config),
                                             extra=(example_tokens(config, adapter),))["params"])
    return {"image_proj": image_proj, "ip_attention": split_ip(tree)[1]}
