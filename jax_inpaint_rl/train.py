"""python -m jax_inpaint_rl.train --config=configs/<recipe>.py [--config.a.b=value ...]

The loop composes family x algorithm x reward x data, all values built from the
config (trainer/run.py): each epoch collects what the algorithm trains on
(rollouts scored by the rewards, or dataset batches), runs its micro-batches
through one jitted accumulation and optimizer step, and lets the algorithm
update its own state (NFT's old params). The loop never asks which family or
algorithm it runs.
"""
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from jax_inpaint_rl import report
from jax_inpaint_rl.checkpoint.export import write_export
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.registry import resolve
from jax_inpaint_rl.trainer import autoencoder, checkpoints, collect, control, update
from jax_inpaint_rl.trainer.evaluate import evaluate
from jax_inpaint_rl.trainer.run import Run, build

WARMUP_LOG_EVERY = 25  # SFT steps between metric reads (the host waits for the device only then)


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str  # run.phase while it runs (metrics lines, checkpoints and wall times name it)
    run: Callable[[Run], None]  # does the phase from run.phase_step on


def phases(config) -> list[Phase]:
    """The run's phases in order: autoencoder fit (tiny models), SFT warm-up and its held-out evaluation, RL, and
    with train.sft_control the control arm (SFT from the warm-up's end for as many optimizer steps as RL took)."""
    plan = [Phase("autoencoder", autoencoder.fit), Phase("warmup", warm_up), Phase("rl", train_epochs)]
    return plan + [Phase("control", control_arm)] * bool(config.train.get("sft_control", False))


def fit(config, **pieces) -> Run:
    """Train as the config says; `pieces` (family, params, loaders, reward_fn) replace what it would build.
    Returns the finished run (its state, history and `summary`). A SIGTERM saves at the next step boundary of
    any phase and raises `checkpoints.Stopped`; rerunning the same config continues there."""
    run = build(config, **pieces)
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(run, "stop_requested", True))
    try:
        checkpoints.resume(run)
        plan = phases(run.config)
        names = [phase.name for phase in plan]
        for index in range(names.index(run.phase), len(plan)):
            start = time.time()
            plan[index].run(run)
            wall_times = run.summary.setdefault("wall_time_s", {})
            wall_times[run.phase] = wall_times.get(run.phase, 0.0) + time.time() - start
            if index + 1 < len(plan):
                run.phase, run.phase_step = names[index + 1], 0
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
    """Epochs until train.num_epochs or train.max_train_steps; evaluate, log and save on schedule. The last
    evaluation is the run's result (summary: eval_reward_final, eval_after_rl) and RL's optimizer steps the
    control arm's length."""
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
        entry = {"step": step, "phase": "rl", "arm_step": step - run.summary["warmup_end_step"]}
        if "reward_mean" in record:
            entry["reward_mean"] = float(record["reward_mean"])
        if run.epoch % c.eval.interval == 0 or last:
            entry["eval"] = evaluate(run, "after_rl" if last else f"epoch{run.epoch:04d}")
            record["eval_reward"] = entry["eval_reward"] = entry["eval"]["reward"]
        run.history.append(entry)
        run.log.write(step, record, phase="rl")
        if checkpoints.due(run, step) or last:
            checkpoints.save(run)
        if last:
            break
        checkpoints.stop_if_requested(run)
    latest = next(h for h in reversed(run.history) if "eval_reward" in h)  # the warm-up's without RL epochs
    run.summary.update(eval_reward_final=latest["eval_reward"], eval_after_rl=latest["eval"],
                       rl_optimizer_steps=int(run.state["step"]) - run.summary["warmup_end_step"])


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
    """train.warmup_steps SFT optimizer steps toward the dataset's targets, then the held-out evaluation RL (and
    the control arm) start from. RL starts there: the algorithm's frozen copies (NFT's old params, a reference)
    are the warm-up's params, and the warm-up's end is kept where the run has a control arm."""
    sft_steps(run, run.config.train.warmup_steps, "warmup")
    run.state = {**run.state, **{slot: control.copied(run.state["params"]) for slot in run.algorithm.slots}}
    run.summary["warmup_end_step"] = int(run.state["step"])
    scores = evaluate(run, "after_warmup")
    run.summary.update(eval_reward_after_warmup=scores["reward"], eval_after_warmup=scores)
    run.history.append({"step": int(run.state["step"]), "phase": "warmup", "arm_step": 0,
                        "eval_reward": scores["reward"], "eval": scores})
    run.state = control.kept(run.state)


def sft_steps(run: Run, steps: int, prefix: str, on_step: Callable[[Run], None] = lambda run: None) -> None:
    """SFT optimizer steps (run.warmup's objective on dataset batches) from run.phase_step to `steps`, logged as
    '<prefix>/<metric>' every WARMUP_LOG_EVERY steps; `on_step` runs after each (the control's evaluations)."""
    every = run.config.train.gradient_accumulation_steps
    pending, first_step = [], int(run.state["step"]) - run.phase_step
    for number in tqdm(range(run.phase_step, steps), desc=f"SFT {prefix}", initial=run.phase_step, total=steps,
                       disable=steps == 0):
        pending += update.train(run, run.warmup, collect.dataset(run, every), run.next_key())
        run.phase_step = number + 1
        due = checkpoints.due(run, first_step + run.phase_step)  # one optimizer step per SFT step
        if run.phase_step % WARMUP_LOG_EVERY == 0 or run.phase_step == steps or run.stop_requested or due:
            metrics = update.settle(run, run.warmup, pending)
            run.log.write(int(run.state["step"]), {f"{prefix}/{k}": v for k, v in metrics.items()}, phase=run.phase)
            pending = []
        on_step(run)
        if due:
            checkpoints.save(run)
        checkpoints.stop_if_requested(run)


def control_arm(run: Run) -> None:
    """From the warm-up's end (params, optimizer state, EMA), SFT for RL's number of optimizer steps, evaluated
    at the steps where RL was; then RL's trees are swapped back (the export is RL's) and the comparison grid of
    the arms is drawn."""
    steps = run.summary["rl_optimizer_steps"]
    if run.phase_step == 0:
        run.state = control.swapped(run.state)  # the warm-up's end in, RL's end into the slot
    rl_evaluated = {h["arm_step"] for h in run.history if h["phase"] == "rl" and "eval_reward" in h} - {steps}

    def evaluate_where_rl_did(run: Run) -> None:
        if run.phase_step in rl_evaluated:
            scores = evaluate(run, f"control{run.phase_step:05d}")
            run.history.append({"step": int(run.state["step"]), "phase": "control", "arm_step": run.phase_step,
                                "eval_reward": scores["reward"], "eval": scores})

    sft_steps(run, steps, "control", on_step=evaluate_where_rl_did)
    scores = evaluate(run, "after_control")
    run.summary.update(eval_reward_after_control=scores["reward"], eval_after_control=scores)
    run.history.append({"step": int(run.state["step"]), "phase": "control", "arm_step": steps,
                        "eval_reward": scores["reward"], "eval": scores})
    run.state = control.swapped(run.state)
    if jax.process_index() == 0:
        arms = {"after warm-up": "eval_after_warmup", "after RL": "eval_after_rl", "SFT control": "eval_after_control"}
        report.save_comparison(os.path.join(run.config.output_dir, "comparison.png"),
                               {label: os.path.join(run.config.output_dir, run.summary[key]["results"])
                                for label, key in arms.items()})


def finish(run: Run) -> None:
    """The inference export (merged denoiser and EMA; RL's, not the control's), the reward curve and
    summary.json."""
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
        summary = fit(_CONFIG.value).summary
        print(json.dumps(summary, indent=2))
        print(report.arms_table(summary))
    except checkpoints.Stopped as stopped:
        logging.warning("%s", stopped)
        sys.exit(checkpoints.STOPPED_EXIT_STATUS)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
