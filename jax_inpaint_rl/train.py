"""python -m jax_inpaint_rl.train --config=configs/<recipe>.py [--config.a.b=value ...]

The loop composes family x algorithm x reward x data, all values built from the
config (trainer/run.py): each epoch collects what the algorithm trains on
(rollouts scored by the rewards, or dataset batches), runs its micro-batches
through one jitted accumulation and optimizer step, and lets the algorithm
update its own state (NFT's old params). The loop never asks which family or
algorithm it runs.
"""
import json
import os
import signal
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from jax_inpaint_rl import report
from jax_inpaint_rl.checkpoint.export import write_export
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.registry import resolve
from jax_inpaint_rl.trainer import autoencoder, checkpoints, collect, update
from jax_inpaint_rl.trainer.evaluate import evaluate
from jax_inpaint_rl.trainer.run import Run, build

WARMUP_LOG_EVERY = 25  # warm-up steps between metric reads (the host waits for the device only then)


def fit(config, **pieces) -> Run:
    """Train as the config says; `pieces` (family, params, loaders, reward_fn) replace what it would build.
    Returns the finished run (its state, history and `summary`). A SIGTERM saves at the next step boundary of
    any phase and raises `checkpoints.Stopped`; rerunning the same config continues there."""
    run = build(config, **pieces)
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(run, "stop_requested", True))
    try:
        checkpoints.resume(run)
        if run.phase == "autoencoder":
            autoencoder.fit(run)
            run.phase, run.phase_step = "warmup", 0
        if run.phase == "warmup":
            warm_up(run)
            run.phase, run.phase_step = "rl", 0
        if "eval_reward_after_warmup" not in run.summary:
            run.summary["eval_reward_after_warmup"] = evaluate(run, "after_warmup")
            run.history.append({"step": int(run.state["step"]), "eval_reward": run.summary["eval_reward_after_warmup"]})
        train_epochs(run)
        run.summary["eval_reward_final"] = next((h["eval_reward"] for h in reversed(run.history)
                                                 if "eval_reward" in h), float("nan"))
        finish(run)
        return run
    except update.NonFiniteUpdates as error:  # the state now produces them: it is not saved
        latest = run.checkpointer.latest_step()
        where = (f"checkpoint {latest} in {run.checkpointer.directory} is the last good state" if latest is not None
                 else "no checkpoint was saved before")
        raise update.NonFiniteUpdates(f"{error} in {run.phase} step {run.phase_step}; {where} (a lower learning "
                                      "rate, then the same command, continues from it)") from error
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        run.close()


def train_epochs(run: Run) -> None:
    """Epochs until train.num_epochs or train.max_train_steps; evaluate, log and save on schedule."""
    c = run.config
    for epoch in tqdm(range(run.epoch, c.train.num_epochs), desc="epochs", initial=run.epoch,
                      total=c.train.num_epochs):
        run.epoch = epoch
        start = time.time()
        record = one_epoch(run)
        record["epoch_time_s"] = time.time() - start
        record["images_per_s"] = record.pop("samples") / record["epoch_time_s"]
        record["learning_rate"] = c.train.learning_rate
        run.epoch = run.phase_step = epoch + 1
        step = int(run.state["step"])
        last = run.epoch == c.train.num_epochs or 0 < c.train.max_train_steps <= step
        if run.epoch % c.eval.interval == 0 or last:
            record["eval_reward"] = evaluate(run, f"epoch{run.epoch:04d}")
        run.history.append({"step": step, **{k: float(v) for k, v in record.items()
                                             if k in ("reward_mean", "eval_reward")}})
        run.log.write(step, record, phase="rl")
        if checkpoints.due(run, step) or last:
            checkpoints.save(run)
        if last:
            break
        checkpoints.stop_if_requested(run)


def one_epoch(run: Run) -> dict:
    """Collect, update, and the algorithm's after-epoch step; the record of the epoch."""
    collected, record = collect.epoch(run, run.algorithm, run.next_key())
    start = time.time()
    metrics = update.train(run, run.algorithm, collected, run.next_key())
    record.update(update.settle(run, run.algorithm, metrics))
    record["update_s"] = time.time() - start
    run.state = run.algorithm.after_epoch(run.state, run.epoch)
    return record


def warm_up(run: Run) -> None:
    """train.warmup_steps SFT optimizer steps toward the dataset's targets before RL, from run.phase_step."""
    steps, every = run.config.train.warmup_steps, run.config.train.gradient_accumulation_steps
    pending, first_step = [], int(run.state["step"]) - run.phase_step
    for number in tqdm(range(run.phase_step, steps), desc="SFT warm-up", initial=run.phase_step, total=steps,
                       disable=steps == 0):
        pending += update.train(run, run.warmup, collect.dataset(run, every), run.next_key())
        run.phase_step = number + 1
        due = checkpoints.due(run, first_step + run.phase_step)  # one optimizer step per warm-up step
        if run.phase_step % WARMUP_LOG_EVERY == 0 or run.phase_step == steps or run.stop_requested or due:
            metrics = update.settle(run, run.warmup, pending)
            run.log.write(int(run.state["step"]), {f"warmup/{k}": v for k, v in metrics.items()}, phase="warmup")
            pending = []
        if due:
            checkpoints.save(run)
        checkpoints.stop_if_requested(run)


def finish(run: Run) -> None:
    """The inference export (merged denoiser and EMA), the reward curve and summary.json."""
    c = run.config
    merge = jax.jit(run.merge)
    merged = {name: merge(run.denoiser_base, run.state[name]) for name in ("params", "ema") if name in run.state}
    write_export(os.path.join(c.output_dir, "export"), c, merged["params"], merged.get("ema"), run.state.get("base"))
    if jax.process_index() == 0:
        report.save_reward_curve(os.path.join(c.output_dir, "reward_curve.png"), run.history)
        with open(os.path.join(c.output_dir, "summary.json"), "w") as f:
            json.dump(run.summary, f, indent=2)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py", lock_config=True)


# config.policy_kind -> the loop that trains that kind of policy ("module:function" of the config); a config
# without one trains a family's denoiser with `fit` below
POLICY_KINDS = {"vlm": "jax_inpaint_rl.vlm_policy.loop:main"}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # progress is tqdm; orbax logs every save at INFO
    if "policy_kind" in _CONFIG.value:
        resolve(_CONFIG.value.policy_kind, POLICY_KINDS, "policy_kind")(_CONFIG.value)
        return
    mesh_lib.initialize_distributed(_CONFIG.value.distributed)
    try:
        print(json.dumps(fit(_CONFIG.value).summary, indent=2))
    except checkpoints.Stopped as stopped:
        logging.warning("%s", stopped)
        sys.exit(checkpoints.STOPPED_EXIT_STATUS)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
