"""Flux.1 Fill / dev / Kontext checkpoints -> a folder `jax_inpaint_rl.models.flux.family.load` reads, and back.

The conversion library behind `python -m tools.convert_weights flux-fill|flux-kontext|flux-dev` (the command
line is flux_cli.py, which also runs the model check of flux_verify.py for --verify; both import this module,
which imports neither): key tables, `Component` (one model of the pipeline and where its tensors go),
`convert_component` / `verify_component`, `convert_pipeline`, and the export back to diffusers.

The source and output folders are described in flux_cli.py's docstring (the command's --help).
The tensor check (`verify_component`, `convert_pipeline(check_tensors=True)`) re-reads every source tensor
and checks the written one equals it (after the dtype cast); the model check (flux_verify.py) then runs each
component in torch and in Flax on the same seeded inputs. `export_transformer` / `write_diffusers_transformer`
write the transformer back to diffusers (`python -m tools.convert_weights export-flux`, flux_export.py).

Memory: the 12B transformer converts one tensor at a time. Source tensors are read with plain file
reads (no mmap, so nothing lingers in the resident set), transformed, and written straight into their
slot of an output safetensors file whose header is laid out up front from the model's expected shapes
(streaming.py); per-layer torch tensors land in their row of the stacked (scanned) Flax arrays. Peak memory
is a few copies of the largest single tensor. `export_transformer` streams the other way, to diffusers' layout.
"""
import dataclasses
import functools
import json
import os
import re
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from jax_inpaint_rl.models.params_io import read_json
from tools.convert_weights import common
from tools.convert_weights.common import Rule, identity, linear_to_flax
from tools.convert_weights.streaming import DTYPES, TensorFileWriter, iter_files, read_header, read_rows

OUTPUT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# --- stacked (scanned) layers ----------------------------------------------------------------------

def stack_of(path: str, stacks: tuple[str, ...]) -> str | None:
    """The scanned stack (a path prefix such as 'double_blocks' or 'language_model/layers') `path` lies in."""
    return next((stack for stack in stacks if path.startswith(stack + "/")), None)


def per_layer_shapes(stacked: Mapping[str, tuple[int, ...]], stacks: tuple[str, ...]) -> dict[str, tuple]:
    """{'double_blocks/attn/..': (L, a, b)} -> {'double_blocks/0/attn/..': (a, b), ...} for scanned stacks."""
    out = {}
    for path, shape in stacked.items():
        stack = stack_of(path, stacks)
        if stack is None:
            out[path] = tuple(shape)
        else:
            rest = path[len(stack) + 1:]
            out.update({f"{stack}/{i}/{rest}": tuple(shape[1:]) for i in range(shape[0])})
    return out


def split_layer(path: str, stacks: tuple[str, ...]) -> tuple[str, int | None]:
    """'double_blocks/3/attn/to_q/kernel' -> ('double_blocks/attn/to_q/kernel', 3); unstacked -> (path, None)."""
    stack = stack_of(path, stacks)
    if stack is None:
        return path, None
    index, _, rest = path[len(stack) + 1:].partition("/")
    return f"{stack}/{rest}", int(index)


def shapes_of(tree) -> dict[str, tuple[int, ...]]:
    from jax_inpaint_rl.models.params_io import flatten

    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


# --- key tables ------------------------------------------------------------------------------------

def linear(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/kernel", linear_to_flax)]
    return rules + ([Rule(rf"{torch_prefix}\.bias", f"{flax_prefix}/bias", identity)] if bias else [])


def norm_scale(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [Rule(rf"{torch_prefix}\.weight", f"{flax_prefix}/scale", identity)]


_DOUBLE, _SINGLE = r"transformer_blocks\.(\d+)", r"single_transformer_blocks\.(\d+)"
TRANSFORMER_RULES: list[Rule] = [
    *linear(r"x_embedder", "x_embedder"),
    *linear(r"context_embedder", "context_embedder"),
    *linear(r"time_text_embed\.(timestep_embedder|guidance_embedder|text_embedder)\.(linear_[12])",
            r"time_text_embed/\1/\2"),
    *linear(r"norm_out\.linear", "norm_out/linear"),
    *linear(r"proj_out", "proj_out"),
    *linear(rf"{_DOUBLE}\.(norm1|norm1_context)\.linear", r"double_blocks/\1/\2/linear"),
    *linear(rf"{_DOUBLE}\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
            r"double_blocks/\1/attn/\2"),
    *linear(rf"{_DOUBLE}\.attn\.to_out\.0", r"double_blocks/\1/attn/to_out"),
    *norm_scale(rf"{_DOUBLE}\.attn\.(norm_q|norm_k|norm_added_q|norm_added_k)", r"double_blocks/\1/attn/\2"),
    *linear(rf"{_DOUBLE}\.(ff|ff_context)\.net\.0\.proj", r"double_blocks/\1/\2/net_0_proj"),
    *linear(rf"{_DOUBLE}\.(ff|ff_context)\.net\.2", r"double_blocks/\1/\2/net_2"),
    *linear(rf"{_SINGLE}\.norm\.linear", r"single_blocks/\1/norm/linear"),
    *linear(rf"{_SINGLE}\.attn\.(to_q|to_k|to_v)", r"single_blocks/\1/attn/\2"),
    *norm_scale(rf"{_SINGLE}\.attn\.(norm_q|norm_k)", r"single_blocks/\1/attn/\2"),
    *linear(rf"{_SINGLE}\.(proj_mlp|proj_out)", r"single_blocks/\1/\2"),
]
TRANSFORMER_STACKS = ("double_blocks", "single_blocks")

_T5_BLOCK = r"encoder\.block\.(\d+)\.layer"
T5_RULES: list[Rule] = [
    Rule(r"shared\.weight", "embed_tokens/embedding", identity),
    Rule(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         "relative_attention_bias", identity),
    *linear(rf"{_T5_BLOCK}\.0\.SelfAttention\.(q|k|v|o)", r"blocks/\1/\2", bias=False),
    *norm_scale(rf"{_T5_BLOCK}\.0\.layer_norm", r"blocks/\1/attn_norm"),
    *linear(rf"{_T5_BLOCK}\.1\.DenseReluDense\.(wi_0|wi_1|wo)", r"blocks/\1/\2", bias=False),
    *norm_scale(rf"{_T5_BLOCK}\.1\.layer_norm", r"blocks/\1/ff_norm"),
    *norm_scale(r"encoder\.final_layer_norm", "final_norm"),
]
T5_STACKS = ("blocks",)
# Tied copy of shared.weight that some T5 checkpoints also store; identical, so it is dropped.
T5_TIED = "encoder.embed_tokens.weight"


# --- the original (Black Forest Labs) single-file layout -------------------------------------------

# (pattern, (match, tensor, inner_dim) -> [(diffusers key, tensor)]): fused qkv / linear1 split on axis 0.
ORIGINAL_TABLE: list[tuple[str, Callable]] = [
    (r"(time_in|vector_in|guidance_in)\.(in_layer|out_layer)\.(weight|bias)",
     lambda m, x, d: [(f"time_text_embed.{_EMBEDDERS[m[1]]}.{_LAYERS[m[2]]}.{m[3]}", x)]),
    (r"txt_in\.(weight|bias)", lambda m, x, d: [(f"context_embedder.{m[1]}", x)]),
    (r"img_in\.(weight|bias)", lambda m, x, d: [(f"x_embedder.{m[1]}", x)]),
    (r"double_blocks\.(\d+)\.(img|txt)_mod\.lin\.(weight|bias)",
     lambda m, x, d: [(f"transformer_blocks.{m[1]}.{'norm1' if m[2] == 'img' else 'norm1_context'}.linear.{m[3]}",
                       x)]),
    (r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)",
     lambda m, x, d: [(f"transformer_blocks.{m[1]}.attn.{name}.{m[3]}", part) for name, part in zip(
         ("to_q", "to_k", "to_v") if m[2] == "img" else ("add_q_proj", "add_k_proj", "add_v_proj"),
         np.split(x, 3, axis=0))]),
    (r"double_blocks\.(\d+)\.(img|txt)_attn\.norm\.(query|key)_norm\.scale",
     lambda m, x, d: [(f"transformer_blocks.{m[1]}.attn.norm_{'' if m[2] == 'img' else 'added_'}"
                       f"{m[3][0]}.weight", x)]),
    (r"double_blocks\.(\d+)\.(img|txt)_attn\.proj\.(weight|bias)",
     lambda m, x, d: [(f"transformer_blocks.{m[1]}.attn.{'to_out.0' if m[2] == 'img' else 'to_add_out'}.{m[3]}",
                       x)]),
    (r"double_blocks\.(\d+)\.(img|txt)_mlp\.(0|2)\.(weight|bias)",
     lambda m, x, d: [(f"transformer_blocks.{m[1]}.{'ff' if m[2] == 'img' else 'ff_context'}."
                       f"{'net.0.proj' if m[3] == '0' else 'net.2'}.{m[4]}", x)]),
    (r"single_blocks\.(\d+)\.modulation\.lin\.(weight|bias)",
     lambda m, x, d: [(f"single_transformer_blocks.{m[1]}.norm.linear.{m[2]}", x)]),
    (r"single_blocks\.(\d+)\.linear1\.(weight|bias)",
     lambda m, x, d: [(f"single_transformer_blocks.{m[1]}.{name}.{m[2]}", part) for name, part in zip(
         ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), np.split(x, [d, 2 * d, 3 * d], axis=0))]),
    (r"single_blocks\.(\d+)\.norm\.(query|key)_norm\.scale",
     lambda m, x, d: [(f"single_transformer_blocks.{m[1]}.attn.norm_{m[2][0]}.weight", x)]),
    (r"single_blocks\.(\d+)\.linear2\.(weight|bias)",
     lambda m, x, d: [(f"single_transformer_blocks.{m[1]}.proj_out.{m[2]}", x)]),
    (r"final_layer\.linear\.(weight|bias)", lambda m, x, d: [(f"proj_out.{m[1]}", x)]),
    # BFL splits the final modulation as (shift, scale), diffusers as (scale, shift).
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)",
     lambda m, x, d: [(f"norm_out.linear.{m[1]}", np.concatenate(np.split(x, 2, axis=0)[::-1], axis=0))]),
]
_EMBEDDERS = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
_LAYERS = {"in_layer": "linear_1", "out_layer": "linear_2"}
ORIGINAL_PREFIX = "model.diffusion_model."


def original_to_diffusers(tensors: Iterator[tuple[str, np.ndarray]], inner_dim: int):
    """Rename (and split fused qkv / linear1) original-layout tensors into diffusers keys, one at a time.

    Keys no entry matches pass through unchanged, so the key-table check reports them by their own name.
    """
    for key, value in tensors:
        key = key.removeprefix(ORIGINAL_PREFIX)
        for pattern, rename in ORIGINAL_TABLE:
            m = re.fullmatch(pattern, key)
            if m:
                yield from rename(m, value, inner_dim)
                break
        else:
            yield key, value


def config_from_original(path: str, axes_dims_rope=None) -> dict:
    """Infer the diffusers transformer config from an original checkpoint's tensor shapes (header only).

    `axes_dims_rope` is not stored in the file; Flux.1 (head dim 128) uses (16, 56, 56).
    """
    header, _ = read_header(path)
    shapes = {k.removeprefix(ORIGINAL_PREFIX): tuple(v["shape"]) for k, v in header.items()}
    needed = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
              "double_blocks.0.img_attn.norm.query_norm.scale"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise common.ConversionError(f"{path}: not an original Flux transformer checkpoint; missing {missing}")
    count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix)})  # noqa: E731
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if axes_dims_rope is None and head_dim != 128:
        raise ValueError(f"{path}: head dim {head_dim} is not Flux.1's 128; pass axes_dims_rope explicitly")
    return {
        "_class_name": "FluxTransformer2DModel",
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": count("double_blocks."),
        "num_single_layers": count("single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": any(k.startswith("guidance_in.") for k in shapes),
        "axes_dims_rope": list(axes_dims_rope or (16, 56, 56)),
        "patch_size": 1,
    }


# --- converting components -------------------------------------------------------------------------

def safetensors_files(folder: str, what: str) -> list[str]:
    """The (possibly sharded) weight files of a diffusers / transformers model folder, in shard order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: {what} folder not found")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights for the {what} (convert .bin checkpoints with "
                                "save_pretrained(safe_serialization=True) first)")
    return files


def write_params(source: str, tensors, rules: list[Rule], stacked_shapes: Mapping[str, tuple], stacks,
                 out_path: str, dtype, metadata=None, prefix: str = "") -> None:
    """Stream converted tensors into their slots of `out_path` (keys `prefix/path`); on any problem remove
    the file and raise."""
    writer = TensorFileWriter(out_path, {f"{prefix}{k}": v for k, v in stacked_shapes.items()}, dtype, metadata)
    try:
        for path, array in common.convert(source, tensors, rules, per_layer_shapes(stacked_shapes, stacks)):
            key, index = split_layer(path, stacks)
            writer.write(prefix + key, array, index)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def write_json(path: str, data: Mapping) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(data), f, indent=2, sort_keys=True)


def keep_names(tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    return tensors


def without_ignored(tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Drop the buffers some CLIP checkpoints store (position ids): they are not parameters."""
    from tools.convert_weights.components import is_ignored

    return ((k, v) for k, v in tensors if not is_ignored(k))


def t5_names(tensors: Iterator[tuple[str, np.ndarray]], tied: str | None) -> Iterator[tuple[str, np.ndarray]]:
    """Drop the tied embedding copy when shared.weight is stored (`tied`), else read the copy as shared.weight."""
    return ((k if k != T5_TIED else "shared.weight", v) for k, v in tensors if k != tied)


@dataclasses.dataclass(frozen=True)
class Component:
    """One model of the pipeline: its config, its source files, and where their tensors go.

    `rename` turns the files' (key, array) stream into torch state-dict names (diffusers / transformers);
    it works tensor by tensor, so the model check can read one block's tensors through it.
    """
    source: str
    config: dict
    files: tuple[str, ...]
    rules: list[Rule]
    shapes: dict[str, tuple[int, ...]]  # Flax path -> shape (stacked)
    stacks: tuple[str, ...] = ()
    layout: str = "diffusers"
    rename: Callable[[Iterator[tuple[str, np.ndarray]]], Iterator[tuple[str, np.ndarray]]] = keep_names

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """A fresh stream of (torch name, array) over every source tensor."""
        return self.rename(iter_files(list(self.files)))


def transformer_component(src: str, axes_dims_rope=None) -> Component:
    """A diffusers transformer folder, or an original single file (renamed and split on the fly)."""
    from jax_inpaint_rl.models.flux import transformer as flux_transformer

    if os.path.isdir(src):
        config = read_json(os.path.join(src, "config.json"))
        files, rename, layout = tuple(safetensors_files(src, "transformer")), keep_names, "diffusers"
    elif os.path.isfile(src):
        config = config_from_original(src, axes_dims_rope)
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        files, layout = (src,), "original"
        rename = functools.partial(original_to_diffusers, inner_dim=inner)
    else:
        raise FileNotFoundError(f"{src}: transformer checkpoint not found (expected a diffusers folder or an "
                                "original single .safetensors file)")
    shapes = shapes_of(flux_transformer.param_shapes(flux_transformer.FluxConfig.from_diffusers(config, src)))
    return Component(src, config, files, TRANSFORMER_RULES, shapes, TRANSFORMER_STACKS, layout, rename)


def t5_component(src: str) -> Component:
    """transformers T5EncoderModel folder; a stored tied copy of the embedding is dropped."""
    from jax_inpaint_rl.models.layers import t5

    config = read_json(os.path.join(src, "config.json"))
    files = tuple(safetensors_files(src, "T5 encoder"))
    keys = {k for path in files for k in read_header(path)[0]}
    rename = functools.partial(t5_names, tied=T5_TIED if "shared.weight" in keys else None)
    shapes = shapes_of(t5.param_shapes(t5.T5Config.from_transformers(config, src)))
    return Component(src, config, files, T5_RULES, shapes, T5_STACKS, rename=rename)


def vae_component(src: str) -> Component:
    """diffusers AutoencoderKL folder (Flux: 16 channels, shift factor, no quant convs)."""
    import jax

    from jax_inpaint_rl.models.layers import vae as vae_lib
    from tools.convert_weights.components import vae_rules

    config = read_json(os.path.join(src, "config.json"))
    model = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_diffusers(config, src))
    shapes = shapes_of(jax.eval_shape(lambda: vae_lib.init_params(model, jax.random.key(0))))
    return Component(src, config, tuple(safetensors_files(src, "VAE")), vae_rules(), shapes)


def clip_component(src: str) -> Component:
    """transformers CLIPTextModel folder (Flux uses its pooled output)."""
    import jax

    from jax_inpaint_rl.models.layers import clip_text
    from tools.convert_weights.components import clip_text_rules

    config = read_json(os.path.join(src, "config.json"))
    model = clip_text.CLIPTextTransformer(clip_text.CLIPTextConfig.from_transformers(config, src))
    shapes = shapes_of(jax.eval_shape(lambda: clip_text.init_params(model, jax.random.key(0))))
    files = tuple(safetensors_files(src, "CLIP text encoder"))
    return Component(src, config, files, clip_text_rules(), shapes, rename=without_ignored)


def params_file(dst: str, name: str) -> str:
    return os.path.join(dst, "params", f"{name}.safetensors")


def convert_component(component: Component, dst: str, name: str, dtype: str = "float32") -> None:
    """-> dst/params/<name>.safetensors (keys '<name>/<flax path>') and dst/<name>/config.json, streamed."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}")
    write_params(component.source, component.tensors(), component.rules, component.shapes, component.stacks,
                 params_file(dst, name), OUTPUT_DTYPES[dtype], {"source": component.source,
                                                                "layout": component.layout}, prefix=f"{name}/")
    write_json(os.path.join(dst, name, "config.json"), component.config)


def verify_component(component: Component, dst: str, name: str) -> int:
    """Re-read the source one tensor at a time; each must equal its written slot exactly (after the dtype cast)."""
    return verify_written(component.source, component.tensors(), component.rules,
                          per_layer_shapes(component.shapes, component.stacks),
                          lambda path: split_layer(path, component.stacks), dst, name)


def verify_written(source: str, tensors, rules, shapes: Mapping[str, tuple[int, ...]],
                   slot: Callable[[str], tuple[str, int | None]], dst: str, name: str) -> int:
    """Every converted source tensor (per-layer `shapes`) against its written row: `slot(path)` -> (stacked key,
    row or None); the number of tensors checked, or an error naming every one that differs."""
    out_path = params_file(dst, name)
    read, _ = read_rows(out_path)
    mismatched, count = [], 0
    for path, expected in common.convert(source, tensors, rules, shapes):
        key, index = slot(path)
        stored = read(f"{name}/{key}", index)
        if not np.array_equal(np.asarray(expected).astype(stored.dtype), stored):
            mismatched.append(path)
        count += 1
    if mismatched:
        raise common.ConversionError(f"{out_path}: {len(mismatched)} tensors differ from {source}: {mismatched}")
    return count


# --- export back to diffusers ----------------------------------------------------------------------

def meta_shapes(model_class, config: Mapping) -> dict[str, tuple[int, ...]]:
    """torch state-dict key -> shape of a diffusers model class built from `config` on the meta device."""
    import torch

    with torch.device("meta"):
        model = model_class.from_config(dict(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def diffusers_transformer_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    from diffusers import FluxTransformer2DModel

    return meta_shapes(FluxTransformer2DModel, config)


def export_transformer(folder: str, dst: str, dtype: str | None = None, write=None) -> None:
    """The transformer of a converted folder -> a diffusers transformer folder (config.json +
    diffusion_pytorch_model.safetensors), streamed one tensor at a time by `write` (a family's
    write_diffusers_transformer; Flux's by default)."""
    write = write or write_diffusers_transformer
    path = params_file(folder, "transformer")
    read, header = read_rows(path)
    prefix = "transformer/"
    foreign = sorted(k for k in header if not k.startswith(prefix))
    if foreign:
        raise common.ConversionError(f"{path}: keys outside '{prefix}': {foreign}")
    leaves = {k.removeprefix(prefix): (tuple(v["shape"]), np.dtype(DTYPES[v["dtype"]])) for k, v in header.items()}
    config = read_json(os.path.join(folder, "transformer", "config.json"))
    write(config, leaves, lambda key, index: read(prefix + key, index), dst, dtype, path)


def write_diffusers_transformer(config: Mapping, leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                                read: Callable[[str, int | None], np.ndarray], dst: str, dtype: str | None,
                                source: str) -> None:
    """Flax Flux transformer params -> dst/config.json + dst/diffusion_pytorch_model.safetensors (see
    `write_stacked_transformer`)."""
    from jax_inpaint_rl.models.flux import transformer as flux_transformer

    expected = shapes_of(flux_transformer.param_shapes(flux_transformer.FluxConfig.from_diffusers(config, source)))
    write_stacked_transformer(diffusers_transformer_shapes(config), TRANSFORMER_RULES, TRANSFORMER_STACKS, expected,
                              config, leaves, read, dst, dtype, source)


def write_stacked_transformer(torch_shapes: Mapping[str, tuple[int, ...]], rules: list[Rule], stacks,
                              expected: Mapping[str, tuple[int, ...]], config: Mapping,
                              leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                              read: Callable[[str, int | None], np.ndarray], dst: str, dtype: str | None,
                              source: str) -> None:
    """Flax transformer params (blocks stacked per `stacks`) -> dst/config.json + dst/diffusion_pytorch_model.
    safetensors under diffusers' names (`torch_shapes`, mapped by `rules`).

    `leaves` is {flax path: (shape, dtype)} of the stored (stacked) params and `read(path, layer)` one layer
    of one of them (layer None: the whole array). Shapes and names are checked against `expected` before
    anything is written; leaves are visited one at a time, each layer written into its slot, so a reader that
    loads a whole leaf (orbax) keeps one leaf in memory. `dtype` None keeps the stored dtype (float32 when the
    leaves mix dtypes).
    """
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}")
    mapping, unknown = common.map_keys(rules, torch_shapes)
    if unknown:
        raise common.ConversionError(f"export: diffusers keys without a rule: {unknown}")
    _check_leaves(source, leaves, expected)
    by_leaf: dict[str, list[tuple[int | None, str, Rule]]] = {}
    for torch_key, (flax_path, rule) in mapping.items():
        key, index = split_layer(flax_path, stacks)
        by_leaf.setdefault(key, []).append((index, torch_key, rule))
    stored = {np.dtype(d) for _, d in leaves.values()}
    out_dtype = OUTPUT_DTYPES[dtype] if dtype else (stored.pop() if len(stored) == 1 else np.float32)
    writer = TensorFileWriter(os.path.join(dst, "diffusion_pytorch_model.safetensors"), torch_shapes, out_dtype,
                              {"format": "pt"})
    try:
        for key in sorted(by_leaf):
            for index, torch_key, rule in by_leaf[key]:
                writer.write(torch_key, common.INVERSE[rule.transform](read(key, index)))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    write_json(os.path.join(dst, "config.json"), config)


def _check_leaves(source: str, leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                  expected: Mapping[str, tuple[int, ...]]) -> None:
    """Every expected transformer leaf stored with its shape, and nothing else; all problems in one error."""
    missing = sorted(set(expected) - set(leaves))
    extra = sorted(set(leaves) - set(expected))
    misshaped = sorted(f"{k}: got {tuple(leaves[k][0])}, expected {tuple(expected[k])}"
                       for k in set(leaves) & set(expected) if tuple(leaves[k][0]) != tuple(expected[k]))
    if missing or extra or misshaped:
        problems = [f"{title}: {items}" for title, items in (("missing", missing), ("not in the config's model", extra),
                                                            ("wrong shapes", misshaped)) if items]
        raise common.ConversionError(f"{source}: transformer params do not match its config.json; "
                                     + "; ".join(problems))


# --- the whole pipeline folder ----------------------------------------------------------------------

COPIED = ("tokenizer", "tokenizer_2", "scheduler")
VERIFY_TOLERANCE = 1e-4  # max |flax - torch| / max |torch| of any output in the model check (float32)


def pipeline_components(src: str, transformer: str | None = None, axes_dims_rope=None) -> dict[str, Component]:
    """Output subfolder -> Component for a diffusers Flux pipeline folder; the transformer may come from
    elsewhere (`transformer`: a diffusers transformer folder or an original single file)."""
    if not os.path.isfile(os.path.join(src, "model_index.json")):
        raise FileNotFoundError(f"{src}: not a diffusers pipeline folder (no model_index.json)")
    return {
        "transformer": transformer_component(transformer or os.path.join(src, "transformer"), axes_dims_rope),
        "vae": vae_component(os.path.join(src, "vae")),
        "text_encoder": clip_component(os.path.join(src, "text_encoder")),
        "text_encoder_2": t5_component(os.path.join(src, "text_encoder_2")),
    }


def convert_pipeline(variant: str, src: str, dst: str, dtype: str = "float32", transformer: str | None = None,
                     axes_dims_rope=None, check_tensors: bool = False) -> dict[str, Component]:
    """A diffusers Flux pipeline folder -> the folder `jax_inpaint_rl.models.flux.family.load` reads.

    A single original .safetensors file as `src` converts only the transformer (into dst/transformer).
    `check_tensors`: after writing each component, the tensor check (`verify_component`). Returns the
    converted components (output subfolder -> Component), which the model check
    (`flux_verify.check_models`) takes; `flux_cli.convert_pipeline` runs both for `--verify`."""
    from jax_inpaint_rl.models.flux import family as flux_family

    name = variant.replace("-", "_")
    if name not in flux_family.VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {[v.replace('_', '-') for v in flux_family.VARIANTS]}")
    if os.path.isfile(src):
        components = {"transformer": transformer_component(src, axes_dims_rope)}
    else:
        components = pipeline_components(src, transformer, axes_dims_rope)
    for folder, component in components.items():
        convert_component(component, dst, folder, dtype)
        if check_tensors:
            count = verify_component(component, dst, folder)
            print(f"verified {folder}: {count} tensors equal their source")
    if not os.path.isfile(src):
        finish_pipeline_folder(src, dst, name, dtype)
    return components


def finish_pipeline_folder(src: str, dst: str, name: str, dtype: str) -> None:
    """Copy the tokenizers and scheduler, write <family>.json, and check the components fit the variant."""
    import shutil

    from jax_inpaint_rl.models.flux import family as flux_family

    for folder in COPIED:
        if not os.path.isdir(os.path.join(src, folder)):
            raise FileNotFoundError(f"{src}: pipeline folder has no {folder}/")
        shutil.copytree(os.path.join(src, folder), os.path.join(dst, folder), dirs_exist_ok=True)
    write_json(os.path.join(dst, f"{name}.json"), {"family": name, "dtype": dtype, "source": os.path.abspath(src)})
    flux_family.folder_family(dst, name)  # raises unless the components fit the variant; (family, modules) unused
