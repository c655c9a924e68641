"""The CLIP text transformer (transformers' CLIPTextModel) in Flax Linen, and its tokenizer.

`CLIPTextTransformer(config)(input_ids)` returns `{'last_hidden_state': (B, T, D) after the final
LayerNorm, 'pooled': (B, D) that hidden state at the end-of-text token, 'penultimate_hidden_state':
(B, T, D) the input of the last layer (transformers' hidden_states[-2])}`, and for a
CLIPTextModelWithProjection (config.projection_dim set) 'text_embeds': (B, projection_dim) the pooled
state through the bias-free text_projection. SD1.5 conditions on the last hidden state, Flux on the
pooled one, SD3 on the penultimate one and text_embeds. The EOS position follows transformers: the argmax
of the ids for legacy configs (eos_token_id == 2, where the EOS id is the largest id), else the first
`eos_token_id`.
"""
import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.models.layers.conv_blocks import attention, maybe_remat

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
WITH_PROJECTION = "CLIPTextModelWithProjection"


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int | None = None  # text_projection width of a CLIPTextModelWithProjection; None: no projection

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], source: str = "text encoder config") -> "CLIPTextConfig":
        """Read the fields this model needs from a transformers CLIPTextConfig dict (the rest is generic metadata).

        Every CLIPTextConfig carries a projection_dim; only a CLIPTextModelWithProjection (its "architectures")
        has the projection, so only then is it read."""
        if config.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"{source}: model_type={config['model_type']!r}, expected 'clip_text_model'")
        values = {f.name: config[f.name] for f in dataclasses.fields(cls)
                  if f.name != "projection_dim" and config.get(f.name) is not None}
        if WITH_PROJECTION in (config.get("architectures") or ()):
            values["projection_dim"] = config["projection_dim"]
        made = cls(**values)
        if made.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act={made.hidden_act!r}, supported: {sorted(ACTIVATIONS)}")
        if made.hidden_size % made.num_attention_heads:
            raise ValueError(f"{source}: hidden_size {made.hidden_size} not divisible by num_attention_heads "
                             f"{made.num_attention_heads}")
        return made


def eos_positions(config: CLIPTextConfig, input_ids):
    """(B, T) ids -> (B,) index of the end-of-text token, as transformers picks it."""
    if config.eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == config.eos_token_id).astype(jnp.int32), axis=-1)


class EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, d, p = self.config, self.dtype, self.param_dtype
        dense = lambda features, name: nn.Dense(features, dtype=d, param_dtype=p, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            c.layer_norm_eps, dtype=d, param_dtype=p, use_fast_variance=False, name=name)
        h = norm("layer_norm1")(x)
        q, k, v = (dense(c.hidden_size, f"{n}_proj")(h) for n in "qkv")
        x = x + dense(c.hidden_size, "out_proj")(attention(q, k, v, c.num_attention_heads, is_causal=True))
        h = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "fc1")(norm("layer_norm2")(x)))
        return x + dense(c.hidden_size, "fc2")(h)


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids):
        c, d, p = self.config, self.dtype, self.param_dtype
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(f"CLIP text: {length} tokens, at most max_position_embeddings={c.max_position_embeddings}")
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=d, param_dtype=p, name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=d, param_dtype=p,
                             name="position_embedding")(jnp.arange(length))
        h = tokens + positions[None]
        layer = maybe_remat(EncoderLayer, self.remat)
        for i in range(c.num_hidden_layers):
            penultimate = h
            h = layer(c, d, p, name=f"layers_{i}")(h)
        h = nn.LayerNorm(c.layer_norm_eps, dtype=d, param_dtype=p, use_fast_variance=False, name="final_layer_norm")(h)
        pooled = h[jnp.arange(h.shape[0]), eos_positions(c, input_ids)]
        out = {"last_hidden_state": h, "pooled": pooled, "penultimate_hidden_state": penultimate}
        if c.projection_dim is not None:
            out["text_embeds"] = nn.Dense(c.projection_dim, use_bias=False, dtype=d, param_dtype=p,
                                          name="text_projection")(pooled)
        return out


def init_params(model: CLIPTextTransformer, key):
    return model.init(key, jnp.zeros((1, model.config.max_position_embeddings), jnp.int32))["params"]


def load_tokenizer(folder: str | os.PathLike):
    """transformers' CLIPTokenizer from a folder of tokenizer files (vocab.json, merges.txt, ...); no torch."""
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> np.ndarray:
    """Prompts -> (B, max_length) int32 ids, padded and truncated as the SD / Flux pipelines do."""
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)
