"""Parameter trees on disk: flat safetensors files keyed by '/'-joined Flax paths.

Converted model folders and inference exports use this format because it can be
written one tensor at a time (the 12B Flux transformer converts on a 24 GB host)
and read back without torch.
"""
import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
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
    files = _safetensors_files(path)
    flat = {}
    for file in files:
        with safe_open(file, framework="numpy") as reader:
            for key in reader.keys():
                if key.split(SEP, 1)[0] in skip:
                    continue
                if key in flat:
                    raise ValueError(f"{file}: key {key!r} appears in more than one shard")
                flat[key] = reader.get_tensor(key)
    return unflatten(flat)


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
