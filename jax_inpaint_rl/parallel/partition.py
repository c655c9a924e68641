"""Where every parameter (and its optimizer moments, EMA, old and reference copies) lives on the mesh.

Two rules, applied to each leaf of rank >= 2 by its "/"-joined path:
- tensor: a family's rules (`Family.tensor_rules`) name the layers to split over the 'tensor' axis,
  Megatron style: q / k / v and the first feed-forward layer split their output
  features (axis -1), the attention output and the second feed-forward layer
  their input features (axis -2), so each pair needs one reduction;
- fsdp: the largest remaining axis is split over 'fsdp', and over 'tensor' too
  when no tensor rule used it (ZeRO-3 style: every leaf is 1 / (fsdp x tensor)
  per device); XLA gathers it where it is used.
Vectors and scalars (biases, norms, counters, rng) stay replicated. Paths are
searched, not matched, so optimizer-state paths (`.../mu/.../to_q/kernel`) get
their parameter's placement. Sharding never changes results, only memory and
communication: a test runs the same training on 1 device and on a
data x fsdp x tensor mesh and compares.
"""
import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TensorRules = Sequence[tuple[str, int]]  # (regex on the parameter path, axis split over 'tensor')


def path_string(path) -> str:
    """'/a/b/c' from a jax key path (dict keys, attributes and sequence indices alike)."""
    parts = (getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in path)
    return "/" + "/".join(str(part) for part in parts)


def leaf_spec(path: str, shape: tuple[int, ...], axis_sizes: dict[str, int], rules: TensorRules) -> P:
    if len(shape) < 2:
        return P()
    spec: list[Any] = [None] * len(shape)
    tensor = axis_sizes.get("tensor", 1)
    if tensor > 1:
        for pattern, axis in rules:
            if re.search(pattern, path) and shape[axis] % tensor == 0:
                spec[axis % len(shape)] = "tensor"
                break
    gather = [name for name in ("fsdp", "tensor") if axis_sizes.get(name, 1) > 1 and name not in spec]
    ways = math.prod(axis_sizes[name] for name in gather)
    free = [axis for axis, size in enumerate(shape) if spec[axis] is None and size % ways == 0]
    if gather and free:
        spec[max(free, key=lambda axis: shape[axis])] = gather[0] if len(gather) == 1 else tuple(gather)
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: TensorRules = ()) -> Any:
    """A NamedSharding for every array leaf of `tree` (params, optimizer state, the whole train state)."""
    sizes = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, leaf_spec(path_string(path), tuple(leaf.shape), sizes, rules)),
        tree)
