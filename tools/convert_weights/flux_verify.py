"""Model-level check of a converted Flux folder: torch and Flax on the same seeded inputs, piece by piece.

`flux-fill|flux-kontext|flux-dev --verify` runs it after the tensor check: flux_cli.py, the command line,
imports this module and the converter (flux.py); this module imports the converter, never the command line.
Each converted component runs in float32 twice, as its torch reference (diffusers / transformers) and as our
Flax model, and the check prints max |diff| and max |diff| / max |torch output| per output; a relative error
above the tolerance (--tolerance, default flux.VERIFY_TOLERANCE = 1e-4) fails with `VerificationError`
naming every piece that failed.

Memory: CLIP-L (123M) and the VAE (84M) run whole. The T5-XXL encoder (4.7B) and the 12B transformer run
piece by piece, with one piece's weights on each side at a time: T5's embedding, position bias, each block and
the final norm; the transformer's input embedders, each double- and single-stream block, and the output
norm / projection. A piece's torch weights are read from the source files (only its tensors, through the
same renaming the converter uses), ours are its slice of the converted, stacked file. Every piece gets the
torch reference's activations at its input, so errors do not compound and the worst block is the one that
is wrong. The inputs are small (1 x 16 image tokens, 8 text tokens, a 64 x 64 image for the full-size VAE).

Weights stored as bfloat16 / float16 are upcast to float32, and the torch reference's weights are rounded to
that dtype first, so the check measures the port, not the cast (the tensor check already covers the cast).

Cost, measured on a 2-core CPU with random weights of Flux.1 Fill's widths stored as bfloat16 (2 double + 2
single transformer blocks, 2 T5-XXL blocks; no real weights were available) and extrapolated to the full
depth: a double block 5.4 s, a single block 1.9 s, a T5 block 3.0 s (the first of each kind ~1 s more: jit),
CLIP-L 6 s, the VAE 10 s, so about 3 minutes for the transformer and 4.5 for the whole pipeline, at a peak of
about 4 GB resident (one double block's weights in float32 on each side, plus JAX's copy).
"""
import dataclasses
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from tqdm import tqdm

from jax_inpaint_rl.models.layers import clip_text
from jax_inpaint_rl.models.flux import transformer as ft
from jax_inpaint_rl.models.layers import t5
from jax_inpaint_rl.models.layers import vae as vae_lib
from jax_inpaint_rl.models.flux.family import image_ids, text_ids
from jax_inpaint_rl.models.params_io import unflatten
from tools.convert_weights import common, flux, streaming
from tools.convert_weights.sd15 import errors

SEED = 0
IMAGE_GRID, TEXT_TOKENS = (4, 4), 8
TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
                np.dtype(np.float16): torch.float16}


class VerificationError(common.ConversionError):
    """Converted outputs differ from the torch reference's beyond the tolerance."""


@dataclasses.dataclass(frozen=True)
class Result:
    component: str
    group: str  # what a line of the report summarises: "double_blocks", "pooled", ...
    piece: str  # "double_blocks/7"; equal to group for a piece of its own
    abs_error: float
    rel_error: float


def worst(*pairs: tuple[float, float]) -> tuple[float, float]:
    """(max abs, max relative) over the outputs of one piece."""
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


# --- weights, one piece at a time --------------------------------------------------------------------

class SourceTensors:
    """A component's torch tensors by state-dict name, read from its source files only when a piece asks."""

    def __init__(self, component: flux.Component, stored: np.dtype):
        self.component, self.stored = component, stored
        self.readers = {}  # source key -> (read, shape)
        for path in component.files:
            read, header = streaming.read_rows(path)
            self.readers.update({key: (read, tuple(entry["shape"])) for key, entry in header.items()})
        self.origin = {}  # torch name -> source key it comes from (fused original tensors give several names)
        for key, (_, shape) in self.readers.items():
            placeholder = np.broadcast_to(np.int8(0), shape)  # renaming needs shapes only; allocates nothing
            self.origin.update({name: key for name, _ in component.rename(iter([(key, placeholder)]))})

    def state(self, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """{name after `prefix`: float32 tensor} of every torch tensor under `prefix`, except the `skip` names."""
        wanted = {k for k in self.origin if k.startswith(prefix) and k[len(prefix):] not in skip}
        if not wanted:
            raise common.ConversionError(f"{self.component.source}: no tensors named {prefix}*")
        keys = sorted({self.origin[k] for k in wanted})
        stream = ((key, self.readers[key][0](key, None)) for key in keys)
        return {k[len(prefix):]: self.as_stored(v) for k, v in self.component.rename(stream) if k in wanted}

    def as_stored(self, array: np.ndarray) -> torch.Tensor:
        """float32 tensor of the value the converted file holds: cast as the converter casts, when it narrows."""
        if self.stored != np.float32 and array.dtype != self.stored:
            array = array.astype(self.stored)
        return torch.from_numpy(np.asarray(array, np.float32))


class ConvertedParams:
    """One component's converted parameters, read a piece (or one layer of a stack) at a time, as float32."""

    def __init__(self, dst: str, name: str):
        self.path, self.name = flux.params_file(dst, name), name
        self.read, self.header = streaming.read_rows(self.path)
        self.dtype = np.dtype(streaming.DTYPES[next(iter(self.header.values()))["dtype"]])

    def tree(self, sub: str | None = None, index: int | None = None) -> dict:
        """The params under '<component>/<sub>/' (all when sub is None); `index`: that layer of a stack."""
        start = f"{self.name}/{sub}/" if sub else f"{self.name}/"
        keys = [k for k in self.header if k.startswith(start)]
        if not keys:
            raise common.ConversionError(f"{self.path}: no parameters under {start}")
        return unflatten({k[len(start):]: self.leaf(k, index) for k in keys})

    def leaf(self, key: str, index: int | None = None):
        return jnp.asarray(np.asarray(self.read(key, index), np.float32))


def load(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Give a torch module (built on the meta device) these weights."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise common.ConversionError(f"{where}: the source tensors do not fit the torch module: {err}") from None
    return module.eval()


def round_parameters(module: torch.nn.Module, dtype: np.dtype) -> torch.nn.Module:
    """Round a whole model's float32 weights to the dtype the converted file stores (a no-op for float32)."""
    if dtype == np.float32:
        return module
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(param.to(TORCH_DTYPES[dtype]).float())
    return module


def run_torch(module: Callable, *args, **kwargs):
    """Call a torch module without autograd; tensors come back as float32 numpy arrays."""
    with torch.no_grad():
        out = module(*args, **kwargs)
    return tuple(None if o is None else o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


def tensor(array) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array, np.float32))


def applied(module: nn.Module, method=None):
    """jit of module.apply with params as the first argument (one compile per piece kind)."""
    return jax.jit(lambda params, *args: module.apply({"params": params}, *args, method=method))


def _meta(build: Callable):
    with torch.device("meta"):
        return build()


# --- the transformer ---------------------------------------------------------------------------------

def transformer_inputs(config: ft.FluxConfig) -> dict:
    """Seeded random model inputs: 1 x 16 image tokens on a 4 x 4 grid, 8 text tokens, sigma 0.7."""
    rng = np.random.default_rng(SEED)
    h, w = IMAGE_GRID
    return dict(hidden=rng.standard_normal((1, h * w, config.in_channels), np.float32),
                text=rng.standard_normal((1, TEXT_TOKENS, config.joint_attention_dim), np.float32),
                pooled=rng.standard_normal((1, config.pooled_projection_dim), np.float32),
                timestep=np.array([0.7], np.float32),
                guidance=np.array([3.5], np.float32) if config.guidance_embeds else None,
                ids=np.concatenate([text_ids(TEXT_TOKENS), image_ids(h, w)]))


class TransformerCheck:
    """The transformer piece by piece; `self.txt`, `self.img`, `self.temb` carry the torch activations."""

    def __init__(self, component: flux.Component, dst: str):
        from diffusers import FluxTransformer2DModel

        self.config = ft.FluxConfig.from_diffusers(component.config, component.source)
        self.reference = _meta(lambda: FluxTransformer2DModel.from_config(component.config))
        self.ours = ConvertedParams(dst, "transformer")
        self.source = SourceTensors(component, self.ours.dtype)
        self.where = component.source
        self.inputs = transformer_inputs(self.config)
        self.rotary = self.reference.pos_embed(torch.from_numpy(self.inputs["ids"]))
        self.cos, self.sin = ft.rope_tables(jnp.asarray(self.inputs["ids"]), self.config.axes_dims_rope)

    def torch_piece(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        """`module` holding the source tensors named `prefix`* (one block, or one embedder)."""
        return load(module, self.source.state(prefix), f"{self.where} ({prefix}*)")

    def embedders(self) -> list[tuple[str, tuple[float, float]]]:
        """x_embedder, context_embedder, time_text_embed; sets the activations the first block sees."""
        c, x, ref = self.config, self.inputs, self.reference
        dense = applied(nn.Dense(c.inner_dim))
        self.img = run_torch(self.torch_piece(ref.x_embedder, "x_embedder."), tensor(x["hidden"]))
        self.txt = run_torch(self.torch_piece(ref.context_embedder, "context_embedder."), tensor(x["text"]))
        scaled = [tensor(v * 1000.0) for v in (x["timestep"], x["guidance"]) if v is not None]  # as diffusers does
        self.temb = run_torch(self.torch_piece(ref.time_text_embed, "time_text_embed."), *scaled, tensor(x["pooled"]))
        temb = applied(ft.TimeTextEmbed(c.inner_dim, c.guidance_embeds, jnp.float32))(
            self.ours.tree("time_text_embed"), x["timestep"], x["guidance"], x["pooled"])
        return [("x_embedder", errors(dense(self.ours.tree("x_embedder"), x["hidden"]), self.img)),
                ("context_embedder", errors(dense(self.ours.tree("context_embedder"), x["text"]), self.txt)),
                ("time_text_embed", errors(temb, self.temb))]

    def double_block(self, index: int, apply) -> tuple[float, float]:
        block = self.torch_piece(self.reference.transformer_blocks[0], f"transformer_blocks.{index}.")
        txt, img = run_torch(block, hidden_states=tensor(self.img), encoder_hidden_states=tensor(self.txt),
                             temb=tensor(self.temb), image_rotary_emb=self.rotary)
        (txt_got, img_got), _ = apply(self.ours.tree("double_blocks", index), (self.txt, self.img), self.temb,
                                      self.cos, self.sin)
        self.txt, self.img = txt, img
        return worst(errors(txt_got, txt), errors(img_got, img))

    def single_block(self, index: int, apply) -> tuple[float, float]:
        block = self.torch_piece(self.reference.single_transformer_blocks[0], f"single_transformer_blocks.{index}.")
        txt, img = run_torch(block, hidden_states=tensor(self.img), encoder_hidden_states=tensor(self.txt),
                             temb=tensor(self.temb), image_rotary_emb=self.rotary)
        joint, _ = apply(self.ours.tree("single_blocks", index), np.concatenate([self.txt, self.img], axis=1),
                         self.temb, self.cos, self.sin)
        self.txt, self.img = txt, img
        return worst(errors(joint[:, :TEXT_TOKENS], txt), errors(joint[:, TEXT_TOKENS:], img))

    def output(self) -> tuple[float, float]:
        """norm_out + proj_out (the tail of FluxTransformer.__call__, restated from the library's pieces)."""
        c, ref = self.config, self.reference
        norm, proj = self.torch_piece(ref.norm_out, "norm_out."), self.torch_piece(ref.proj_out, "proj_out.")
        expected = run_torch(lambda img, temb: proj(norm(img, temb)), tensor(self.img), tensor(self.temb))

        def tail(params, img, temb):
            scale, shift = ft.Modulation(2, jnp.float32).apply({"params": params["norm_out"]}, temb)
            img = ft.modulate(ft.layer_norm(img), shift, scale)
            return nn.Dense(c.output_channels).apply({"params": params["proj_out"]}, img)

        params = {"norm_out": self.ours.tree("norm_out"), "proj_out": self.ours.tree("proj_out")}
        return errors(jax.jit(tail)(params, self.img, self.temb), expected)


def check_transformer(component: flux.Component, dst: str) -> list[Result]:
    check = TransformerCheck(component, dst)
    c = check.config
    double = applied(ft.DoubleBlock(c, jnp.float32))
    single = applied(ft.SingleBlock(c, jnp.float32))
    results = [Result("transformer", name, name, *pair) for name, pair in check.embedders()]
    with tqdm(total=c.num_layers + c.num_single_layers, desc="transformer blocks", unit="block") as progress:
        for index in range(c.num_layers):
            results.append(Result("transformer", "double_blocks", f"double_blocks/{index}",
                                  *check.double_block(index, double)))
            progress.update()
        for index in range(c.num_single_layers):
            results.append(Result("transformer", "single_blocks", f"single_blocks/{index}",
                                  *check.single_block(index, single)))
            progress.update()
    return results + [Result("transformer", "norm_out + proj_out", "norm_out + proj_out", *check.output())]


# --- T5 encoder --------------------------------------------------------------------------------------

BIAS = "layer.0.SelfAttention.relative_attention_bias.weight"  # block 0's table: our top-level parameter


def check_t5(component: flux.Component, dst: str) -> list[Result]:
    """Embedding, position bias, each block, final norm; each fed the torch reference's activations."""
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5Block

    hf_config = T5Config.from_dict(component.config)
    config = t5.T5Config.from_transformers(component.config, component.source)
    reference = _meta(lambda: T5EncoderModel(hf_config))
    block = _meta(lambda: T5Block(hf_config, has_relative_attention_bias=False))
    ours = ConvertedParams(dst, "text_encoder_2")
    source = SourceTensors(component, ours.dtype)
    piece = lambda module, prefix, skip=(): load(  # noqa: E731
        module, source.state(prefix, skip), f"{component.source} ({prefix}*)")
    ids = np.random.default_rng(SEED).integers(0, config.vocab_size, (1, TEXT_TOKENS)).astype(np.int32)

    hidden = run_torch(piece(reference.shared, "shared."), torch.from_numpy(ids).long())
    embedded = applied(nn.Embed(config.vocab_size, config.d_model))(ours.tree("embed_tokens"), ids)
    results = [Result("text_encoder_2", "embed_tokens", "embed_tokens", *errors(embedded, hidden))]
    attention = piece(reference.encoder.block[0].layer[0].SelfAttention, "encoder.block.0.layer.0.SelfAttention.")
    bias = run_torch(attention.compute_bias, TEXT_TOKENS, TEXT_TOKENS)
    buckets = t5.relative_position_buckets(TEXT_TOKENS, config.relative_attention_num_buckets,
                                           config.relative_attention_max_distance)
    table = ours.leaf("text_encoder_2/relative_attention_bias")
    got = jnp.transpose(table[buckets], (2, 0, 1))[None]  # as T5Encoder.__call__ builds it
    results.append(Result("text_encoder_2", "position bias", "position bias", *errors(got, bias)))
    apply = applied(t5.Block(config, jnp.float32))
    for index in tqdm(range(config.num_layers), desc="T5 blocks", unit="block"):
        out = run_torch(piece(block, f"encoder.block.{index}.", (BIAS,)), tensor(hidden), position_bias=tensor(bias))
        got, _ = apply(ours.tree("blocks", index), hidden, bias)
        results.append(Result("text_encoder_2", "blocks", f"blocks/{index}", *errors(got, out[0])))
        hidden = out[0]
    final = run_torch(piece(reference.encoder.final_layer_norm, "encoder.final_layer_norm."), tensor(hidden))
    got = applied(t5.LayerNorm(config.layer_norm_epsilon))(ours.tree("final_norm"), hidden)
    return results + [Result("text_encoder_2", "final_norm", "final_norm", *errors(got, final))]


# --- the small components, whole ---------------------------------------------------------------------

def check_clip(component: flux.Component, dst: str) -> list[Result]:
    """CLIP text tower over a full-length random prompt ending in EOS: hidden states and pooled output."""
    from transformers import CLIPTextModel

    ours = ConvertedParams(dst, "text_encoder")
    reference = round_parameters(CLIPTextModel.from_pretrained(component.source).float().eval(), ours.dtype)
    config = clip_text.CLIPTextConfig.from_transformers(component.config, component.source)
    ids = np.random.default_rng(SEED).integers(0, config.vocab_size - 1, (1, config.max_position_embeddings))
    ids[:, -1] = config.vocab_size - 1 if config.eos_token_id == 2 else config.eos_token_id
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids))
    got = applied(clip_text.CLIPTextTransformer(config))(ours.tree(), ids.astype(np.int32))
    return [Result("text_encoder", "hidden states", "hidden states",
                   *errors(got["last_hidden_state"], expected.last_hidden_state.numpy())),
            Result("text_encoder", "pooled", "pooled", *errors(got["pooled"], expected.pooler_output.numpy()))]


def check_vae(component: flux.Component, dst: str) -> list[Result]:
    """Encode a random image (8 latents a side) to the posterior mean, decode the reference's mean."""
    from diffusers import AutoencoderKL

    ours = ConvertedParams(dst, "vae")
    reference = round_parameters(AutoencoderKL.from_pretrained(component.source).float().eval(), ours.dtype)
    config = vae_lib.VAEConfig.from_diffusers(component.config, component.source)
    size = 8 * config.downscale
    image = np.random.default_rng(SEED).uniform(-1, 1, (1, size, size, config.in_channels)).astype(np.float32)
    with torch.no_grad():
        mean = reference.encode(tensor(image.transpose(0, 3, 1, 2))).latent_dist.mean
        decoded = reference.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
    mean = mean.numpy().transpose(0, 2, 3, 1)
    model, params = vae_lib.AutoencoderKL(config), ours.tree()
    got_mean, _ = applied(model, vae_lib.AutoencoderKL.encode)(params, image)
    got_decoded = applied(model, vae_lib.AutoencoderKL.decode)(params, mean)
    return [Result("vae", "encode mean", "encode mean", *errors(got_mean, mean)),
            Result("vae", "decode", "decode", *errors(got_decoded, decoded))]


CHECKS = {"text_encoder": check_clip, "text_encoder_2": check_t5, "vae": check_vae, "transformer": check_transformer}


# --- all components, and the report ------------------------------------------------------------------

def check_models(components: dict[str, flux.Component], dst: str, tolerance: float, checks=None,
                 inputs: str | None = None) -> list[Result]:
    """Run the check of every converted component `checks` has (default: Flux's), print the report, raise
    VerificationError above `tolerance`; components without a check had the tensor check only. `inputs`: the
    report's first line (default: Flux's seeded inputs)."""
    checks = CHECKS if checks is None else checks
    checked = [name for name in components if name in checks]
    print(describe_setup({name: ConvertedParams(dst, name).dtype for name in checked}, inputs))
    results = []
    with jax.default_matmul_precision("highest"):
        for name in checked:
            start = time.perf_counter()
            found = checks[name](components[name], dst)
            report(found, time.perf_counter() - start)
            results += found
    for name in sorted(set(components) - set(checks)):
        print(f"{name:15s} tensor check only")
    failed = [r for r in results if not r.rel_error <= tolerance]  # NaN fails too
    if failed:
        raise VerificationError(f"{dst}: model check failed (relative error above {tolerance:.0e}): " + ", ".join(
            f"{r.component} {r.piece} ({r.rel_error:.2e})" for r in failed))
    return results


def describe_setup(stored: dict[str, np.dtype], inputs: str | None = None) -> str:
    lines = [inputs or f"model check: float32 compute, seeded inputs (seed {SEED}; transformer 1 x "
                       f"{np.prod(IMAGE_GRID)} image tokens, {TEXT_TOKENS} text tokens)"]
    for dtype in sorted({d for d in stored.values() if d != np.float32}, key=str):
        names = ", ".join(n for n, d in stored.items() if d == dtype)
        lines.append(f"  {names}: stored as {dtype}, upcast to float32; the torch reference's weights are rounded "
                     f"to {dtype} the same way")
    return "\n".join(lines)


def report(results: list[Result], seconds: float) -> None:
    """One line per group (the worst piece of a group of blocks), then the time the component took."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.component, r.group), []).append(r)
    for (component, group), members in groups.items():
        bad = max(members, key=lambda r: (np.nan_to_num(r.rel_error, nan=np.inf), r.abs_error))
        label = group if len(members) == 1 and bad.piece == group else f"{group} (worst of {len(members)}: {bad.piece})"
        print(f"{component:15s} {label:45s} max|diff| {bad.abs_error:.3e}   relative {bad.rel_error:.3e}")
    print(f"{results[0].component:15s} checked in {seconds:.1f}s ({len(results)} pieces)")
