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
import time

import jax
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from jax_inpaint_rl import report
from jax_inpaint_rl.checkpoint.export import write_export
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.trainer import checkpoints, collect, update
from jax_inpaint_rl.trainer.evaluate import evaluate
from jax_inpaint_rl.trainer.run import Run, build

WARMUP_LOG_EVERY = 25  # warm-up steps between metric reads (the host waits for the device only then)


def fit(config, **pieces) -> Run:
    """Train as the config says; `pieces` (family, params, loaders, reward_fn) replace what it would build.
    Returns the finished run (its state, history and `summary`)."""
    run = build(config, **pieces)
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(run, "stop_requested", True))
    try:
        if not checkpoints.resume(run):
            fit_autoencoder(run)
            warm_up(run)
            run.summary["eval_reward_after_warmup"] = evaluate(run, "after_warmup")
            run.history.append({"step": int(run.state["step"]), "eval_reward": run.summary["eval_reward_after_warmup"]})
        train_epochs(run)
        run.summary["eval_reward_final"] = next((h["eval_reward"] for h in reversed(run.history)
                                                 if "eval_reward" in h), float("nan"))
        finish(run)
        return run
    except update.NonFiniteUpdates as error:
        checkpoints.save(run)
        raise update.NonFiniteUpdates(f"{error}; the last good state is saved in {run.checkpointer.directory}") \
            from error
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        run.checkpointer.close()
        run.rewards.close()
        run.log.close()


def train_epochs(run: Run) -> None:
    """Epochs until train.num_epochs, train.max_train_steps or SIGTERM; evaluate, log and save on schedule."""
    c = run.config
    for epoch in tqdm(range(run.epoch, c.train.num_epochs), desc="epochs", initial=run.epoch,
                      total=c.train.num_epochs):
        run.epoch = epoch
        start = time.time()
        record = one_epoch(run)
        record["epoch_time_s"] = time.time() - start
        record["images_per_s"] = record.pop("samples") / record["epoch_time_s"]
        record["learning_rate"] = c.train.learning_rate
        run.epoch = epoch + 1
        step = int(run.state["step"])
        last = run.epoch == c.train.num_epochs or 0 < c.train.max_train_steps <= step
        if run.epoch % c.eval.interval == 0 or last:
            record["eval_reward"] = evaluate(run, f"epoch{run.epoch:04d}")
        run.history.append({"step": step, **{k: float(v) for k, v in record.items()
                                             if k in ("reward_mean", "eval_reward")}})
        run.log.write(step, record)
        if checkpoints.due(run, step) or last or run.stop_requested:
            checkpoints.save(run)
        if run.stop_requested:
            logging.warning("SIGTERM: saved step %d and stopping", step)
        if last or run.stop_requested:
            break


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
    """train.warmup_steps SFT optimizer steps toward the dataset's targets before RL."""
    steps, every = run.config.train.warmup_steps, run.config.train.gradient_accumulation_steps
    pending = []
    for number in tqdm(range(steps), desc="SFT warm-up", disable=steps == 0):
        pending += update.train(run, run.warmup, collect.dataset(run, every), run.next_key())
        if (number + 1) % WARMUP_LOG_EVERY == 0 or number == steps - 1:
            metrics = update.settle(run, run.warmup, pending)
            run.log.write(int(run.state["step"]), {f"warmup/{k}": v for k, v in metrics.items()})
            pending = []


def fit_autoencoder(run: Run) -> None:
    """Tiny models start from random weights, VAE included: fit it as an autoencoder on the training
    images first (latents kept near unit scale), so rewards computed on decoded pixels mean something."""
    steps = run.config.train.autoencoder_steps
    if steps <= 0:
        return
    optimizer, family = optax.adam(run.config.train.autoencoder_learning_rate), run.family

    def loss_fn(frozen, images):
        latents = family.encode_image(frozen, images)
        reconstruction = jax.numpy.mean((family.decode(frozen, latents) - images) ** 2)
        return reconstruction + 0.1 * (jax.numpy.std(latents) - 1.0) ** 2, reconstruction

    @jax.jit
    def fit_step(frozen, opt_state, images):
        (_, reconstruction), grads = jax.value_and_grad(loss_fn, has_aux=True)(frozen, images)
        updates, opt_state = optimizer.update(grads, opt_state, frozen)
        return optax.apply_updates(frozen, updates), opt_state, reconstruction

    frozen = run.state["base"]
    opt_state = optimizer.init(frozen)
    for step in tqdm(range(steps), desc="autoencoder fit"):
        batch = next(run.loaders["train"])
        pixels = [batch["image"]] + ([batch["target"]] if "target" in batch else [])
        frozen, opt_state, reconstruction = fit_step(frozen, opt_state,
                                                     run.shard(np.concatenate(pixels).astype(np.float32)))
        if step % 50 == 0 or step == steps - 1:
            run.log.write(step, {"autoencoder/reconstruction_mse": float(reconstruction)})
    run.state = {**run.state, "base": frozen}


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


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # progress is tqdm; orbax logs every save at INFO
    mesh_lib.initialize_distributed(_CONFIG.value.distributed)
    print(json.dumps(fit(_CONFIG.value).summary, indent=2))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
