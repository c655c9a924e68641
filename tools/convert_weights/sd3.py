"""SD3 / SD3.5 diffusers pipelines -> a folder of Flax params the SD3 family reads.

The conversion library behind `python -m tools.convert_weights sd3` (the command line, with single-file sources,
is sd3_cli.py; Stability's single-file layout is read by sd3_single.py; the model check is sd3_verify.py; the
export back to diffusers is sd3_export.py; this module imports none of them).

A diffusers pipeline folder holds transformer/ (SD3Transformer2DModel: SD3, SD3.5 Medium / Large), vae/
(AutoencoderKL with 16 latent channels; its scaling_factor and shift_factor, 1.5305 and 0.0609 for SD3, stay
in vae/config.json), text_encoder/ (CLIP-L) and text_encoder_2/ (CLIP-G), both CLIPTextModelWithProjection,
text_encoder_3/ (T5-XXL encoder; optional, as the SD3 pipelines allow: model_index.json lists it as null),
tokenizer/, tokenizer_2/, tokenizer_3/ (with the T5), scheduler/.

Output folder:
  params/transformer.safetensors     keys 'transformer/<flax path>'; each run of equal blocks stacked on a
                                     leading axis (transformer/blocks_13_to_22/attn/to_q/kernel: blocks 13..22)
  params/vae.safetensors             'vae/...'
  params/text_encoder.safetensors    'text_encoder/...'   CLIP-L text tower and its text_projection
  params/text_encoder_2.safetensors  'text_encoder_2/...' CLIP-G text tower and its text_projection
  params/text_encoder_3.safetensors  'text_encoder_3/...' T5 encoder, blocks stacked (when SRC has one)
  transformer/, vae/, text_encoder*/ config.json of each source component
  tokenizer*/, scheduler/            copied from the source
  sd3.json                           {"family": "sd3", "dtype", "source"}

The transformer's position table (`pos_embed.pos_embed`, a buffer diffusers saves) is not a parameter: our
model builds it from the config, and the conversion fails unless the stored one equals it to the stored
dtype's precision. Conversion streams one tensor at a time, as the Flux converter does (flux.py, streaming.py).
The tensor check (`check_tensors`) re-reads every source tensor and checks the written one equals it (after the
dtype cast); the model check (sd3_verify.py) then runs torch and Flax on the same seeded inputs.
"""
import os
import shutil

import ml_dtypes
import numpy as np

from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.sd3.transformer import SD3Config, axis_embedding, block_runs, param_shapes
from tools.convert_weights import common, flux
from tools.convert_weights.common import Rule, conv_to_flax, identity, linear_to_flax
from tools.convert_weights.flux import Component, linear, norm_scale
from tools.convert_weights.streaming import TensorFileWriter, read_header, read_rows

FAMILY = "sd3"
POSITION_TABLE = "pos_embed.pos_embed"  # diffusers' persistent buffer; rebuilt from the config, never converted
BLOCKS = "transformer_blocks"  # per-block Flax paths (transformer_blocks/<diffusers index>/...) before stacking

_BLOCK = r"transformer_blocks\.(\d+)"
TRANSFORMER_RULES: list[Rule] = [
    Rule(r"pos_embed\.proj\.weight", "pos_embed/proj/kernel", conv_to_flax),
    Rule(r"pos_embed\.proj\.bias", "pos_embed/proj/bias", identity),
    *linear(r"context_embedder", "context_embedder"),
    *linear(r"time_text_embed\.(timestep_embedder|text_embedder)\.(linear_[12])", r"time_text_embed/\1/\2"),
    *linear(r"norm_out\.linear", "norm_out/linear"),
    *linear(r"proj_out", "proj_out"),
    *linear(rf"{_BLOCK}\.(norm1|norm1_context)\.linear", rf"{BLOCKS}/\1/\2/linear"),
    *linear(rf"{_BLOCK}\.(attn|attn2)\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
            rf"{BLOCKS}/\1/\2/\3"),
    *linear(rf"{_BLOCK}\.(attn|attn2)\.to_out\.0", rf"{BLOCKS}/\1/\2/to_out"),
    *norm_scale(rf"{_BLOCK}\.(attn|attn2)\.(norm_q|norm_k|norm_added_q|norm_added_k)", rf"{BLOCKS}/\1/\2/\3"),
    *linear(rf"{_BLOCK}\.(ff|ff_context)\.net\.0\.proj", rf"{BLOCKS}/\1/\2/net_0_proj"),
    *linear(rf"{_BLOCK}\.(ff|ff_context)\.net\.2", rf"{BLOCKS}/\1/\2/net_2"),
]
PROJECTION_RULES: list[Rule] = [Rule(r"text_projection\.weight", "text_projection/kernel", linear_to_flax)]


# --- the transformer: blocks stacked per run of equal blocks ---------------------------------------

def block_slots(config: SD3Config) -> dict[int, tuple[str, int]]:
    """diffusers block index -> (its run's stack, its row in the stack)."""
    return {run.first + row: (run.name, row) for run in block_runs(config) for row in range(run.length)}


def per_block_shapes(stacked: dict[str, tuple[int, ...]], config: SD3Config) -> dict[str, tuple[int, ...]]:
    """Stacked Flax shapes -> one entry per diffusers block ('transformer_blocks/17/attn/to_q/kernel'), the
    paths the key table produces, so every missing or mis-shaped tensor is named by its block."""
    runs = {run.name: run for run in block_runs(config)}
    out = {}
    for path, shape in stacked.items():
        stack, _, rest = path.partition("/")
        if stack in runs:
            run = runs[stack]
            out.update({f"{BLOCKS}/{run.first + row}/{rest}": tuple(shape[1:]) for row in range(run.length)})
        else:
            out[path] = tuple(shape)
    return out


def block_slot(path: str, slots: dict[int, tuple[str, int]]) -> tuple[str, int | None]:
    """'transformer_blocks/17/attn/to_q/kernel' -> ('blocks_13_to_22/attn/to_q/kernel', 4); others -> (path, None)."""
    head, _, rest = path.partition("/")
    if head != BLOCKS:
        return path, None
    index, _, rest = rest.partition("/")
    stack, row = slots[int(index)]
    return f"{stack}/{rest}", row


def transformer_component(src: str) -> Component:
    """A diffusers SD3Transformer2DModel folder."""
    config = read_json(os.path.join(src, "config.json"))
    shapes = flux.shapes_of(param_shapes(SD3Config.from_diffusers(config, src)))
    return Component(src, config, tuple(flux.safetensors_files(src, "transformer")), TRANSFORMER_RULES, shapes)


def parameter_tensors(component: Component):
    """The transformer's source tensors without the position table (checked by `check_position_table`)."""
    return ((k, v) for k, v in component.tensors() if k != POSITION_TABLE)


def stored_position_table(component: Component) -> tuple[str, str]:
    """(file, key) of the stored table: the source key the component's renaming turns into POSITION_TABLE
    (diffusers' own name in a diffusers folder, `pos_embed` in Stability's layout)."""
    for path in component.files:
        header, _ = read_header(path)
        for key, entry in header.items():
            placeholder = np.broadcast_to(np.int8(0), tuple(entry["shape"]))  # renaming needs shapes only
            if any(name == POSITION_TABLE for name, _ in component.rename(iter([(key, placeholder)]))):
                return path, key
    raise common.ConversionError(f"{component.source}: {POSITION_TABLE} missing (diffusers saves the position "
                                 "table of an SD3Transformer2DModel with pos_embed_max_size)")


def check_position_table(component: Component, config: SD3Config) -> None:
    """The stored position table must be the one our model builds, to the stored dtype's precision (a checkpoint
    whose table came from other settings would otherwise convert and run with the wrong positions)."""
    path, key = stored_position_table(component)
    read, header = read_rows(path)
    size, dim, shape = config.pos_embed_max_size, config.inner_dim, tuple(header[key]["shape"])
    if shape != (1, size * size, dim):
        raise common.ConversionError(f"{path}: {key} has shape {shape}, expected {(1, size * size, dim)} "
                                     f"(pos_embed_max_size {size}, inner dim {dim})")
    stored = read(key, None).reshape(size, size, dim)
    tolerance = 1e-6 if stored.dtype == np.float32 else float(ml_dtypes.finfo(stored.dtype).eps)
    along, half, error = axis_embedding(config), dim // 2, 0.0
    for r, row in enumerate(stored):  # a grid row at a time: the float32 copy of a whole table can reach 1 GB
        row = row.astype(np.float32)  # channels: the column's embedding, then the row's
        error = max(error, float(np.abs(row[:, :half] - along).max()), float(np.abs(row[:, half:] - along[r]).max()))
    if error > tolerance:
        raise common.ConversionError(
            f"{path}: {key} differs from the sin-cos table built from the config (sample_size "
            f"{config.sample_size}, patch_size {config.patch_size}, pos_embed_max_size {size}): max |diff| "
            f"{error:.2e} > {tolerance:.0e}")


def convert_transformer(component: Component, dst: str, dtype: str = "float32") -> None:
    """-> dst/params/transformer.safetensors and dst/transformer/config.json, one tensor at a time; each block's
    tensors land in their row of their run's stack."""
    if dtype not in flux.OUTPUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(flux.OUTPUT_DTYPES)}")
    config = SD3Config.from_diffusers(component.config, component.source)
    check_position_table(component, config)
    slots = block_slots(config)
    writer = TensorFileWriter(flux.params_file(dst, "transformer"),
                              {f"transformer/{k}": v for k, v in component.shapes.items()},
                              flux.OUTPUT_DTYPES[dtype], {"source": component.source, "layout": component.layout})
    try:
        for path, array in common.convert(component.source, parameter_tensors(component), component.rules,
                                          per_block_shapes(component.shapes, config)):
            key, row = block_slot(path, slots)
            writer.write(f"transformer/{key}", array, row)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    flux.write_json(os.path.join(dst, "transformer", "config.json"), component.config)


def verify_transformer(component: Component, dst: str) -> int:
    """Re-read the source one tensor at a time; each must equal its written row exactly (after the dtype cast)."""
    config = SD3Config.from_diffusers(component.config, component.source)
    slots = block_slots(config)
    return flux.verify_written(component.source, parameter_tensors(component), component.rules,
                               per_block_shapes(component.shapes, config), lambda path: block_slot(path, slots),
                               dst, "transformer")


# --- the text encoders -----------------------------------------------------------------------------

def clip_rules_and_shapes(config: dict, source: str) -> tuple[list[Rule], dict[str, tuple[int, ...]]]:
    """Key table and Flax shapes of a CLIPTextModelWithProjection config (SD3 uses the projected pooled output)."""
    import jax

    from jax_inpaint_rl.models.layers import clip_text
    from tools.convert_weights.components import clip_text_rules

    clip_config = clip_text.CLIPTextConfig.from_transformers(config, source)
    if clip_config.projection_dim is None:
        raise ValueError(f"{source}: architectures {config.get('architectures')}; SD3 needs a "
                         f"{clip_text.WITH_PROJECTION} (its text_projection gives the pooled prompt embedding)")
    model = clip_text.CLIPTextTransformer(clip_config)
    shapes = flux.shapes_of(jax.eval_shape(lambda: clip_text.init_params(model, jax.random.key(0))))
    return clip_text_rules() + PROJECTION_RULES, shapes


def clip_component(src: str) -> Component:
    """A transformers CLIPTextModelWithProjection folder."""
    config = read_json(os.path.join(src, "config.json"))
    rules, shapes = clip_rules_and_shapes(config, src)
    files = tuple(flux.safetensors_files(src, "CLIP text encoder"))
    return Component(src, config, files, rules, shapes, rename=flux.without_ignored)


def vae_shapes(config: dict, source: str):
    """Flax parameter shapes (a tree of ShapeDtypeStructs) of an AutoencoderKL config."""
    import jax

    from jax_inpaint_rl.models.layers import vae as vae_lib

    model = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_diffusers(config, source))
    return jax.eval_shape(lambda: vae_lib.init_params(model, jax.random.key(0)))


def folder_component(src: str, name: str) -> Component:
    """Component `name` (transformer, vae, text_encoder, text_encoder_2, text_encoder_3) of a pipeline folder."""
    folder = os.path.join(src, name)
    if name == "transformer":
        return transformer_component(folder)
    if name == "vae":
        return flux.vae_component(folder)
    return flux.t5_component(folder) if name == "text_encoder_3" else clip_component(folder)


# --- the whole pipeline folder ---------------------------------------------------------------------

def pipeline_components(src: str) -> dict[str, Component]:
    """Output subfolder -> Component for a diffusers SD3 pipeline folder (the T5 when model_index.json lists it)."""
    index_path = os.path.join(src, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{src}: not a diffusers pipeline folder (no model_index.json)")
    names = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    if (read_json(index_path).get("text_encoder_3") or [None])[0] is not None:
        names.append("text_encoder_3")
    return {name: folder_component(src, name) for name in names}


def convert_pipeline(src: str, dst: str, dtype: str = "float32", check_tensors: bool = False) -> dict[str, Component]:
    """A diffusers SD3 pipeline folder -> the output folder described in the module docstring.

    `check_tensors`: after writing each component, the tensor check. Returns the converted components, which
    the model check (`sd3_verify.check_models`) takes."""
    components = pipeline_components(src)
    convert_components(components, dst, dtype, check_tensors)
    finish_folder(src, dst, dtype, "text_encoder_3" in components, {"source": os.path.abspath(src)})
    return components


def convert_components(components: dict[str, Component], dst: str, dtype: str = "float32",
                       check_tensors: bool = False) -> None:
    """Write each component (output subfolder -> Component) into dst; `check_tensors`: then its tensor check."""
    for name, component in components.items():
        transformer = name == "transformer"  # the only component whose stacks are runs of blocks
        if transformer:
            convert_transformer(component, dst, dtype)
        else:
            flux.convert_component(component, dst, name, dtype)
        if check_tensors:
            count = verify_transformer(component, dst) if transformer else flux.verify_component(component, dst, name)
            print(f"verified {name}: {count} tensors equal their source")


def finish_folder(src: str, dst: str, dtype: str, t5: bool, marker: dict) -> None:
    """Copy the tokenizers (tokenizer_3 with a T5) and the scheduler from the pipeline folder `src`; write
    sd3.json ({"family", "dtype"} and `marker`)."""
    for folder in ("tokenizer", "tokenizer_2", "scheduler") + (("tokenizer_3",) if t5 else ()):
        if not os.path.isdir(os.path.join(src, folder)):
            raise FileNotFoundError(f"{src}: pipeline folder has no {folder}/")
        shutil.copytree(os.path.join(src, folder), os.path.join(dst, folder), dirs_exist_ok=True)
    flux.write_json(os.path.join(dst, f"{FAMILY}.json"), {"family": FAMILY, "dtype": dtype, **marker})
