"""The Flux.1 transformer (diffusers' FluxTransformer2DModel) in Flax Linen.

One implementation serves Flux.1-dev / Kontext (64 input channels) and Fill (384:
latents + masked-image latents + packed mask); the variant is read from the
diffusers config. Parameter names follow diffusers so the converter's key table
stays readable; the 19 double-stream and 38 single-stream blocks are each an
`nn.scan` over parameters stacked on a leading layer axis, so a forward pass
compiles one block of each kind whatever the depth.

Inputs are channels-last token sequences: hidden (B, L, in_channels), text
(B, T, joint_attention_dim), pooled text (B, pooled_projection_dim), timestep =
sigma in [0, 1] (B,) (multiplied by 1000 inside, as diffusers does), guidance
scale (B,) for guidance-distilled checkpoints, position ids txt (T, 3) and
img (L, 3) shared by the batch.
"""
import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.layers.attention import attend

ROPE_THETA = 10000.0
TIME_CHANNELS = 256


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    patch_size: int = 1

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config") -> "FluxConfig":
        """Build from a diffusers transformer config.json dict (keys starting with '_' are metadata)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown Flux transformer config keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        values = {k: v for k, v in config.items() if k in known}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        made = cls(**values)
        if sum(made.axes_dims_rope) != made.attention_head_dim:
            raise ValueError(f"{source}: axes_dims_rope {made.axes_dims_rope} must sum to attention_head_dim "
                             f"{made.attention_head_dim}")
        if made.patch_size != 1:
            raise ValueError(f"{source}: patch_size={made.patch_size}; Flux checkpoints use 1 (2x2 packing is done "
                             "outside the transformer)")
        return made


def timestep_embedding(t, dim: int = TIME_CHANNELS, max_period: float = 10000.0):
    """Sinusoidal embedding [cos, sin] of (B,) values (diffusers Timesteps, flip_sin_to_cos, shift 0).

    Angles reach 1000 x guidance (3e4 for Fill's guidance 30), where one ulp of a
    frequency moves the angle by ~1e-3; frequencies are therefore host constants
    built as torch builds them (fp32 exponent), exponentiated in float64 and rounded
    once, rather than recomputed by XLA's fp32 exp.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def rope_tables(ids, axes_dims: tuple[int, ...], theta: float = ROPE_THETA):
    """(S, n_axes) position ids -> cos, sin (S, head_dim), each frequency repeated for its (real, imag) pair."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
        angles = ids[:, axis].astype(jnp.float32)[:, None] * freqs[None, :]
        cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x, cos, sin):
    """Rotate (B, S, N, H) by angles whose pairs are adjacent channels (2i, 2i+1); math in fp32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x.astype(jnp.float32) * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


def layer_norm(x, eps: float = 1e-6):
    """Parameter-free LayerNorm computed in fp32 (all Flux LayerNorms have elementwise_affine=False)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """QK norm over the head dim (torch.nn.RMSNorm with a learned scale)."""
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers TimestepEmbedding and PixArtAlphaTextProjection)."""
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(1000 sigma)) [+ MLP(sinusoid(1000 guidance))] + MLP(pooled text)."""
    features: int
    guidance_embeds: bool
    dtype: Any

    @nn.compact
    def __call__(self, timestep, guidance, pooled):
        temb = MLPEmbedder(self.features, self.dtype, name="timestep_embedder")(
            timestep_embedding(timestep * 1000.0).astype(self.dtype))
        if self.guidance_embeds:
            temb = temb + MLPEmbedder(self.features, self.dtype, name="guidance_embedder")(
                timestep_embedding(guidance * 1000.0).astype(self.dtype))
        return temb + MLPEmbedder(self.features, self.dtype, name="text_embedder")(pooled.astype(self.dtype))


class Modulation(nn.Module):
    """SiLU(temb) -> Linear -> `chunks` per-sample vectors (the AdaLayerNorm* linear)."""
    chunks: int
    dtype: Any

    @nn.compact
    def __call__(self, temb):
        dim = temb.shape[-1]
        out = nn.Dense(self.chunks * dim, dtype=self.dtype, name="linear")(nn.silu(temb))
        return jnp.split(out, self.chunks, axis=-1)


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, named as diffusers' FeedForward (net.0.proj, net.2)."""
    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4 * self.dim, dtype=self.dtype, name="net_0_proj")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(nn.gelu(x, approximate=True))


def attention(q, k, v):
    """(B, S, N, H) scaled dot-product attention, softmax in fp32, with the kernel model.attention selects."""
    return attend(q, k, v)


IMG_NAMES = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
TXT_NAMES = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


def qkv_heads(x, heads: int, head_dim: int, dtype, names=IMG_NAMES):
    """Q, K, V projections split into heads, Q and K RMS-normed; call inside a compact method (names its params)."""
    split = lambda y: y.reshape(*y.shape[:-1], heads, head_dim)  # noqa: E731
    q, k, v = (split(nn.Dense(heads * head_dim, dtype=dtype, name=n)(x)) for n in names[:3])
    return RMSNorm(name=names[3])(q), RMSNorm(name=names[4])(k), v


class DoubleBlock(nn.Module):
    """Separate weights for the text and image streams, one joint attention over [text, image].

    `attention` replaces the attention sub-module (a class taking heads=, head_dim=, dtype=, name=; an
    adapter such as Calligrapher's adds a term with the same parameter names plus its own), which receives
    the block's `extra` inputs after (img, txt, cos, sin)."""
    config: FluxConfig
    dtype: Any
    attention: Any = None

    @nn.compact
    def __call__(self, carry, temb, cos, sin, *extra):
        txt, img = carry
        c = self.config
        dim = c.inner_dim
        img_shift, img_scale, img_gate, img_shift_mlp, img_scale_mlp, img_gate_mlp = Modulation(
            6, self.dtype, name="norm1")(temb)
        txt_shift, txt_scale, txt_gate, txt_shift_mlp, txt_scale_mlp, txt_gate_mlp = Modulation(
            6, self.dtype, name="norm1_context")(temb)

        attn = (self.attention or _DoubleAttention)(heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                                                    dtype=self.dtype, name="attn")
        img_attn, txt_attn = attn(modulate(layer_norm(img), img_shift, img_scale),
                                  modulate(layer_norm(txt), txt_shift, txt_scale), cos, sin, *extra)

        img = img + img_gate[:, None] * img_attn
        img_ff = FeedForward(dim, self.dtype, name="ff")(modulate(layer_norm(img), img_shift_mlp, img_scale_mlp))
        img = img + img_gate_mlp[:, None] * img_ff

        txt = txt + txt_gate[:, None] * txt_attn
        txt_ff = FeedForward(dim, self.dtype, name="ff_context")(
            modulate(layer_norm(txt), txt_shift_mlp, txt_scale_mlp))
        txt = txt + txt_gate_mlp[:, None] * txt_ff
        return (txt, img), None


class _DoubleAttention(nn.Module):
    heads: int
    head_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, img, txt, cos, sin):
        img_q, img_k, img_v = qkv_heads(img, self.heads, self.head_dim, self.dtype, IMG_NAMES)
        txt_q, txt_k, txt_v = qkv_heads(txt, self.heads, self.head_dim, self.dtype, TXT_NAMES)
        q = apply_rope(jnp.concatenate([txt_q, img_q], axis=1), cos, sin)
        k = apply_rope(jnp.concatenate([txt_k, img_k], axis=1), cos, sin)
        out = attention(q, k, jnp.concatenate([txt_v, img_v], axis=1))
        out = out.reshape(*out.shape[:2], -1)
        text_len, dim = txt.shape[1], img.shape[-1]
        img_out = nn.Dense(dim, dtype=self.dtype, name="to_out")(out[:, text_len:])
        txt_out = nn.Dense(dim, dtype=self.dtype, name="to_add_out")(out[:, :text_len])
        return img_out, txt_out


class _SingleAttention(nn.Module):
    """Only the projections: the single block's attention output goes through its shared proj_out."""
    heads: int
    head_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin):
        q, k, v = qkv_heads(x, self.heads, self.head_dim, self.dtype)
        out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return out.reshape(*out.shape[:2], -1)


class SingleBlock(nn.Module):
    """One stream over [text, image]: attention and MLP in parallel, one output projection; `attention` as in
    DoubleBlock (it receives (x, cos, sin, *extra))."""
    config: FluxConfig
    dtype: Any
    attention: Any = None

    @nn.compact
    def __call__(self, x, temb, cos, sin, *extra):
        c = self.config
        shift, scale, gate = Modulation(3, self.dtype, name="norm")(temb)
        normed = modulate(layer_norm(x), shift, scale)
        mlp = nn.gelu(nn.Dense(4 * c.inner_dim, dtype=self.dtype, name="proj_mlp")(normed), approximate=True)
        attn = (self.attention or _SingleAttention)(heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                                                    dtype=self.dtype, name="attn")(normed, cos, sin, *extra)
        out = nn.Dense(c.inner_dim, dtype=self.dtype, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        return x + gate[:, None] * out, None


def stack_blocks(block_cls, length: int, remat: bool, broadcast: int = 3):
    """`length` copies of a block as one scanned module (params on a leading layer axis); the `broadcast`
    inputs after the carry (temb, RoPE tables, extras) are the same for every layer."""
    if remat:
        block_cls = nn.remat(block_cls, prevent_cse=False)
    return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * broadcast, length=length)


class FluxTransformer(nn.Module):
    config: FluxConfig
    dtype: Any = jnp.float32  # compute dtype; parameters keep their own dtype
    remat: bool = False  # rematerialise each block in the backward pass
    double_attention: Any = None  # the blocks' attention sub-modules (DoubleBlock / SingleBlock `attention`)
    single_attention: Any = None

    @nn.compact
    def __call__(self, hidden, text, pooled, timestep, img_ids, txt_ids, guidance=None, extra=()):
        """`extra`: inputs every block's attention receives (e.g. an adapter's image tokens)."""
        c = self.config
        _check_inputs(c, hidden, text, pooled, timestep, img_ids, txt_ids, guidance)
        img = nn.Dense(c.inner_dim, dtype=self.dtype, name="x_embedder")(hidden.astype(self.dtype))
        txt = nn.Dense(c.inner_dim, dtype=self.dtype, name="context_embedder")(text.astype(self.dtype))
        temb = TimeTextEmbed(c.inner_dim, c.guidance_embeds, self.dtype, name="time_text_embed")(
            timestep, guidance, pooled)
        cos, sin = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=0), c.axes_dims_rope)

        broadcast = 3 + len(extra)
        double = stack_blocks(DoubleBlock, c.num_layers, self.remat, broadcast)(c, self.dtype, self.double_attention,
                                                                          name="double_blocks")
        (txt, img), _ = double((txt, img), temb, cos, sin, *extra)
        single = stack_blocks(SingleBlock, c.num_single_layers, self.remat, broadcast)(
            c, self.dtype, self.single_attention, name="single_blocks")
        joint, _ = single(jnp.concatenate([txt, img], axis=1), temb, cos, sin, *extra)
        img = joint[:, txt.shape[1]:]

        scale, shift = Modulation(2, self.dtype, name="norm_out")(temb)
        img = modulate(layer_norm(img), shift, scale)
        return nn.Dense(c.output_channels, dtype=self.dtype, name="proj_out")(img)


def _check_inputs(c: FluxConfig, hidden, text, pooled, timestep, img_ids, txt_ids, guidance):
    problems = []
    if hidden.ndim != 3 or hidden.shape[-1] != c.in_channels:
        problems.append(f"hidden states {hidden.shape}: expected (B, L, {c.in_channels})")
    if text.ndim != 3 or text.shape[-1] != c.joint_attention_dim:
        problems.append(f"text states {text.shape}: expected (B, T, {c.joint_attention_dim})")
    if pooled.ndim != 2 or pooled.shape[-1] != c.pooled_projection_dim:
        problems.append(f"pooled text {pooled.shape}: expected (B, {c.pooled_projection_dim})")
    if timestep.shape != hidden.shape[:1]:
        problems.append(f"timestep {timestep.shape}: expected ({hidden.shape[0]},)")
    if img_ids.shape != (hidden.shape[1], len(c.axes_dims_rope)):
        problems.append(f"img_ids {img_ids.shape}: expected ({hidden.shape[1]}, {len(c.axes_dims_rope)})")
    if txt_ids.shape != (text.shape[1], len(c.axes_dims_rope)):
        problems.append(f"txt_ids {txt_ids.shape}: expected ({text.shape[1]}, {len(c.axes_dims_rope)})")
    if c.guidance_embeds and (guidance is None or guidance.shape != hidden.shape[:1]):
        problems.append(f"guidance {None if guidance is None else guidance.shape}: this checkpoint embeds the "
                        f"guidance scale, expected ({hidden.shape[0]},)")
    if problems:
        raise ValueError("FluxTransformer inputs: " + "; ".join(problems))


def example_inputs(config: FluxConfig, batch: int = 1, image_tokens: int = 4, text_tokens: int = 2):
    """Zero inputs of the right shapes (for init and eval_shape)."""
    axes = len(config.axes_dims_rope)
    return dict(
        hidden=jnp.zeros((batch, image_tokens, config.in_channels)),
        text=jnp.zeros((batch, text_tokens, config.joint_attention_dim)),
        pooled=jnp.zeros((batch, config.pooled_projection_dim)),
        timestep=jnp.zeros((batch,)),
        img_ids=jnp.zeros((image_tokens, axes)),
        txt_ids=jnp.zeros((text_tokens, axes)),
        guidance=jnp.zeros((batch,)) if config.guidance_embeds else None,
    )


def init_params(config: FluxConfig, key):
    """Random parameters (Flax default initialisers), fp32."""
    return FluxTransformer(config).init(key, **example_inputs(config))["params"]


def param_shapes(config: FluxConfig):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating (works for the 12B model)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
