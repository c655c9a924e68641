"""Random weights for any parameter tree, by leaf name: the one rule every tiny model and benchmark uses.

Kernels N(0, 1 / fan_in) (fan_in = input features x kernel area; a leading axis
of a 3-D kernel is a scanned stack of layers), embeddings and other tables
N(0, 1 / width), biases 0, norm scales 1. Drawn on the host with NumPy:
initialising a tiny family through Flax's `init` costs a minute of tracing on a
small CPU, this costs milliseconds.
"""
import jax
import jax.numpy as jnp
import numpy as np

CONSTANT_LEAVES = {"bias": 0.0, "scale": 1.0}


def leaf_std(name: str, shape: tuple[int, ...]) -> float:
    """The standard deviation of a random leaf's normal draw (leaves in CONSTANT_LEAVES are not drawn)."""
    if name == "kernel":  # fan-in: the input features times a conv's receptive field (2-D or 3-D)
        area = int(np.prod(shape[:-2])) if len(shape) in (4, 5) else 1
        return float(shape[-2] * area) ** -0.5
    return float(shape[-1]) ** -0.5


def random_params(shapes, seed: int = 0, dtype=jnp.float32):
    """Random values for a tree of shapes (e.g. `jax.eval_shape` of an init), in `dtype`."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = str(getattr(path[-1], "key", path[-1])), tuple(leaf.shape)
        if name in CONSTANT_LEAVES:
            return jnp.full(shape, CONSTANT_LEAVES[name], dtype)
        return jnp.asarray(rng.standard_normal(shape, np.float32) * leaf_std(name, shape), dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
