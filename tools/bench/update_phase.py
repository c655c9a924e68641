"""The update phase of one epoch of a recipe: a minibatch's trained steps as one program call each (the
default) or scanned in one call (train.scan_trained_steps).

    python -m tools.bench.update_phase [--config configs/demo.py] [--epochs 4] [--config.a.b=value ...]

Builds the run as the trainer does (tiny models for recipes that set model.tiny,
the demo by default), collects one epoch of rollouts, then times the algorithm's
update phase on it `--epochs` times each way, as trainer/update.py runs it
(dispatch every call, one read of the metrics at the end). Prints, as JSON, each
way's first phase (compile included) and the median of the others, in seconds,
with the number of accumulate calls per phase.
"""
import json
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jax_inpaint_rl.trainer import collect, update
from jax_inpaint_rl.trainer.run import build

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Recipe file.", lock_config=False)
flags.DEFINE_integer("epochs", 4, "Update phases timed per way (the first includes compiling).")


def time_phase(run, collected, epochs: int) -> dict:
    key = jax.random.key(0)
    durations, calls = [], 0
    for _ in range(epochs):
        start = time.perf_counter()
        metrics = update.train(run, run.algorithm, collected, key)
        update.settle(run, run.algorithm, metrics)
        durations.append(time.perf_counter() - start)
        calls = len(metrics)
    return {"first_s": durations[0], "median_s": statistics.median(durations[1:] or durations), "calls": calls}


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    config.output_dir = "/tmp/update_phase_bench"
    config.checkpoint.resume = False
    run = build(config)
    if run.algorithm.sampler is None:
        sys.exit("the recipe's algorithm learns from the dataset: its micro-batches have no steps to scan")
    collected, _ = collect.epoch(run, run.algorithm, run.next_key())
    results = {"method": run.algorithm.name, "samples": int(np.size(collected["rewards"]))}
    for way, scan in (("one_call_per_step", False), ("scanned", True)):
        run.config.train.scan_trained_steps = scan
        results[way] = time_phase(run, collected, flags.FLAGS.epochs)
    run.checkpointer.close()
    run.rewards.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
