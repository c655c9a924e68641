"""Qwen2.5-VL's language model (transformers' Qwen2_5_VLTextModel + lm_head) in Flax Linen, with a KV cache.

Qwen-Image-Edit conditions its DiT on the last hidden state (after the final norm); issue 15 trains the same
model as a text policy, so it also gives logits and decodes token by token from a fixed-shape cache.

Structure (transformers' names, so the converter's key table reads one-to-one): `embed_tokens`, then
`num_hidden_layers` pre-norm decoder layers, one `nn.scan` over parameters stacked on a leading axis (`layers/...`;
a forward pass compiles one layer whatever the depth), then `norm`; `lm_head` (no bias) unless the checkpoint ties
it to the embedding. A layer: RMSNorm -> grouped-query attention (q / k / v with bias, o without; a key / value head
serves num_attention_heads / num_key_value_heads query heads) with 3-D multimodal RoPE -> residual; RMSNorm ->
gated MLP down(act(gate(x)) * up(x)) -> residual. Norms, RoPE and softmax run in fp32.

Multimodal RoPE: every token has 3 position ids (temporal, height, width; equal for text), `positions` (3, B, L)
as `model.rope_index` computes them. The head dim's rotation frequencies are split into `mrope_section` runs (their
sum is head_dim / 2), the i-th run rotated by the i-th id; rotation pairs channel j with j + head_dim / 2.

Masks: `attention_mask` (B, L), 1 for a token, 0 for padding; a query sees the keys at or before its slot that are
tokens. The KV cache (`init_cache`) holds every layer's keys and values at fixed shape (layers, B, max_len,
kv_heads, head_dim) plus which slots hold tokens (B, max_len); a call writes its L tokens at slots cache_index ..
cache_index + L - 1 (one scalar for the batch), so a prefill of L tokens and a one-token decode step each compile
once. A traced cache_index cannot be checked: past max_len - L, XLA's dynamic_update_slice would clamp the write
onto the last slots, so the caller sizes max_len for prompt + generated tokens. Left- and right-padded prompts both
decode correctly: padding slots stay masked out for every later query, and each row's positions are its own
(`model.decode_positions`), so a right-padded row's gap between its prompt and its generated tokens changes nothing
(RoPE sees positions, not slots).
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.flux.transformer import RMSNorm
from jax_inpaint_rl.models.layers import siglip
from jax_inpaint_rl.models.layers.attention import attend

ACTIVATIONS = {**siglip.ACTIVATIONS, "silu": jax.nn.silu}
ROPE_TYPES = (None, "default", "mrope")  # transformers renames Qwen's 'mrope' to 'default'; both are plain RoPE
DEFAULT_MROPE_SECTION = (16, 24, 24)  # transformers' fallback when a config names none
# transformers' Qwen2_5_VLTextConfig fields that change nothing here (training, generation or bookkeeping values)
IGNORED_KEYS = ("architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
                "torch_dtype", "initializer_range", "max_position_embeddings", "max_window_layers", "model_type",
                "sliding_window", "transformers_version", "use_cache", "image_token_id", "video_token_id",
                "vision_start_token_id", "vision_end_token_id", "vision_token_id")
CHECKED_KEYS = ("rope_parameters", "rope_scaling", "use_sliding_window", "layer_types")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """transformers' Qwen2_5_VLTextConfig fields the math uses, with its defaults (a config.json may omit any)."""
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = DEFAULT_MROPE_SECTION
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], source: str = "config") -> "TextConfig":
        """From a `text_config` dict (or a flat pre-4.52 config.json's text fields). The RoPE base and sections are
        read from `rope_parameters` (transformers 5) or `rope_scaling` (older), the base falling back to a top-level
        `rope_theta`; keys starting with '_' are metadata; every other unknown key is named."""
        known = {f.name for f in dataclasses.fields(cls)} - {"mrope_section"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown Qwen2.5-VL text config keys {unknown}; expected a subset of "
                             f"{sorted(CONFIG_KEYS)}")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        values = {k: v for k, v in config.items() if k in known}
        values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", cls.rope_theta)))
        values["mrope_section"] = tuple(int(n) for n in rope.get("mrope_section", DEFAULT_MROPE_SECTION))
        if values.get("num_key_value_heads") is None:  # transformers: None means one per query head
            values["num_key_value_heads"] = values.get("num_attention_heads", cls.num_attention_heads)
        made = cls(**values)
        problems = made._problems(rope.get("rope_type", rope.get("type")))
        if config.get("use_sliding_window"):
            problems.append("use_sliding_window=True is not supported (Qwen2.5-VL checkpoints use full attention)")
        if any(kind != "full_attention" for kind in config.get("layer_types") or ()):
            problems.append(f"layer_types {config['layer_types']}: only 'full_attention' is supported")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return made

    def _problems(self, rope_type) -> list[str]:
        problems = []
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act={self.hidden_act!r}, supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            problems.append(f"hidden_size {self.hidden_size} must be num_attention_heads {self.num_attention_heads} "
                            "x an even head dim")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            problems.append(f"mrope_section {self.mrope_section} must be 3 sizes summing to head_dim / 2 = "
                            f"{self.head_dim // 2}")
        return problems


# every key a text config may hold: the fields (mrope_section lives in the rope dict), the ignored, the checked
CONFIG_KEYS = frozenset({f.name for f in dataclasses.fields(TextConfig)} - {"mrope_section"}
                        | set(IGNORED_KEYS) | set(CHECKED_KEYS))


def rope_tables(config: TextConfig, positions):
    """(3, B, L) int position ids -> cos, sin (B, L, head_dim) in fp32, in rotate-half layout (the table repeated
    for channel j and j + head_dim / 2); frequency i takes the id of the axis whose `mrope_section` run holds it."""
    half = config.head_dim // 2
    inv_freq = (1.0 / config.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / config.head_dim)
                ).astype(np.float32)
    axis_of = np.repeat(np.arange(3), config.mrope_section)  # (half,)
    ids = jnp.moveaxis(positions[axis_of], 0, -1).astype(jnp.float32)  # (B, L, half)
    angles = ids * inv_freq
    return jnp.tile(jnp.cos(angles), 2), jnp.tile(jnp.sin(angles), 2)


def apply_rope(x, cos, sin):
    """Rotate (B, L, heads, head_dim) by (B, L, head_dim) tables: x cos + rotate_half(x) sin, in fp32."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention; with a layer cache, writes this call's keys / values at `cache_index` and
    attends over every cached slot (the mask decides which count)."""
    config: TextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index, layer_cache):
        c = self.config
        dense = lambda heads, name: nn.Dense(heads * c.head_dim, dtype=self.dtype, name=name)  # noqa: E731
        split = lambda y: y.reshape(*y.shape[:2], -1, c.head_dim)  # noqa: E731
        q = apply_rope(split(dense(c.num_attention_heads, "q_proj")(x)), cos, sin)
        k = apply_rope(split(dense(c.num_key_value_heads, "k_proj")(x)), cos, sin)
        v = split(dense(c.num_key_value_heads, "v_proj")(x))
        if layer_cache is not None:
            write = lambda buffer, new: jax.lax.dynamic_update_slice(  # noqa: E731
                buffer, new.astype(buffer.dtype), (0, cache_index, 0, 0))
            layer_cache = {"key": write(layer_cache["key"], k), "value": write(layer_cache["value"], v)}
            k, v = layer_cache["key"].astype(q.dtype), layer_cache["value"].astype(q.dtype)
        out = attend(q, k, v, mask=mask)
        out = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype, name="o_proj")(out.reshape(*x.shape[:2], -1))
        return out, layer_cache


class MLP(nn.Module):
    config: TextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        gated = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "gate_proj")(x))
        return dense(c.hidden_size, "down_proj")(gated * dense(c.intermediate_size, "up_proj")(x))


class DecoderLayer(nn.Module):
    """One scanned layer: carry = hidden states; the layer's cache slice (or None) in, its updated slice out."""
    config: TextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index, layer_cache):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm")(x)
        h, layer_cache = Attention(c, self.dtype, name="self_attn")(h, cos, sin, mask, cache_index, layer_cache)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x)
        return x + MLP(c, self.dtype, name="mlp")(h), layer_cache


def init_cache(config: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache: 'key' / 'value' (layers, batch, max_len, kv_heads, head_dim) in `dtype`, 'mask'
    (batch, max_len) bool (which slots hold tokens; none yet)."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, max_len), bool)}


def causal_mask(attention_mask, cache, cache_index):
    """(B, 1, L, S) bool: query i (slot cache_index + i, or i without a cache) sees key slot j <= its own whose
    token mask is set; and the cache's token mask with this call's L slots written (or None)."""
    length = attention_mask.shape[1]
    tokens = attention_mask.astype(bool)
    if cache is None:
        query_slots, key_mask = jnp.arange(length), tokens
    else:
        query_slots = cache_index + jnp.arange(length)
        key_mask = jax.lax.dynamic_update_slice(cache["mask"], tokens, (0, cache_index))
    causal = jnp.arange(key_mask.shape[1])[None, :] <= query_slots[:, None]  # (L, S)
    return causal[None, None] & key_mask[:, None, None, :], (None if cache is None else key_mask)


class QwenLM(nn.Module):
    """`embed(ids)`, `__call__(embeds, positions, attention_mask, cache, cache_index)` -> (last hidden state after
    the final norm, updated cache or None), `logits(hidden)` (fp32; `lm_head`, or the embedding when tied)."""
    config: TextConfig
    dtype: Any = jnp.float32  # compute dtype; parameters keep their own dtype
    with_lm_head: bool = False  # own an lm_head (untied checkpoints; the text encoder does not need it)
    remat: bool = False  # rematerialise each layer in the backward pass

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype)
        layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        # cos, sin, mask, cache_index are every layer's; the cache slices are scanned with the parameters
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 4 + (0,), length=c.num_hidden_layers)(c, self.dtype)
        self.norm = RMSNorm(c.rms_norm_eps)
        if self.with_lm_head and not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype)

    def embed(self, ids):
        """(B, L) int token ids -> (B, L, hidden_size) in the compute dtype."""
        return self.embed_tokens(ids)

    def __call__(self, embeds, positions, attention_mask, cache=None, cache_index=None):
        _check_inputs(self.config, embeds, positions, attention_mask, cache, cache_index)
        cos, sin = rope_tables(self.config, positions)
        mask, cache_mask = causal_mask(attention_mask, cache, cache_index)
        layer_caches = None if cache is None else {"key": cache["key"], "value": cache["value"]}
        x, layer_caches = self.layers(embeds.astype(self.dtype), cos, sin, mask, cache_index, layer_caches)
        new_cache = None if cache is None else dict(layer_caches, mask=cache_mask)
        return self.norm(x), new_cache

    def logits(self, hidden):
        """(B, L, hidden_size) -> (B, L, vocab_size) fp32 logits (pass only the rows needed: the vocabulary is
        152064 wide)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden.astype(self.dtype)).astype(jnp.float32)
        if not self.with_lm_head:
            raise ValueError("QwenLM(with_lm_head=False) has no lm_head (the checkpoint does not tie it to the "
                             "embedding): build it with with_lm_head=True and convert with lm_head=True for logits")
        return self.lm_head(hidden.astype(self.dtype)).astype(jnp.float32)



def _check_inputs(c: TextConfig, embeds, positions, mask, cache, cache_index):
    problems = []
    if embeds.ndim != 3 or embeds.shape[-1] != c.hidden_size:
        problems.append(f"embeds {embeds.shape}: expected (B, L, {c.hidden_size})")
    else:
        if positions.shape != (3, *embeds.shape[:2]):
            problems.append(f"positions {positions.shape}: expected (3, {embeds.shape[0]}, {embeds.shape[1]})")
        if mask.shape != embeds.shape[:2]:
            problems.append(f"attention_mask {mask.shape}: expected {embeds.shape[:2]}")
    if (cache is None) != (cache_index is None):
        problems.append("cache and cache_index go together: pass both (cached decoding) or neither")
    elif cache is not None:
        max_len = cache["mask"].shape[-1]
        expected = (c.num_hidden_layers, embeds.shape[0], max_len, c.num_key_value_heads, c.head_dim)
        if cache["key"].shape != expected or cache["value"].shape != expected:
            problems.append(f"cache key / value {cache['key'].shape} / {cache['value'].shape}: expected {expected} "
                            "(init_cache)")
        if isinstance(cache_index, int) and not 0 <= cache_index <= max_len - embeds.shape[1]:
            problems.append(f"cache_index {cache_index} + {embeds.shape[1]} tokens does not fit the cache's {max_len} "
                            "slots")
    if problems:
        raise ValueError("QwenLM inputs: " + "; ".join(problems))


def example_inputs(config: TextConfig, batch: int = 1, length: int = 2) -> dict:
    """Token ids, positions and mask of the right shapes (for init and eval_shape)."""
    return dict(ids=jnp.zeros((batch, length), jnp.int32), positions=jnp.zeros((3, batch, length), jnp.int32),
                attention_mask=jnp.ones((batch, length), jnp.int32))


def _every_parameter(module: QwenLM, ids, positions, attention_mask):
    """Touches every submodule (embedding, layers, norm, lm_head) so `init` creates them all."""
    hidden, _ = module(module.embed(ids), positions, attention_mask)
    return module.logits(hidden) if module.with_lm_head or module.config.tie_word_embeddings else hidden


def init_params(config: TextConfig, key, lm_head: bool = False):
    """Random parameters (Flax default initialisers), fp32."""
    return QwenLM(config, with_lm_head=lm_head).init(key, **example_inputs(config), method=_every_parameter)["params"]


def param_shapes(config: TextConfig, lm_head: bool = False):
    """Parameter tree of jax.ShapeDtypeStruct, without allocating (works for the 7B model)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), lm_head))
