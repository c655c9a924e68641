"""The Qwen-Image MM-DiT (diffusers' QwenImageTransformer2DModel) in Flax Linen.

Every block is dual-stream (separate image and text weights, one joint attention over [text, image] with
RMS QK norm and a 3-axis RoPE), so the blocks are one `nn.scan` over parameters stacked on a leading axis,
named `transformer_blocks`; a forward pass compiles one block whatever the depth. Parameter names follow
diffusers so the converter's key table stays readable. Norms, RoPE and softmax run in fp32 as in the Flux port,
whose helpers this module imports.

Inputs: packed latents (B, L, in_channels) (2x2 patches packed by the pipeline); timestep (B,) = sigma in
[0, 1], as the pipeline passes it (timestep / 1000), multiplied by 1000 inside as diffusers does; text states
(B, T, joint_attention_dim) and their mask (B, T) (1 keeps a token, any pattern); `img_shapes`, static
(frame, h, w) patch grids in sequence order, shared by the batch: the target image first, then for
Qwen-Image-Edit each reference image (frame index = the image's place in the list). diffusers takes one list
per sample but builds RoPE from the first sample's only, so one shared list is all a batch can mean.
Output: (B, L, patch_size^2 out_channels), every image token (the pipeline keeps the target's).
"""
import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.flux.transformer import (IMG_NAMES, TXT_NAMES, FeedForward, MLPEmbedder, Modulation,
                                                    RMSNorm, apply_rope, layer_norm, modulate, qkv_heads, stack_blocks,
                                                    rope_tables, timestep_embedding)
from jax_inpaint_rl.models.layers.attention import attend

ROPE_THETA = 10000.0
UNSUPPORTED = ("use_additional_t_cond", "use_layer3d_rope")  # Qwen-Image-Layered's knobs, not ported


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    """diffusers' QwenImageTransformer2DModel arguments, with its defaults (a config.json may omit any)."""
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False  # adds no parameter in diffusers 0.42 (whose forward fails if given guidance)
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False  # reference-image tokens modulated as at timestep 0 (Qwen-Image-Edit-2511)
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """Channels of each output token: a packed patch_size x patch_size tile."""
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config") -> "QwenImageConfig":
        """Build from a diffusers transformer config.json dict (keys starting with '_' are metadata)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown Qwen-Image transformer config keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        values = {k: v for k, v in config.items() if k in known}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        made = cls(**values)
        problems = [f"{name}=True is not supported (Qwen-Image-Layered)" for name in UNSUPPORTED
                    if getattr(made, name)]
        if len(made.axes_dims_rope) != 3 or sum(made.axes_dims_rope) != made.attention_head_dim:
            problems.append(f"axes_dims_rope {made.axes_dims_rope} must be 3 sizes summing to attention_head_dim "
                            f"{made.attention_head_dim}")
        if any(d % 2 for d in made.axes_dims_rope):
            problems.append(f"axes_dims_rope {made.axes_dims_rope} must be even (rotations act on channel pairs)")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return made


def image_positions(img_shapes) -> np.ndarray:
    """(L, 3) RoPE positions (frame, row, column) of every image token, images in order, rows major.

    Frame: the image's index in `img_shapes` (plus its frame). Rows and columns are centred (diffusers'
    scale_rope): a side of n patches spans -(n - n // 2) .. n // 2 - 1."""
    grids = []
    for index, (frames, height, width) in enumerate(img_shapes):
        axes = (index + np.arange(frames), np.arange(height) - (height - height // 2),
                np.arange(width) - (width - width // 2))
        grids.append(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3))
    return np.concatenate(grids, axis=0)


def text_positions(img_shapes, text_len: int) -> np.ndarray:
    """(T, 3) RoPE positions of the text: the same index on all three axes, starting after the largest centred
    image half-side, max(h // 2, w // 2), so text and image positions never coincide."""
    start = max(max(height // 2, width // 2) for _, height, width in img_shapes)
    return np.repeat(start + np.arange(text_len)[:, None], 3, axis=1)


def image_tokens(img_shapes) -> int:
    return sum(math.prod(shape) for shape in img_shapes)


class JointAttention(nn.Module):
    """One attention over [text, image], per-stream projections, padding text keys masked out (diffusers'
    QwenDoubleStreamAttnProcessor2_0)."""
    heads: int
    head_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, img, txt, cos, sin, mask):
        img_q, img_k, img_v = qkv_heads(img, self.heads, self.head_dim, self.dtype, IMG_NAMES)
        txt_q, txt_k, txt_v = qkv_heads(txt, self.heads, self.head_dim, self.dtype, TXT_NAMES)
        joint = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
        out = attend(apply_rope(joint(txt_q, img_q), cos, sin), apply_rope(joint(txt_k, img_k), cos, sin),
                     joint(txt_v, img_v), mask=mask)
        out = out.reshape(*out.shape[:2], -1)
        text_len, dim = txt.shape[1], img.shape[-1]
        img_out = nn.Dense(dim, dtype=self.dtype, name="to_out")(out[:, text_len:])
        return img_out, nn.Dense(dim, dtype=self.dtype, name="to_add_out")(out[:, :text_len])


class TimestepEmbed(nn.Module):
    """temb = MLP(sinusoid(1000 sigma)) (diffusers' QwenTimestepProjEmbeddings: no text or guidance term)."""
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, sigma):
        return MLPEmbedder(self.features, self.dtype, name="timestep_embedder")(
            timestep_embedding(sigma * 1000.0).astype(self.dtype))


def per_token(vectors, target_tokens: int | None, length: int):
    """Per-sample modulation vectors -> (B, 1, D), or with zero_cond_t ((2B, D): the timestep's rows, then
    timestep 0's) -> (B, length, D): the first `target_tokens` tokens take the timestep's, the rest timestep 0's."""
    if target_tokens is None:
        return vectors[:, None]
    now, zero = jnp.split(vectors, 2, axis=0)
    is_target = (np.arange(length) < target_tokens)[None, :, None]
    return jnp.where(is_target, now[:, None], zero[:, None])


def sample_rows(temb, target_tokens: int | None):
    """The (B, D) rows of temb at the samples' own timesteps (under zero_cond_t, the first half of (2B, D))."""
    return temb if target_tokens is None else jnp.split(temb, 2, axis=0)[0]


class Block(nn.Module):
    """diffusers' QwenImageTransformerBlock: adaLN-zero modulated joint attention and MLPs, per stream.

    `target_tokens` (zero_cond_t): the image stream's modulation comes from temb for the target's tokens and
    from the timestep-0 embedding for the reference images after them; the text always uses temb."""
    config: QwenImageConfig
    dtype: Any
    target_tokens: int | None = None

    @nn.compact
    def __call__(self, carry, temb, cos, sin, mask):
        txt, img = carry
        c, d = self.config, self.dtype
        # image vectors are (B, 1, D) or, under zero_cond_t, (B, L, D): applied inline rather than by `modulate`
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = (
            per_token(v, self.target_tokens, img.shape[1]) for v in Modulation(6, d, name="img_mod")(temb))
        txt_shift, txt_scale, txt_gate, txt_shift_mlp, txt_scale_mlp, txt_gate_mlp = Modulation(
            6, d, name="txt_mod")(sample_rows(temb, self.target_tokens))

        img_attn, txt_attn = JointAttention(c.num_attention_heads, c.attention_head_dim, d, name="attn")(
            layer_norm(img) * (1 + scale) + shift, modulate(layer_norm(txt), txt_shift, txt_scale), cos, sin, mask)
        img = img + gate * img_attn
        txt = txt + txt_gate[:, None] * txt_attn

        img_ff = FeedForward(c.inner_dim, d, name="img_mlp")(layer_norm(img) * (1 + scale_mlp) + shift_mlp)
        txt_ff = FeedForward(c.inner_dim, d, name="txt_mlp")(modulate(layer_norm(txt), txt_shift_mlp, txt_scale_mlp))
        return (txt + txt_gate_mlp[:, None] * txt_ff, img + gate_mlp * img_ff), None


class QwenImageTransformer(nn.Module):
    config: QwenImageConfig
    dtype: Any = jnp.float32  # compute dtype; parameters keep their own dtype
    remat: bool = False  # rematerialise each block in the backward pass

    @nn.compact
    def __call__(self, hidden, timestep, text, text_mask, img_shapes):
        c = self.config
        img_shapes = tuple(tuple(int(n) for n in shape) for shape in img_shapes)
        _check_inputs(c, hidden, timestep, text, text_mask, img_shapes)
        img = nn.Dense(c.inner_dim, dtype=self.dtype, name="img_in")(hidden.astype(self.dtype))
        txt = RMSNorm(name="txt_norm")(text.astype(self.dtype))
        txt = nn.Dense(c.inner_dim, dtype=self.dtype, name="txt_in")(txt)

        target_tokens = math.prod(img_shapes[0]) if c.zero_cond_t else None
        sigma = timestep if target_tokens is None else jnp.concatenate([timestep, jnp.zeros_like(timestep)])
        temb = TimestepEmbed(c.inner_dim, self.dtype, name="time_text_embed")(sigma)  # (B or 2B, D)

        positions = np.concatenate([text_positions(img_shapes, text.shape[1]), image_positions(img_shapes)])
        cos, sin = rope_tables(positions, c.axes_dims_rope, ROPE_THETA)
        keep = jnp.concatenate([text_mask.astype(bool), jnp.ones(img.shape[:2], bool)], axis=1)[:, None, None, :]

        blocks = stack_blocks(Block, c.num_layers, self.remat, broadcast=4)(c, self.dtype, target_tokens,
                                                                      name="transformer_blocks")
        (txt, img), _ = blocks((txt, img), temb, cos, sin, keep)

        scale, shift = Modulation(2, self.dtype, name="norm_out")(sample_rows(temb, target_tokens))
        img = modulate(layer_norm(img), shift, scale)
        return nn.Dense(c.output_channels, dtype=self.dtype, name="proj_out")(img)


def _check_inputs(c: QwenImageConfig, hidden, timestep, text, text_mask, img_shapes):
    problems = []
    if not img_shapes or any(len(shape) != 3 or min(shape) < 1 for shape in img_shapes):
        problems.append(f"img_shapes {img_shapes}: expected one or more (frame, h, w) patch grids")
    if hidden.ndim != 3 or hidden.shape[-1] != c.in_channels:
        problems.append(f"hidden states {hidden.shape}: expected (B, L, {c.in_channels})")
    elif not problems and hidden.shape[1] != image_tokens(img_shapes):
        problems.append(f"hidden states {hidden.shape}: img_shapes {img_shapes} hold {image_tokens(img_shapes)} "
                        "tokens")
    if timestep.shape != hidden.shape[:1]:
        problems.append(f"timestep {timestep.shape}: expected ({hidden.shape[0]},)")
    if text.ndim != 3 or text.shape[-1] != c.joint_attention_dim:
        problems.append(f"text states {text.shape}: expected (B, T, {c.joint_attention_dim})")
    elif text_mask.shape != text.shape[:2]:
        problems.append(f"text mask {text_mask.shape}: expected {text.shape[:2]}")
    if problems:
        raise ValueError("QwenImageTransformer inputs: " + "; ".join(problems))


def example_inputs(config: QwenImageConfig, batch: int = 1, side: int = 2, text_tokens: int = 2):
    """Zero inputs of the right shapes (for init and eval_shape): one side x side image."""
    return dict(hidden=jnp.zeros((batch, side * side, config.in_channels)), timestep=jnp.zeros((batch,)),
                text=jnp.zeros((batch, text_tokens, config.joint_attention_dim)),
                text_mask=jnp.ones((batch, text_tokens), bool), img_shapes=((1, side, side),))


def init_params(config: QwenImageConfig, key):
    """Random parameters (Flax default initialisers), fp32."""
    return QwenImageTransformer(config).init(key, **example_inputs(config))["params"]


def param_shapes(config: QwenImageConfig):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating (works for the 20B model)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
