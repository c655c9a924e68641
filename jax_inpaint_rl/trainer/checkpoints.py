"""Saving and resuming a run: the whole train state (orbax) plus where the run stands (phase and step in it,
epoch, loader positions, history, summary, the metrics lines written) and the config that made it.

A checkpoint is numbered by the run's progress: autoencoder steps done plus
optimizer steps (warm-up and RL), so it grows through every phase. A resume
continues in the phase and at the step where the checkpoint was taken (the run
checked at build time that its config can continue it: trainer/output.py).
"""
from absl import logging

from jax_inpaint_rl.trainer import output
from jax_inpaint_rl.trainer.run import Run

RESUMED_LOADERS = ("train", "sft")
STOPPED_EXIT_STATUS = 143  # 128 + SIGTERM, the shell's convention for a run ended by the signal


class Stopped(Exception):
    """SIGTERM: the run saved a checkpoint at the step it reached and stopped (no export, no summary)."""


def progress(run: Run) -> int:
    """Autoencoder steps done plus optimizer steps: the checkpoint number, growing through every phase."""
    autoencoder_done = run.phase_step if run.phase == "autoencoder" else run.config.train.autoencoder_steps
    return autoencoder_done + int(run.state["step"])


def save(run: Run) -> None:
    """Checkpoint where the run stands; a position already saved is not saved again (non-finite updates leave
    params and optimizer unchanged, so it is the same good state)."""
    number = progress(run)
    if run.checkpointer.latest_step() == number:
        return
    loaders = {name: run.loaders[name].state() for name in RESUMED_LOADERS if name in run.loaders}
    meta = {"phase": run.phase, "phase_step": run.phase_step, "epoch": run.epoch, "loaders": loaders,
            "history": run.history, "summary": run.summary, "metrics_lines": run.log.lines(),
            "optimizer_step": int(run.state["step"]), "config": run.config.to_json_best_effort()}
    run.checkpointer.save(number, run.state, meta)
    run.checkpointer.wait()
    run.last_saved_step = int(run.state["step"])


def due(run: Run, step: int) -> bool:
    """checkpoint.interval optimizer steps have passed since the last save."""
    return step - run.last_saved_step >= run.config.checkpoint.interval


def stop_if_requested(run: Run) -> None:
    """At a step boundary: after a SIGTERM, save and stop."""
    if run.stop_requested:
        save(run)
        raise Stopped(f"SIGTERM: saved {run.phase} step {run.phase_step} (checkpoint {progress(run)} in "
                      f"{run.checkpointer.directory}); rerun the same command to continue")


def resume(run: Run) -> bool:
    """Continue from the chosen checkpoint in the output folder; False when there is none."""
    number = output.chosen_step(run.config, run.checkpointer)
    if number is None:
        return False
    run.state, meta = run.checkpointer.restore(number, run.state)
    run.resumed_from = number
    run.phase, run.phase_step, run.epoch = meta["phase"], meta["phase_step"], meta["epoch"]
    run.history, run.summary, run.last_saved_step = meta["history"], meta["summary"], meta["optimizer_step"]
    for name, position in meta["loaders"].items():
        run.loaders[name].restore(position)
    run.log.truncate(meta["metrics_lines"])  # what the run logged after this checkpoint is logged again
    logging.warning("resumed from %s checkpoint %d (%s step %d, epoch %d)", run.checkpointer.directory, number,
                    run.phase, run.phase_step, run.epoch)
    return True
