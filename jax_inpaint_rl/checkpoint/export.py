"""Inference exports: the trained denoiser (and its EMA) saved with orbax, plus the run's config.

An export does not copy the frozen components (VAE, text encoders): they are
rebuilt from the config (`model.path` for converted weights, or the same tiny
seed), so the export of a 12B model is only the part that training changed.
Components other than the denoiser that the run changed are exported whole in
`base`: a tiny model's autoencoder fitted during the run, or the VLM policy's
LoRA-merged text encoder (whose run trains no denoiser and exports none).
`setup.read_export` rebuilds the family from the config and restores what is here.
"""
import os

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

CONFIG_FILE = "config.json"
FITTED = "base"  # components changed by the run (a tiny model's autoencoder, the VLM policy's text encoder)


def write_export(directory: str, config: ConfigDict, denoiser_params=None, ema_params=None,
                 base_params=None) -> None:
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    given = {"denoiser": denoiser_params, "denoiser_ema": ema_params, FITTED: base_params}
    trees = {name: tree for name, tree in given.items() if tree is not None}
    checkpointer = ocp.StandardCheckpointer()
    for name, tree in trees.items():
        checkpointer.save(os.path.join(directory, name), jax.device_get(tree), force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def _restore(path: str, like):
    return ocp.StandardCheckpointer().restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))


def read_denoiser(directory: str, like, use_ema: bool = False):
    """The exported denoiser params, shaped like `like` (to start a run from a previous one)."""
    name = "denoiser_ema" if use_ema else "denoiser"
    tree_path = os.path.join(os.path.abspath(directory), name)
    if not os.path.isdir(tree_path):
        hint = " (the run had ema.enabled=False)" if use_ema else ""
        raise FileNotFoundError(f"{tree_path}: missing{hint}; expected an export folder (<output_dir>/export)")
    return _restore(tree_path, like)


def holds_denoiser(directory: str) -> bool:
    """Whether the export holds a denoiser (a run that trained one)."""
    return os.path.isdir(os.path.join(os.path.abspath(directory), "denoiser"))


def read_trees(directory: str, like) -> dict:
    """The components an export holds in `base` (none for converted weights), each shaped like its `like`."""
    path = os.path.join(os.path.abspath(directory), FITTED)
    if not os.path.isdir(path):
        return {}
    held = list(ocp.StandardCheckpointer().metadata(path).item_metadata)
    unknown = sorted(set(held) - set(like))
    if unknown:
        raise ValueError(f"{path}: components {unknown} are not the family's (it has {sorted(like)})")
    return _restore(path, {name: like[name] for name in held})
