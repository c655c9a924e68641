"""Parameter trees on disk: flat safetensors files keyed by '/'-joined Flax paths.

Converted model folders and inference exports use this format because it can be
written one tensor at a time (the 12B Flux transformer converts on a 24 GB host)
and read back without torch. The converters also write `<family>.json`
({"family", "dtype", "source"}) into the folder: `check_family` reads it so that a
loader can say what a folder holds when it is not what was asked for.
"""
import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SEP = "/"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict of arrays -> {'a/b/kernel': array}."""
    flat = {}
    for name, value in tree.items():
        path = f"{prefix}{SEP}{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/kernel': array} -> nested dict of arrays."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(SEP)
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def save_params(path: str, tree: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write a parameter tree to one safetensors file (arrays are copied to host)."""
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(tree).items()}
    save_file(flat, path, metadata=dict(metadata or {}))


def load_params(path: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a parameter tree written by `save_params` (or a converter) as numpy arrays.

    A folder is read as every `*.safetensors` file inside it (sharded output).
    Top-level components named in `skip` are not read (e.g. a text encoder whose
    outputs the dataset supplies precomputed).
    """
    flat = {}
    for file in _safetensors_files(path):
        tensors = _read_file(file, skip)
        repeated = sorted(tensors.keys() & flat.keys())
        if repeated:
            raise ValueError(f"{file}: key {repeated[0]!r} appears in more than one shard")
        flat.update(tensors)
    return unflatten(flat)


def _read_file(file: str, skip: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One safetensors file's tensors but those of the `skip` components; a truncated or corrupt file is
    named (safetensors' own error names no file)."""
    try:
        with safe_open(file, framework="numpy") as reader:
            return {key: reader.get_tensor(key) for key in reader.keys() if key.split(SEP, 1)[0] not in skip}
    except SafetensorError as error:
        raise ValueError(f"{file}: truncated or corrupt safetensors file ({error}); expected a complete file "
                         f"written by save_params or a converter: convert or copy it again") from None


def _safetensors_files(path: str | os.PathLike) -> list[str]:
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors files in this folder")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: parameter file not found")
    return [path]


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config, naming the file when it is missing or malformed."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def family_markers(model_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{family: marker} for every `<family>.json` in a converted folder whose "family" is its file name."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: model folder not found (expected a folder written by "
                                "`python -m tools.convert_weights`)")
    markers = {}
    for name in sorted(os.listdir(model_dir)):
        stem, suffix = os.path.splitext(name)
        if suffix == ".json":
            content = read_json(os.path.join(model_dir, name))
            if isinstance(content, dict) and content.get("family") == stem:
                markers[stem] = content
    return markers


def check_family(model_dir: str | os.PathLike, asked: str) -> None:
    """Refuse a folder whose `<family>.json` names another family than `asked` (or several families); a
    folder without one (assembled by hand) is left to the configs and the shape check."""
    markers = family_markers(model_dir)
    if not markers or list(markers) == [asked]:
        return
    held = " and ".join(f"{family} ({family}.json: {marker.get('dtype')}, converted from {marker.get('source')})"
                        for family, marker in markers.items())
    raise ValueError(f"{os.fspath(model_dir)}: this folder holds {held}; asked to load it as {asked}: pass a "
                     f"folder converted for {asked}")


def check_shapes(source: str, params: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise naming every missing, unexpected or mis-shaped parameter of `params` against `expected`
    (trees of arrays or ShapeDtypeStructs)."""
    shape = lambda leaf: tuple(getattr(leaf, "shape", np.shape(leaf)))  # noqa: E731
    got = {path: shape(leaf) for path, leaf in flatten(params).items()}
    want = {path: shape(leaf) for path, leaf in flatten(expected).items()}
    problems = [f"missing {p}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {p}" for p in sorted(got.keys() - want.keys())]
    problems += [f"{p}: shape {got[p]}, expected {want[p]}" for p in sorted(got.keys() & want.keys())
                 if got[p] != want[p]]
    if problems:
        raise ValueError(f"{source}: parameters do not match the configs:\n  " + "\n  ".join(problems))
