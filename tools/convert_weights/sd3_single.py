"""Stability's original single-file SD3 / SD3.5 checkpoints -> the components the `sd3` converter writes.

A single file (sd3_medium.safetensors, sd3.5_large.safetensors, sd3.5_medium.safetensors, and the variants
with the text encoders inside) holds sections under fixed key prefixes:

  model.diffusion_model.*                 the MM-DiT (keys without the prefix are read too: transformer-only files)
  first_stage_model.*                     the VAE, in the LDM layout (encoder.down.N.block.M, mid.attn_1, ...)
  text_encoders.clip_l.transformer.*      CLIP-L, transformers' CLIPTextModel names behind the prefix
  text_encoders.clip_g.transformer.*      CLIP-G, the same, with its text_projection
  text_encoders.t5xxl.transformer.*       the T5-XXL encoder, transformers' T5EncoderModel names (fp8 allowed)

Any other key is refused by name. Each section becomes a `Component` whose stream renames its tensors to the
diffusers / transformers names the existing key tables (sd3.TRANSFORMER_RULES, components.vae_rules,
clip_text_rules, flux.T5_RULES) read, one tensor at a time; only the section's own bytes are read.

The transformer (diffusers' convert_sd3_transformer_checkpoint_to_diffusers was read to learn the layout):
  joint_blocks.N.x_block.attn.qkv         split in three on the output axis -> attn.to_q / to_k / to_v
  joint_blocks.N.context_block.attn.qkv   -> attn.add_q_proj / add_k_proj / add_v_proj
  joint_blocks.N.x_block.attn2.qkv        -> attn2.to_q / to_k / to_v (SD3.5-Medium's first blocks)
  ...attn.proj / attn2.proj               -> attn.to_out.0 / attn2.to_out.0; the context's -> attn.to_add_out
  ...attn.ln_q / ln_k (RMS, SD3.5)        -> norm_q / norm_k (image), norm_added_q / norm_added_k (text)
  ...adaLN_modulation.1                   -> norm1.linear / norm1_context.linear
  ...mlp.fc1 / fc2                        -> ff.net.0.proj / ff.net.2 (ff_context for the text)
  x_embedder.proj                         -> pos_embed.proj;  pos_embed -> pos_embed.pos_embed (checked, not kept)
  t_embedder.mlp.0 / 2, y_embedder.mlp.0 / 2  -> time_text_embed.timestep_embedder / text_embedder.linear_1 / 2
  context_embedder                        -> context_embedder;  final_layer.linear -> proj_out
  final_layer.adaLN_modulation.1, and the last block's context_block.adaLN_modulation.1 (its text is modulated
  by a continuous AdaLN): Stability splits the 2 x width outputs as (shift, scale), diffusers as (scale, shift),
  so the two halves swap. The other modulations keep their order (shift, scale, gate, ... on both sides).
The config is inferred from the tensors: width, in channels and patch from x_embedder.proj; num_layers from the
joint_blocks indices; dual-attention layers from the blocks with x_block.attn2; qk_norm 'rms_norm' when ln_q
is stored; the head dim from ln_q's length, else `attention_head_dim` (64, every release's); heads = width /
head dim; pos_embed_max_size from the table's length; joint / pooled / out dims from context_embedder,
y_embedder and final_layer; sample_size from the table's values (it sets the table's scale). Before anything
is converted, every key and shape is checked against that config and problems are named by their keys in
the file.

The VAE, CLIPs and T5 need their configs (and the pipeline its tokenizers and scheduler), which a single file
does not hold: they come from `components_from`, a diffusers SD3 folder. CLIP-L gets an identity
text_projection whatever the file stores: Stability's SD3 code uses CLIP-L's unprojected pooled output, and
diffusers' single-file loader does the same (its config's projection_dim must equal hidden_size).
"""
import dataclasses
import functools
import math
import os
import re
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from jax_inpaint_rl.models.flux.transformer import TIME_CHANNELS
from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.sd3.transformer import SD3Config, axis_embedding, param_shapes
from tools.convert_weights import common, flux, sd3, streaming
from tools.convert_weights.flux import Component

TRANSFORMER_PREFIX = "model.diffusion_model."
SECTIONS = {  # output component -> its key prefix in a single file
    "transformer": TRANSFORMER_PREFIX,
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
DEFAULT_HEAD_DIM = 64  # SD3-Medium, SD3.5-Medium and SD3.5-Large; only stored (as ln_q's length) when qk_norm is
MLP_RATIO = 4
CLIP_PROJECTION = "text_projection.weight"
# safetensors dtypes beyond streaming.DTYPES that single files use (the fp8 T5 of sd3_medium_incl_clips_t5xxlfp8)
DTYPES = {**streaming.DTYPES, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


# --- reading one section of a file -----------------------------------------------------------------

def read_section(path: str, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) for the keys under `prefix`, in file order, each with one plain read (others are skipped)."""
    header, start = streaming.read_header(path)
    entries = sorted(((k, v) for k, v in header.items() if k.startswith(prefix)), key=lambda kv: kv[1]["data_offsets"])
    with open(path, "rb") as f:
        for key, entry in entries:
            yield key, _read(f, path, start, key, entry)


def read_leading(path: str, key: str, count: int) -> np.ndarray:
    """The first `count` values of tensor `key`, flat."""
    header, start = streaming.read_header(path)
    entry = dict(header[key])
    entry["shape"] = [count]
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + count * _dtype(path, key, entry).itemsize]
    with open(path, "rb") as f:
        return _read(f, path, start, key, entry)


def _dtype(path: str, key: str, entry: dict) -> np.dtype:
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"{path}: {key} has dtype {entry['dtype']}; expected one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[entry["dtype"]])


def _read(f, path: str, start: int, key: str, entry: dict) -> np.ndarray:
    begin, end = entry["data_offsets"]
    f.seek(start + begin)
    buffer = bytearray(end - begin)
    f.readinto(buffer)
    return np.frombuffer(buffer, _dtype(path, key, entry)).reshape(entry["shape"])


@dataclasses.dataclass(frozen=True)
class Section(Component):
    """A component stored in one section of a single file: `tensors()` reads only the keys under `prefix`
    (through `rename`), then yields `extra()` (tensors the file does not hold, already in torch names)."""
    prefix: str = ""
    extra: Callable[[], Iterator[tuple[str, np.ndarray]]] = lambda: iter(())

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        yield from self.rename(read_section(self.files[0], self.prefix))
        yield from self.extra()


def section_keys(path: str) -> dict[str, list[str]]:
    """Output component -> its keys in the file; a file whose keys carry no section prefix but hold MM-DiT keys
    (joint_blocks.*, x_embedder.*) is a bare transformer (all keys its). Keys under no section are refused, every
    one named."""
    header, _ = streaming.read_header(path)
    keys = sorted(header)
    if not any(k.startswith(tuple(SECTIONS.values())) for k in keys) and any(
            k.startswith(("joint_blocks.", "x_embedder.")) for k in keys):
        return {"transformer": keys}
    found = {name: [k for k in keys if k.startswith(prefix)] for name, prefix in SECTIONS.items()}
    stray = sorted(set(keys) - {k for ks in found.values() for k in ks})
    if stray:
        raise common.ConversionError(
            f"{path}: keys outside the sections of an SD3 single file ({', '.join(p + '*' for p in SECTIONS.values())})"
            f": {len(stray)}\n" + "\n".join(f"    {k}" for k in stray))
    return {name: ks for name, ks in found.items() if ks}


def prefix_of(keys: list[str], name: str) -> str:
    """The section prefix the keys of `name` carry ('' for a bare transformer file)."""
    return SECTIONS[name] if keys and keys[0].startswith(SECTIONS[name]) else ""


# --- the transformer -------------------------------------------------------------------------------

def _same(template: str):
    return lambda m, x, last: [(m.expand(template), x)]


def _split3(names: tuple[str, str, str]):
    """A fused projection (3 x width on the output axis) -> its three parts, in order."""
    return lambda m, x, last: [(m.expand(name), part) for name, part in zip(names, np.split(x, 3, axis=0))]


def swap_halves(x: np.ndarray) -> np.ndarray:
    """(shift, scale) <-> (scale, shift) on the output axis: its own inverse."""
    first, second = np.split(x, 2, axis=0)
    return np.concatenate([second, first], axis=0)


_B, _END = r"joint_blocks\.(?P<i>\d+)", r"(?P<end>weight|bias)"
_D = r"transformer_blocks.\g<i>"
ORIGINAL_TABLE: list[tuple[str, Callable]] = [  # (full-match regex, (match, array, last block) -> [(name, array)])
    (r"pos_embed", _same(sd3.POSITION_TABLE)),
    (rf"x_embedder\.proj\.{_END}", _same(r"pos_embed.proj.\g<end>")),
    (rf"context_embedder\.{_END}", _same(r"context_embedder.\g<end>")),
    (rf"t_embedder\.mlp\.0\.{_END}", _same(r"time_text_embed.timestep_embedder.linear_1.\g<end>")),
    (rf"t_embedder\.mlp\.2\.{_END}", _same(r"time_text_embed.timestep_embedder.linear_2.\g<end>")),
    (rf"y_embedder\.mlp\.0\.{_END}", _same(r"time_text_embed.text_embedder.linear_1.\g<end>")),
    (rf"y_embedder\.mlp\.2\.{_END}", _same(r"time_text_embed.text_embedder.linear_2.\g<end>")),
    (rf"final_layer\.linear\.{_END}", _same(r"proj_out.\g<end>")),
    (rf"final_layer\.adaLN_modulation\.1\.{_END}",
     lambda m, x, last: [(m.expand(r"norm_out.linear.\g<end>"), swap_halves(x))]),
    (rf"{_B}\.x_block\.(?P<a>attn|attn2)\.qkv\.{_END}",
     _split3(tuple(rf"{_D}.\g<a>.to_{p}.\g<end>" for p in "qkv"))),
    (rf"{_B}\.context_block\.attn\.qkv\.{_END}", _split3(tuple(rf"{_D}.attn.add_{p}_proj.\g<end>" for p in "qkv"))),
    (rf"{_B}\.x_block\.(?P<a>attn|attn2)\.proj\.{_END}", _same(rf"{_D}.\g<a>.to_out.0.\g<end>")),
    (rf"{_B}\.context_block\.attn\.proj\.{_END}", _same(rf"{_D}.attn.to_add_out.\g<end>")),
    (rf"{_B}\.x_block\.(?P<a>attn|attn2)\.ln_(?P<p>q|k)\.weight", _same(rf"{_D}.\g<a>.norm_\g<p>.weight")),
    (rf"{_B}\.context_block\.attn\.ln_(?P<p>q|k)\.weight", _same(rf"{_D}.attn.norm_added_\g<p>.weight")),
    (rf"{_B}\.x_block\.adaLN_modulation\.1\.{_END}", _same(rf"{_D}.norm1.linear.\g<end>")),
    (rf"{_B}\.context_block\.adaLN_modulation\.1\.{_END}",
     lambda m, x, last: [(m.expand(rf"{_D}.norm1_context.linear.\g<end>"),
                          swap_halves(x) if int(m["i"]) == last else x)]),
    (rf"{_B}\.x_block\.mlp\.fc1\.{_END}", _same(rf"{_D}.ff.net.0.proj.\g<end>")),
    (rf"{_B}\.x_block\.mlp\.fc2\.{_END}", _same(rf"{_D}.ff.net.2.\g<end>")),
    (rf"{_B}\.context_block\.mlp\.fc1\.{_END}", _same(rf"{_D}.ff_context.net.0.proj.\g<end>")),
    (rf"{_B}\.context_block\.mlp\.fc2\.{_END}", _same(rf"{_D}.ff_context.net.2.\g<end>")),
]


def original_to_diffusers(tensors: Iterator[tuple[str, np.ndarray]], prefix: str, num_layers: int):
    """Rename (split, swap) the transformer's original tensors into diffusers' names, one at a time. Keys outside
    `prefix` or matched by no entry pass through under their own name, so the key-table check names them."""
    for key, value in tensors:
        if key.startswith(prefix):
            name = key[len(prefix):]
            for pattern, rename in ORIGINAL_TABLE:
                m = re.fullmatch(pattern, name)
                if m:
                    yield from rename(m, value, num_layers - 1)
                    break
            else:
                yield key, value
        else:
            yield key, value


def original_shapes(c: SD3Config) -> dict[str, tuple[int, ...]]:
    """Every key (without the section prefix) of Stability's layout for this config, with its shape."""
    d, p, size = c.inner_dim, c.patch_size, c.pos_embed_max_size

    def linear(name: str, out: int, inp: int) -> dict:
        return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}

    shapes = {"pos_embed": (1, size * size, d), "x_embedder.proj.weight": (d, c.in_channels, p, p),
              "x_embedder.proj.bias": (d,), **linear("context_embedder", d, c.joint_attention_dim),
              **linear("t_embedder.mlp.0", d, TIME_CHANNELS), **linear("t_embedder.mlp.2", d, d),
              **linear("y_embedder.mlp.0", d, c.pooled_projection_dim), **linear("y_embedder.mlp.2", d, d),
              **linear("final_layer.linear", p * p * c.output_channels, d),
              **linear("final_layer.adaLN_modulation.1", 2 * d, d)}
    norms = ("ln_q", "ln_k") if c.qk_norm else ()
    for i in range(c.num_layers):
        x, ctx, dual, last = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", \
            i in c.dual_attention_layers, i == c.num_layers - 1
        for attn in ("attn", "attn2") if dual else ("attn",):
            shapes.update({**linear(f"{x}.{attn}.qkv", 3 * d, d), **linear(f"{x}.{attn}.proj", d, d)})
            shapes.update({f"{x}.{attn}.{n}.weight": (c.attention_head_dim,) for n in norms})
        shapes.update({**linear(f"{x}.adaLN_modulation.1", (9 if dual else 6) * d, d),
                       **linear(f"{x}.mlp.fc1", MLP_RATIO * d, d), **linear(f"{x}.mlp.fc2", d, MLP_RATIO * d)})
        shapes.update({**linear(f"{ctx}.attn.qkv", 3 * d, d), **{f"{ctx}.attn.{n}.weight": (c.attention_head_dim,)
                                                                  for n in norms}})
        if last:  # the text only feeds the attention: no output projection, no MLP, 2 modulations
            shapes.update(linear(f"{ctx}.adaLN_modulation.1", 2 * d, d))
        else:
            shapes.update({**linear(f"{ctx}.attn.proj", d, d), **linear(f"{ctx}.adaLN_modulation.1", 6 * d, d),
                           **linear(f"{ctx}.mlp.fc1", MLP_RATIO * d, d), **linear(f"{ctx}.mlp.fc2", d, MLP_RATIO * d)})
    return shapes


INFERRED_FROM = ("pos_embed", "x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight",
                 "final_layer.linear.weight")


def config_from_original(path: str, prefix: str, attention_head_dim: int | None = None) -> dict:
    """The diffusers SD3Transformer2DModel config of the file's MM-DiT, from its tensors (module docstring)."""
    header, _ = streaming.read_header(path)
    shapes = {k[len(prefix):]: tuple(v["shape"]) for k, v in header.items() if k.startswith(prefix)}
    missing = [prefix + k for k in INFERRED_FROM if k not in shapes]
    if missing:
        raise common.ConversionError(f"{path}: cannot infer the SD3 transformer's config: missing {missing}")
    problems = []
    width, in_channels, patch, patch_w = (shapes["x_embedder.proj.weight"] + (0, 0, 0, 0))[:4]
    if len(shapes["x_embedder.proj.weight"]) != 4 or patch != patch_w:
        problems.append(f"{prefix}x_embedder.proj.weight has shape {shapes['x_embedder.proj.weight']}; expected "
                        "(width, in_channels, patch, patch)")
    blocks = sorted({int(m[1]) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
    if not blocks:
        problems.append(f"no {prefix}joint_blocks.* keys")
    norms = sorted(k for k in shapes if re.fullmatch(r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.ln_[qk]\.weight", k))
    head_dim = attention_head_dim or DEFAULT_HEAD_DIM
    if norms:
        stored = shapes[norms[0]][0]
        if attention_head_dim not in (None, stored):
            problems.append(f"attention_head_dim {attention_head_dim} given, but {prefix}{norms[0]} (the QK norm's "
                            f"scale, one per head channel) has length {stored}")
        head_dim = stored
    if width % head_dim:
        problems.append(f"width {width} ({prefix}x_embedder.proj.weight) is not a multiple of the attention head dim "
                        f"{head_dim}" + ("" if norms else " (not stored without QK norm: pass attention_head_dim, "
                                         "--attention-head-dim on the command line)"))
    table = shapes["pos_embed"]
    size = math.isqrt(table[1]) if len(table) == 3 else 0
    if len(table) != 3 or size * size != table[1] or table[0] != 1:
        problems.append(f"{prefix}pos_embed has shape {table}; expected (1, max_size^2, width)")
    out_rows = shapes["final_layer.linear.weight"][0]
    if patch and out_rows % (patch * patch):
        problems.append(f"{prefix}final_layer.linear.weight has {out_rows} rows, not a multiple of patch^2 = "
                        f"{patch * patch}")
    if problems:
        raise common.ConversionError(f"{path}: cannot infer the SD3 transformer's config: " + "; ".join(problems))
    config = {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 0,  # set from the table below
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": out_rows // (patch * patch),
        "num_layers": blocks[-1] + 1,
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "caption_projection_dim": shapes["context_embedder.weight"][0],
        "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
        "pos_embed_max_size": size,
        "dual_attention_layers": sorted({int(k.split(".")[1]) for k in shapes if ".x_block.attn2." in k}),
        "qk_norm": "rms_norm" if norms else None,
    }
    config["sample_size"] = infer_sample_size(path, prefix + "pos_embed", config)
    return config


def infer_sample_size(path: str, key: str, config: dict) -> int:
    """The sample_size whose sin-cos table the file stores (it sets the table's scale: coordinates run over
    max_size / (sample_size / patch) per patch). Read from the first grid row: the angle of column 1 at frequency 1
    estimates sample_size / patch / max_size; the nearest candidates are compared on the whole row. The full
    table is checked against the chosen one afterwards (sd3.check_position_table)."""
    size, patch = config["pos_embed_max_size"], config["patch_size"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    row = read_leading(path, key, size * dim).reshape(size, dim).astype(np.float32)[:, :dim // 2]  # columns' half
    estimate = math.atan2(row[1, 0], row[1, dim // 4]) * size if size > 1 else 1.0
    base = SD3Config(patch_size=patch, pos_embed_max_size=size, num_attention_heads=config["num_attention_heads"],
                     attention_head_dim=config["attention_head_dim"], caption_projection_dim=dim)
    error = lambda grid: float(np.abs(row - axis_embedding(dataclasses.replace(  # noqa: E731
        base, sample_size=grid * patch))).max())
    return patch * min({max(1, round(estimate) + k) for k in range(-2, 3)}, key=error)


def check_original_keys(path: str, prefix: str, keys: list[str], config: SD3Config) -> None:
    """Every key of the section against the layout the inferred config implies: unknown, missing and mis-shaped
    keys named as the file names them, all at once."""
    header, _ = streaming.read_header(path)
    expected = {prefix + k: v for k, v in original_shapes(config).items()}
    unknown = [k for k in keys if k not in expected]
    missing = sorted(set(expected) - set(keys))
    misshaped = [f"{k}: got {tuple(header[k]['shape'])}, expected {expected[k]}" for k in keys
                 if k in expected and tuple(header[k]["shape"]) != expected[k]]
    if unknown or missing or misshaped:
        described = (f"num_layers {config.num_layers}, {config.num_attention_heads} heads x "
                     f"{config.attention_head_dim}, dual attention {list(config.dual_attention_layers)}, qk_norm "
                     f"{config.qk_norm}")
        raise common.ConversionError(common._format_problems(
            f"{path} ({prefix or 'bare'} MM-DiT; inferred {described})", unknown, missing, misshaped, []))


def transformer_component(path: str, keys: list[str], attention_head_dim: int | None = None) -> Section:
    prefix = prefix_of(keys, "transformer")
    config = config_from_original(path, prefix, attention_head_dim)
    sd3_config = SD3Config.from_diffusers(config, path)
    check_original_keys(path, prefix, keys, sd3_config)
    shapes = flux.shapes_of(param_shapes(sd3_config))
    rename = functools.partial(original_to_diffusers, prefix=prefix, num_layers=sd3_config.num_layers)
    return Section(path, config, (path,), sd3.TRANSFORMER_RULES, shapes, layout="original", rename=rename,
                   prefix=prefix)


# --- the VAE (LDM layout) --------------------------------------------------------------------------

_RESNET = r"(?P<layer>norm1|conv1|norm2|conv2|nin_shortcut)\.(?P<end>weight|bias)"
_VAE_END = r"(?P<end>weight|bias)"


def _vae_name(name: str, up_blocks: int) -> str | None:
    """An LDM VAE key (without prefix) -> diffusers AutoencoderKL's, or None when it is not one."""
    flipped = lambda m: up_blocks - 1 - int(m["b"])  # noqa: E731  LDM numbers the decoder's blocks from the bottom
    layer = lambda m: m["layer"].replace("nin_shortcut", "conv_shortcut")  # noqa: E731
    table = [
        (rf"(?P<part>encoder|decoder)\.(?P<c>conv_in|conv_out)\.{_VAE_END}", lambda m: f"{m['part']}.{m['c']}"),
        (rf"(?P<part>encoder|decoder)\.norm_out\.{_VAE_END}", lambda m: f"{m['part']}.conv_norm_out"),
        (rf"encoder\.down\.(?P<b>\d+)\.block\.(?P<r>\d+)\.{_RESNET}",
         lambda m: f"encoder.down_blocks.{m['b']}.resnets.{m['r']}.{layer(m)}"),
        (rf"encoder\.down\.(?P<b>\d+)\.downsample\.conv\.{_VAE_END}",
         lambda m: f"encoder.down_blocks.{m['b']}.downsamplers.0.conv"),
        (rf"decoder\.up\.(?P<b>\d+)\.block\.(?P<r>\d+)\.{_RESNET}",
         lambda m: f"decoder.up_blocks.{flipped(m)}.resnets.{m['r']}.{layer(m)}" if int(m["b"]) < up_blocks else None),
        (rf"decoder\.up\.(?P<b>\d+)\.upsample\.conv\.{_VAE_END}",
         lambda m: f"decoder.up_blocks.{flipped(m)}.upsamplers.0.conv" if int(m["b"]) < up_blocks else None),
        (rf"(?P<part>encoder|decoder)\.mid\.block_(?P<r>[12])\.{_RESNET}",
         lambda m: f"{m['part']}.mid_block.resnets.{int(m['r']) - 1}.{layer(m)}"),
        (rf"(?P<part>encoder|decoder)\.mid\.attn_1\.(?P<n>norm|q|k|v|proj_out)\.{_VAE_END}",
         lambda m: f"{m['part']}.mid_block.attentions.0." + {"norm": "group_norm", "proj_out": "to_out.0"}.get(
             m["n"], f"to_{m['n']}")),
        (rf"(?P<q>quant_conv|post_quant_conv)\.{_VAE_END}", lambda m: m["q"]),
    ]
    for pattern, rename in table:
        m = re.fullmatch(pattern, name)
        if m:
            base = rename(m)
            return None if base is None else f"{base}.{m['end']}"
    return None


def ldm_vae_to_diffusers(tensors: Iterator[tuple[str, np.ndarray]], prefix: str, up_blocks: int):
    """Rename LDM VAE tensors to diffusers' names; the mid attention's 1 x 1 convolutions become linear weights.
    Keys that are not LDM VAE keys pass through under their own name (the key-table check names them)."""
    for key, value in tensors:
        name = _vae_name(key[len(prefix):], up_blocks) if key.startswith(prefix) else None
        if name is None:
            yield key, value
            continue
        if ".attentions.0.to_" in name and name.endswith(".weight") and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        yield name, value


# --- the text encoders -----------------------------------------------------------------------------

def strip_prefix(tensors: Iterator[tuple[str, np.ndarray]], prefix: str):
    """Keys under `prefix` lose it (transformers' names remain); others keep their own name."""
    return ((k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in tensors)


def clip_l_names(tensors: Iterator[tuple[str, np.ndarray]], prefix: str):
    """CLIP-L's tensors without a stored text_projection (replaced by the identity, module docstring)."""
    return flux.without_ignored((k, v) for k, v in strip_prefix(tensors, prefix) if k != CLIP_PROJECTION)


def identity_projection(config: dict, source: str) -> Callable[[], Iterator[tuple[str, np.ndarray]]]:
    hidden, projection = config.get("hidden_size"), config.get("projection_dim")
    if hidden != projection:
        raise ValueError(f"{source}: projection_dim {projection} != hidden_size {hidden}: SD3's CLIP-L pooled output "
                         "is unprojected, so its text_projection is the identity, which needs them equal")
    return lambda: iter([(CLIP_PROJECTION, np.eye(hidden, dtype=np.float32))])


def component_config(components_from: str, name: str, path: str, prefix: str) -> tuple[dict, str]:
    config_path = os.path.join(components_from, name, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: not found; {path} holds the {name} ({prefix}*) and its config "
                                f"comes from --components-from {components_from}")
    return read_json(config_path), config_path


def section_component(path: str, name: str, keys: list[str], components_from: str) -> Section:
    """The VAE, a CLIP or the T5 stored in the file, described by components_from/<name>/config.json."""
    from jax_inpaint_rl.models.layers import t5

    prefix = SECTIONS[name]
    config, config_path = component_config(components_from, name, path, prefix)
    source = f"{path} ({prefix}*)"
    common_args = dict(layout="original", prefix=prefix)
    if name == "vae":
        from tools.convert_weights.components import vae_rules

        shapes = flux.shapes_of(sd3.vae_shapes(config, config_path))
        up_blocks = len(config.get("up_block_types") or ())
        rename = functools.partial(ldm_vae_to_diffusers, prefix=prefix, up_blocks=up_blocks)
        return Section(source, config, (path,), vae_rules(), shapes, rename=rename, **common_args)
    if name == "text_encoder_3":
        tied = flux.T5_TIED if prefix + "shared.weight" in keys else None
        shapes = flux.shapes_of(t5.param_shapes(t5.T5Config.from_transformers(config, config_path)))
        rename = lambda tensors: flux.t5_names(strip_prefix(tensors, prefix), tied)  # noqa: E731
        return Section(source, config, (path,), flux.T5_RULES, shapes, flux.T5_STACKS, rename=rename, **common_args)
    rules, shapes = sd3.clip_rules_and_shapes(config, config_path)
    if name == "text_encoder":
        return Section(source, config, (path,), rules, shapes, rename=functools.partial(clip_l_names, prefix=prefix),
                       extra=identity_projection(config, config_path), **common_args)
    rename = lambda tensors: flux.without_ignored(strip_prefix(tensors, prefix))  # noqa: E731
    return Section(source, config, (path,), rules, shapes, rename=rename, **common_args)


# --- the whole file --------------------------------------------------------------------------------

def file_components(path: str, components_from: str | None = None,
                    attention_head_dim: int | None = None) -> tuple[dict[str, Component], list[str]]:
    """(output component -> Component, notes to print) for a single file.

    Without `components_from`: the transformer only (the notes name the file's other sections, not converted).
    With it: every SD3 component: the file's sections where it holds them (configs from the folder), the
    folder's components otherwise; the T5 from the file, else from the folder when its model_index.json lists
    one, else none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: single-file checkpoint not found")
    sections = section_keys(path)
    if "transformer" not in sections:
        raise common.ConversionError(f"{path}: no MM-DiT ({TRANSFORMER_PREFIX}* keys): not an SD3 / SD3.5 "
                                     f"checkpoint; sections found: {sorted(sections)}")
    transformer = transformer_component(path, sections["transformer"], attention_head_dim)
    c = SD3Config.from_diffusers(transformer.config, path)
    notes = [f"transformer     from {path} ({transformer.prefix or 'bare keys'}*), config inferred: {c.num_layers} "
             f"blocks, {c.num_attention_heads} heads x {c.attention_head_dim}, dual attention "
             f"{list(c.dual_attention_layers)}, qk_norm {c.qk_norm}, pos_embed_max_size {c.pos_embed_max_size}, "
             f"sample_size {c.sample_size}, in / out channels {c.in_channels} / {c.output_channels}"]
    components: dict[str, Component] = {"transformer": transformer}
    others = [name for name in SECTIONS if name != "transformer" and name in sections]
    if components_from is None:
        if others:
            notes.append(f"not converted: {path} also holds " + ", ".join(f"{n} ({SECTIONS[n]}*)" for n in others)
                         + "; a single file has neither their configs nor the tokenizers and scheduler: pass "
                         "--components-from DIR (a diffusers SD3 folder) to convert them into a complete folder")
        notes.append("wrote the transformer only: the folder is not loadable as an SD3 family (export-sd3 reads it)")
        return components, notes
    index = os.path.join(components_from, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"--components-from {components_from}: not a diffusers pipeline folder (no "
                                "model_index.json)")
    has_t5 = "text_encoder_3" in sections or (read_json(index).get("text_encoder_3") or [None])[0] is not None
    for name in ("vae", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if has_t5 else ()):
        folder = os.path.join(components_from, name)
        if name in sections:
            components[name] = section_component(path, name, sections[name], components_from)
            notes.append(f"{name:15s} from {path} ({SECTIONS[name]}*), config from {folder}")
            if name == "text_encoder":
                stored = SECTIONS[name] + CLIP_PROJECTION
                notes.append(f"{'':15s} text_projection: identity (SD3 uses CLIP-L's unprojected pooled output)"
                             + (f"; the file's {stored} is not used" if stored in sections[name] else ""))
        else:
            components[name] = sd3.folder_component(components_from, name)
            notes.append(f"{name:15s} from {folder}")
    if not has_t5:
        notes.append(f"{'text_encoder_3':15s} none ({path} holds no T5 and {index} lists none)")
    return components, notes
