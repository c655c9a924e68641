"""Saving and resuming a run: the whole train state (orbax) plus the loader positions, epoch and history."""
from absl import logging

from jax_inpaint_rl.trainer.run import Run

RESUMED_LOADERS = ("train", "sft")


def save(run: Run) -> None:
    """Checkpoint at the optimizer-step count; a state already saved at that count is not saved again
    (non-finite updates leave params and optimizer unchanged, so it is the same good state)."""
    step = int(run.state["step"])
    if run.checkpointer.latest_step() == step:
        return
    loaders = {name: run.loaders[name].state() for name in RESUMED_LOADERS if run.loaders[name] is not None}
    run.checkpointer.save(step, run.state, {"epoch": run.epoch, "loaders": loaders, "history": run.history})
    run.checkpointer.wait()


def due(run: Run, step: int) -> bool:
    """checkpoint.interval optimizer steps have passed since the last save."""
    return step - (run.checkpointer.latest_step() or 0) >= run.config.checkpoint.interval


def resume(run: Run) -> bool:
    """Continue from the latest checkpoint in the output folder (checkpoint.resume); False when there is none."""
    step = run.checkpointer.latest_step() if run.config.checkpoint.resume else None
    if step is None:
        return False
    run.state, meta = run.checkpointer.restore(step, run.state)
    run.resumed_from, run.epoch, run.history = step, meta["epoch"], meta["history"]
    for name, position in meta["loaders"].items():
        run.loaders[name].restore(position)
    logging.warning("resumed from %s step %d (epoch %d)", run.checkpointer.directory, step, run.epoch)
    return True
