"""Calligrapher's adapter in PyTorch: the torch reference of models/calligrapher/adapter.py's math, on diffusers'
FluxTransformer2DModel (written from the published facts, not copied from the release).

- `TorchMLPProjection`, `TorchQFormerProjection`: the image projection (SigLIP pooled embedding -> image tokens);
- `IPAttnProcessor`: diffusers' Flux attention plus the image-prompt term, attached to every attention layer by
  `attach_processors`;
- `CalligrapherDenoiser`: all of it as one module, the torch counterpart of the family's params['denoiser']
  ({'transformer', 'image_proj', 'ip_attention'}), with `component_key` naming each of its tensors the way the
  converter's key tables (calligrapher.py) read them.
The parity tests (tests/test_calligrapher_adapter.py, test_calligrapher_family.py) and the benchmark
(tools/bench) use these.
"""
import re

import torch
import torch.nn.functional as F


class TorchMLPProjection(torch.nn.Module):
    """Linear(E, 2E), exact GELU, Linear(2E, T C), reshape (B, T, C), LayerNorm(C)."""

    def __init__(self, embed_dim: int, width: int, tokens: int):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.proj = torch.nn.Sequential(torch.nn.Linear(embed_dim, 2 * embed_dim), torch.nn.GELU(),
                                        torch.nn.Linear(2 * embed_dim, tokens * width))
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, embeds):
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.width))


class TorchQFormerProjection(torch.nn.Module):
    """Learned queries attend (torch MultiheadAttention) to id_proj's tokens; LN(attn + queries); LN."""

    def __init__(self, embed_dim: int, width: int, tokens: int, heads: int, kv_tokens: int):
        super().__init__()
        self.width = width
        self.query_embeds = torch.nn.Parameter(torch.randn(tokens, width))
        self.id_proj = torch.nn.Sequential(torch.nn.Linear(embed_dim, 2 * embed_dim), torch.nn.GELU(),
                                           torch.nn.Linear(2 * embed_dim, kv_tokens * width))
        self.cross_attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn_norm = torch.nn.LayerNorm(width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, embeds):
        kv = self.id_proj(embeds).reshape(embeds.shape[0], -1, self.width)
        queries = self.query_embeds[None].expand(embeds.shape[0], -1, -1)
        attended, _ = self.cross_attn(queries, kv, kv, need_weights=False)
        return self.norm(self.cross_attn_norm(attended + queries))


class IPAttnProcessor(torch.nn.Module):
    """diffusers' Flux attention plus the image-prompt term: keys / values from the image tokens (no bias), keys
    RMS-normed per head (eps 1e-5, no scale), the query after norm_q and before RoPE, its own softmax; added
    (x scale) before to_out in double blocks, to every token in single blocks."""

    def __init__(self, token_width: int, inner: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.to_k_ip = torch.nn.Linear(token_width, inner, bias=False)
        self.to_v_ip = torch.nn.Linear(token_width, inner, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 image_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  (B, L, N, D)
        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        ip_key = F.rms_norm(heads(self.to_k_ip(image_emb)), (attn.head_dim,), eps=1e-5)
        ip_value = heads(self.to_v_ip(image_emb))
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).flatten(2)
        ip = sdpa(query, ip_key, ip_value)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = sdpa(query, key, value)
        if encoder_hidden_states is None:
            return out + self.scale * ip
        text, image = out[:, :text_len], out[:, text_len:] + self.scale * ip
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def attach_processors(transformer, token_width: int, scale: float = 1.0, seed: int = 0) -> list[IPAttnProcessor]:
    """An IPAttnProcessor on every attention layer (double blocks first), random weights; returns them in order."""
    torch.manual_seed(seed)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    processors = {name: IPAttnProcessor(token_width, inner, scale) for name in transformer.attn_processors}
    ordered = list(processors.values())
    transformer.set_attn_processor(processors)  # (empties the dict it is given)
    return ordered


class CalligrapherDenoiser(torch.nn.Module):
    """The family's denoiser as one module: `transformer` (FluxTransformer2DModel(**flux)) with an
    IPAttnProcessor on every attention, `mlp` and (with use_qformer) `qformer` projecting the image embedding to
    the tokens the processors attend to. `adapter` holds AdapterConfig's fields."""

    def __init__(self, flux: dict, adapter: dict, seed: int = 0):
        from diffusers import FluxTransformer2DModel

        super().__init__()
        width = flux["joint_attention_dim"]
        self.transformer = FluxTransformer2DModel(**flux)
        self.mlp = TorchMLPProjection(adapter["image_embed_dim"], width, adapter["num_tokens"])
        self.qformer = (TorchQFormerProjection(adapter["image_embed_dim"], width, adapter["num_tokens"],
                                               adapter["qformer_heads"], adapter["qformer_query_tokens"])
                        if adapter["use_qformer"] else None)
        attach_processors(self.transformer, width, adapter["ip_scale"], seed)

    def image_tokens(self, image_embeds):
        tokens = self.mlp(image_embeds)
        return tokens if self.qformer is None else tokens + self.qformer(image_embeds)

    def forward(self, image_embeds, **flux_inputs):
        """FluxTransformer2DModel's keyword inputs (return_dict=False: a tuple) plus the pooled image embedding."""
        return self.transformer(**flux_inputs, joint_attention_kwargs={"image_emb": self.image_tokens(image_embeds)})

    def enable_gradient_checkpointing(self):
        self.transformer.enable_gradient_checkpointing()

    def add_adapter(self, config):
        """peft LoRA (diffusers' add_adapter) on the transformer: the adapter's own layers are no LoRA targets."""
        self.transformer.add_adapter(config)


_IP_KEY = re.compile(r"transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor\.(.*)")
_IP_STACKS = {"transformer_blocks": "double", "single_transformer_blocks": "single"}
_PROJECTIONS = {"mlp": "image_proj_mlp", "qformer": "image_proj_qformer"}


def component_key(name: str) -> tuple[str, str]:
    """A CalligrapherDenoiser tensor name -> (our component, the key tools/convert_weights reads): 'transformer'
    with diffusers' Flux keys, 'image_proj' and 'ip_attention' with calligrapher.py's canonical adapter keys
    (image_proj_mlp.*, image_proj_qformer.*, attn_adapter.double|single.<i>.*)."""
    ip = _IP_KEY.fullmatch(name)
    if ip:
        return "ip_attention", f"attn_adapter.{_IP_STACKS[ip[1]]}.{ip[2]}.{ip[3]}"
    head, _, rest = name.partition(".")
    if head == "transformer":
        return "transformer", rest
    if head in _PROJECTIONS:
        return "image_proj", f"{_PROJECTIONS[head]}.{rest}"
    raise KeyError(f"{name}: not a CalligrapherDenoiser tensor (expected transformer.*, mlp.* or qformer.*)")
