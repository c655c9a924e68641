"""A converted Flux folder or a training run's export -> a diffusers transformer folder (FluxTransformer2DModel).

    python -m tools.convert_weights export-flux --src SRC --dst DST [--use-ema] [--dtype float32|bfloat16|float16]

SRC is either
  - a folder written by `flux-fill|flux-kontext|flux-dev` (params/transformer.safetensors, transformer/config.json), or
  - a training run's <output_dir>/export: orbax trees denoiser/ (and denoiser_ema/ with --use-ema) plus the run's
    config.json, whose model.path names the converted folder the run started from (its transformer/config.json
    describes the architecture).
DST gets config.json and diffusion_pytorch_model.safetensors; `FluxTransformer2DModel.from_pretrained(DST)`
loads it. The dtype is the stored one unless --dtype is given; float32 round trips are exact.

Memory: a converted file is streamed one layer of one tensor at a time; an orbax tree is read one leaf (all
layers of one stacked parameter) at a time, so the peak is the largest leaf: the single blocks' proj_out,
38 x 15360 x 3072, 7.2 GB in float32 (3.6 GB in bfloat16) for Flux.1.
"""
import dataclasses
import os
from typing import Callable

import numpy as np

from jax_inpaint_rl.models.params_io import flatten, read_json, unflatten
from tools.convert_weights import flux

EXPORT_CONFIG = "config.json"  # jax_inpaint_rl.checkpoint.export.CONFIG_FILE
FLUX_FAMILIES = ("flux_fill", "flux_kontext", "flux_dev")


def is_converted_folder(src: str) -> bool:
    return os.path.isfile(flux.params_file(src, "transformer"))


def is_training_export(src: str) -> bool:
    return os.path.isfile(os.path.join(src, EXPORT_CONFIG)) and os.path.isdir(os.path.join(src, "denoiser"))


@dataclasses.dataclass(frozen=True)
class Exporter:
    """What differs between the families' transformer exports: their name, families and diffusers writer."""
    what: str  # in messages: "Flux", "SD3"
    command: str  # the CLI subcommand
    families: tuple[str, ...]  # model.family values of the training exports it takes
    write: Callable  # (config, leaves, read, dst, dtype, source): the family's write_diffusers_transformer


FLUX = Exporter("Flux", "export-flux", FLUX_FAMILIES, flux.write_diffusers_transformer)


def run_config(src: str, exporter: Exporter = FLUX) -> tuple[str, dict]:
    """(converted folder the run started from, its transformer config) from an export's config.json."""
    path = os.path.join(src, EXPORT_CONFIG)
    model = read_json(path).get("model", {})
    if model.get("family") not in exporter.families:
        raise ValueError(f"{path}: model.family={model.get('family')!r}; {exporter.command} needs one of "
                         f"{exporter.families}")
    if model.get("tiny"):
        raise ValueError(f"{path}: model.tiny is set: the run trained a tiny random model, which has no diffusers "
                         "counterpart")
    folder = model.get("path") or ""
    if not is_converted_folder(folder):
        raise FileNotFoundError(f"{path}: model.path={folder!r} is not a converted {exporter.what} folder (no "
                                "params/transformer.safetensors); the export needs it for transformer/config.json")
    return folder, read_json(os.path.join(folder, "transformer", "config.json"))


def orbax_leaves(tree_path: str) -> tuple[dict, Callable[[str, int | None], np.ndarray]]:
    """({flax path: (shape, dtype)}, read(path, layer)) over an orbax tree, restoring one leaf at a time.

    The last restored leaf is kept, so reading every layer of a stacked leaf in turn restores it once."""
    import orbax.checkpoint as ocp

    metadata = flatten(ocp.StandardCheckpointer().metadata(tree_path).item_metadata.tree)
    leaves = {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in metadata.items()}
    checkpointer, cached = ocp.PyTreeCheckpointer(), {}

    def read(key: str, index: int | None) -> np.ndarray:
        if key not in cached:
            cached.clear()
            item = unflatten({key: 0})
            restore_args = unflatten({key: ocp.RestoreArgs(restore_type=np.ndarray)})
            restored = checkpointer.restore(tree_path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
            cached[key] = np.asarray(flatten(restored)[key])
        return cached[key] if index is None else cached[key][index]

    return leaves, read


def export(src: str, dst: str, use_ema: bool = False, dtype: str | None = None, exporter: Exporter = FLUX) -> None:
    """Write the transformer of `src` (converted folder or training export) as a diffusers folder at `dst`."""
    if is_converted_folder(src):
        if use_ema:
            raise ValueError(f"{src}: --use-ema needs a training export (denoiser_ema/); a converted folder holds "
                             "the base weights only")
        flux.export_transformer(src, dst, dtype, exporter.write)
    elif is_training_export(src):
        _, config = run_config(src, exporter)
        tree_path = os.path.join(os.path.abspath(src), "denoiser_ema" if use_ema else "denoiser")
        if not os.path.isdir(tree_path):
            raise FileNotFoundError(f"{tree_path}: missing (the run had ema.enabled=False); export without --use-ema")
        leaves, read = orbax_leaves(tree_path)
        exporter.write(config, leaves, read, dst, dtype, tree_path)
    else:
        raise FileNotFoundError(f"{src}: neither a converted {exporter.what} folder (params/transformer.safetensors) "
                                f"nor a training export ({EXPORT_CONFIG} + denoiser/)")


def add_arguments(parser, what: str = "Flux") -> None:
    parser.add_argument("--src", required=True, help=f"converted {what} folder, or a training run's export/ folder")
    parser.add_argument("--dst", required=True, help="output diffusers transformer folder")
    parser.add_argument("--use-ema", action="store_true", help="export the EMA weights (denoiser_ema/)")
    parser.add_argument("--dtype", default=None, choices=sorted(flux.OUTPUT_DTYPES),
                        help="output dtype (default: the stored one)")


def run(args, exporter: Exporter = FLUX) -> None:
    export(args.src, args.dst, args.use_ema, args.dtype, exporter)
    print(f"wrote {args.dst}" + (" (EMA weights)" if args.use_ema else ""))
