"""Device meshes from config and the shardings the trainer puts batches and params on.

The batch axis is split over every data-parallel mesh axis ('data' and 'fsdp');
'tensor' splits weights. The same code runs on 1 CPU or a multi-host mesh: only
the axis sizes change.
"""
import math
import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def initialize_distributed(distributed) -> None:
    """Join the multi-process run described by config.distributed (once per process, before any device use).

    Unset fields (-1 / "") are detected by JAX from the cluster environment. On
    CPU, cross-process collectives go through gloo.
    """
    if not distributed.enabled:
        return
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = {"coordinator_address": distributed.coordinator_address or None,
             "num_processes": None if distributed.num_processes < 0 else distributed.num_processes,
             "process_id": None if distributed.process_id < 0 else distributed.process_id}
    jax.distributed.initialize(**given)


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over `devices` (all by default); one axis may be -1 to take the remaining devices.

    Fixed sizes that need fewer devices than there are use the first ones
    (e.g. a 1-device run on a host with 8)."""
    devices = jax.devices() if devices is None else devices
    unknown = set(axis_sizes) - set(AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected a subset of {AXES}")
    sizes = {axis: int(axis_sizes.get(axis, 1)) for axis in AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh: {len(devices)} devices do not divide into fixed axes of size {fixed}")
        sizes[free[0]] = len(devices) // fixed
    needed = math.prod(sizes.values())
    if needed > len(devices):
        raise ValueError(f"mesh {sizes} needs {needed} devices, have {len(devices)}")
    grid = np.asarray(devices[:needed]).reshape([sizes[axis] for axis in AXES])
    return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def host_rows(array) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in order (every row on a single host)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    blocks = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def from_host_rows(mesh: Mesh, local) -> jax.Array:
    """The global batch-sharded array whose rows on this host are `local` (each host passes its own rows)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def host_share(everyone: np.ndarray) -> np.ndarray:
    """This host's rows of a host-major array of every host's rows (the inverse of `all_hosts`)."""
    return everyone.reshape(jax.process_count(), -1, *everyone.shape[1:])[jax.process_index()]


def all_hosts(local: np.ndarray) -> np.ndarray:
    """Every host's rows of a per-sample host array, host-major (the global batch order)."""
    if jax.process_count() == 1:
        return np.asarray(local)
    gathered = multihost_utils.process_allgather(np.asarray(local))
    return gathered.reshape(-1, *gathered.shape[2:])
