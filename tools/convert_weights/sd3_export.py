"""A converted SD3 folder or a training run's export -> a diffusers transformer folder (SD3Transformer2DModel).

    python -m tools.convert_weights export-sd3 --src SRC --dst DST [--use-ema] [--dtype float32|bfloat16|float16]

SRC is either
  - a folder written by `sd3` (params/transformer.safetensors, transformer/config.json; from a diffusers folder
    or from a single file, whose inferred config it keeps), or
  - a training run's <output_dir>/export: orbax trees denoiser/ (and denoiser_ema/ with --use-ema) plus the run's
    config.json, whose model.path names the converted folder the run started from (its transformer/config.json
    describes the architecture).
DST gets config.json and diffusion_pytorch_model.safetensors, a diffusers transformer/ folder:
`SD3Transformer2DModel.from_pretrained(DST)` loads it. Each run of stacked blocks is written back block by block
under diffusers' names; the position table (pos_embed.pos_embed, a buffer diffusers saves) is rebuilt from the
config, equal to diffusers' own. The dtype is the stored one unless --dtype is given; float32 round trips are exact.

Memory: a converted file is streamed one block of one tensor at a time; an orbax tree is read one leaf (all
blocks of one run of one parameter) at a time.
"""
import os
from typing import Callable, Mapping

import numpy as np

from jax_inpaint_rl.models.sd3.transformer import SD3Config, param_shapes, position_embedding
from tools.convert_weights import common, flux, flux_export, sd3
from tools.convert_weights.common import Rule
from tools.convert_weights.streaming import TensorFileWriter

SD3_FAMILIES = ("sd3", "sd3_inpaint")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """diffusers' SD3Transformer2DModel state-dict shapes (the position table included)."""
    from diffusers import SD3Transformer2DModel

    return flux.meta_shapes(SD3Transformer2DModel, config)


def write_diffusers_transformer(config: Mapping, leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                                read: Callable[[str, int | None], np.ndarray], dst: str, dtype: str | None,
                                source: str) -> None:
    """Flax SD3 transformer params -> dst/config.json + dst/diffusion_pytorch_model.safetensors (diffusers' names).

    `leaves` is {flax path: (shape, dtype)} of the stored (stacked) params and `read(path, row)` one row (one
    block) of one of them (row None: the whole array). Names and shapes are checked against the config before
    anything is written. `dtype` None keeps the stored dtype (float32 when the leaves mix dtypes)."""
    if dtype is not None and dtype not in flux.OUTPUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(flux.OUTPUT_DTYPES)}")
    c = SD3Config.from_diffusers(config, source)
    torch_shapes = diffusers_shapes(config)
    mapping, unknown = common.map_keys(sd3.TRANSFORMER_RULES, [k for k in torch_shapes if k != sd3.POSITION_TABLE])
    if unknown:
        raise common.ConversionError(f"export: diffusers keys without a rule: {unknown}")
    flux._check_leaves(source, leaves, flux.shapes_of(param_shapes(c)))
    slots = sd3.block_slots(c)
    by_leaf: dict[str, list[tuple[int | None, str, Rule]]] = {}
    for torch_key, (flax_path, rule) in mapping.items():
        key, row = sd3.block_slot(flax_path, slots)
        by_leaf.setdefault(key, []).append((row, torch_key, rule))
    stored = {np.dtype(d) for _, d in leaves.values()}
    out_dtype = flux.OUTPUT_DTYPES[dtype] if dtype else (stored.pop() if len(stored) == 1 else np.float32)
    writer = TensorFileWriter(os.path.join(dst, WEIGHTS), torch_shapes, out_dtype, {"format": "pt"})
    try:
        for key in sorted(by_leaf):  # one leaf at a time: an orbax reader holds one
            for row, torch_key, rule in by_leaf[key]:
                writer.write(torch_key, common.INVERSE[rule.transform](read(key, row)))
        size = c.pos_embed_max_size
        writer.write(sd3.POSITION_TABLE, position_embedding(c, size, size)[None])
        writer.close()
    except BaseException:
        writer.abort()
        raise
    flux.write_json(os.path.join(dst, "config.json"), config)


SD3 = flux_export.Exporter("SD3", "export-sd3", SD3_FAMILIES, write_diffusers_transformer)


def add_arguments(parser) -> None:
    flux_export.add_arguments(parser, SD3.what)


def run(args) -> None:
    flux_export.run(args, SD3)
