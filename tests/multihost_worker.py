"""One process of the 2-process test (tests/test_multihost.py): the toy trainer over both processes' devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
        python -m tests.multihost_worker PROCESS_ID PORT OUTPUT_DIR
"""
import os
import pathlib
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_inpaint_rl import train
from jax_inpaint_rl.parallel import mesh as mesh_lib
from tests import test_train as T
from tests import toy_family

HOSTS = 2


class HostShard:
    """This host's block of rows of a global ListLoader's batches (what the data Loader does per host)."""

    def __init__(self, loader, process_index):
        self.loader, self.index = loader, process_index
        self.steps_per_epoch, self.fields, self.name = loader.steps_per_epoch, loader.fields, loader.name

    def _rows(self, batch):
        size = len(batch["prompt"]) // HOSTS
        rows = slice(self.index * size, (self.index + 1) * size)
        return {k: v[rows] for k, v in batch.items()}

    def __iter__(self):
        return self

    def __next__(self):
        return self._rows(next(self.loader))

    def state(self):
        return self.loader.state()

    def restore(self, state):
        self.loader.restore(state)

    def batch_at(self, epoch, index):
        return self._rows(self.loader.batch_at(epoch, index))


def config_for(output_dir, hosts: int):
    """The test's run: 2 prompts x 4 images per rollout batch over all hosts, on 4 devices."""
    return T.make_config(output_dir, "grpo", sample__prompts_per_batch=2 // hosts, mesh__data=4,
                         grpo__kl_beta=0.01, train__num_epochs=2)


def loaders(process_index: int = 0, hosts: int = 1) -> dict:
    whole = {"train": T.ListLoader(T.make_examples(12, 0), 2), "eval": T.ListLoader(T.make_examples(8, 1), 8)}
    if hosts == 1:
        return whole
    return {name: HostShard(loader, process_index) for name, loader in whole.items()}


def run(config, process_index: int = 0, hosts: int = 1):
    family, params = toy_family.tiny(seed=0, resolution=T.RES)
    runner = train.fit(config, family=family, params=params, loaders=loaders(process_index, hosts),
                       reward_fn=T.colour_reward)
    return runner, runner.summary


def main(process_id: int, port: int, output_dir: str) -> None:
    config = config_for(pathlib.Path(output_dir), HOSTS)
    config.distributed.enabled = True
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes, config.distributed.process_id = HOSTS, process_id
    mesh_lib.initialize_distributed(config.distributed)
    assert jax.process_count() == HOSTS and jax.device_count() == 4
    runner, _ = run(config, process_id, HOSTS)
    params = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
                          runner.state["params"])
    if process_id == 0:
        np.savez(os.path.join(output_dir, "final_params.npz"), **params)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
