"""The update phase of one epoch of a recipe, with a minibatch's trained steps scanned in one program or run as
one program call per step.

    python -m tools.bench.update_phase [--config configs/demo.py] [--epochs 3] [--config.a.b=value ...]

Builds the run as the trainer does (tiny models for recipes that set model.tiny,
the demo by default), collects one epoch of rollouts, then times the algorithm's
update phase on it several times: `scan` (the trainer's way: every micro-batch
is one `make_accumulate` call that scans over its K trained steps) and
`per_step` (each micro-batch cut into K single-step calls of the same program).
Prints, as JSON, each way's first phase (compile included) and the median of
the others, in seconds, with the number of program calls.
"""
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jax_inpaint_rl.algorithms.base import MicroBatch
from jax_inpaint_rl.trainer import collect, update
from jax_inpaint_rl.trainer.run import build

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Recipe file.", lock_config=False)
flags.DEFINE_integer("epochs", 3, "Update phases timed per way (the first includes compiling).")


def per_step(micro_batches):
    """The same micro-batches, each cut into single-step calls (K of them)."""
    def cut(micro_batch):
        count = jax.tree.leaves(micro_batch.steps)[0].shape[1] if micro_batch.steps else 1
        return [MicroBatch(micro_batch.batch, jax.tree.map(lambda a, k=k: a[:, k:k + 1], micro_batch.steps))
                for k in range(count)]

    return [[piece for micro_batch in one_pass for piece in cut(micro_batch)] for one_pass in micro_batches]


def time_phase(run, algorithm, collected, epochs: int) -> dict:
    key = jax.random.key(0)
    durations = []
    for _ in range(epochs):
        start = time.perf_counter()
        metrics = update.train(run, algorithm, collected, key)
        update.settle(run, algorithm, metrics)
        durations.append(time.perf_counter() - start)
    calls = sum(len(one_pass) for one_pass in algorithm.micro_batches(collected, key))
    return {"first_s": durations[0], "median_s": statistics.median(durations[1:] or durations), "calls": calls}


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    config.output_dir = "/tmp/update_phase_bench"
    config.checkpoint.resume = False
    run = build(config)
    collected, _ = collect.epoch(run, run.algorithm, run.next_key())
    if run.algorithm.sampler is None:
        sys.exit("the recipe's algorithm learns from the dataset: its micro-batches have no steps to scan")
    scanned = run.algorithm
    stepped = dataclasses.replace(scanned, name=f"{scanned.name}_per_step",
                                  micro_batches=lambda c, k: per_step(scanned.micro_batches(c, k)))
    results = {"method": scanned.name, "samples": int(np.size(collected["rewards"])),
               "scan": time_phase(run, scanned, collected, flags.FLAGS.epochs),
               "per_step": time_phase(run, stepped, collected, flags.FLAGS.epochs)}
    run.checkpointer.close()
    run.rewards.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
