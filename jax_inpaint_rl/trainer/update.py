"""Updates: an algorithm's micro-batches through its accumulate program, the optimizer step at the end of
every accumulation window, metrics kept on the device.

The host reads nothing per micro-batch: `train` only dispatches; `settle` reads
the metrics and the non-finite counter once (per epoch, or per logged span of
warm-up steps).
"""
import jax
from tqdm import tqdm

from jax_inpaint_rl.algorithms.base import Algorithm
from jax_inpaint_rl.trainer.run import Run


class NonFiniteUpdates(FloatingPointError):
    """train.max_nonfinite_steps non-finite losses or gradients in a row."""


def train(run: Run, algorithm: Algorithm, collected: dict, key) -> list:
    """Dispatch every micro-batch of `collected`; an optimizer step after each gradient_accumulation_steps
    micro-batches and at the end of each pass. Returns the device metrics, unread."""
    accumulate, apply = run.updates_for(algorithm)
    every = run.config.train.gradient_accumulation_steps
    metrics = []
    for micro_batches in algorithm.micro_batches(collected, key):
        for number, micro_batch in enumerate(tqdm(micro_batches, desc=f"epoch {run.epoch} update", leave=False,
                                                  disable=len(micro_batches) < 4)):
            step_key = run.next_key()
            run.state, step_metrics = accumulate(run.state, run.denoiser_base, run.shard(micro_batch.batch),
                                                 run.shard(micro_batch.steps), step_key)
            metrics.append(step_metrics)
            if (number + 1) % every == 0 or number == len(micro_batches) - 1:
                run.state = apply(run.state)
    return metrics


def settle(run: Run, algorithm: Algorithm, device_metrics: list) -> dict:
    """Read the metrics and counters once; raise when the non-finite limit was reached (the caller saves the
    last good state: non-finite updates leave params and optimizer untouched)."""
    metrics, nonfinite, skipped = jax.device_get((device_metrics, run.state["nonfinite"], run.state["skipped"]))
    limit = run.config.train.max_nonfinite_steps
    if nonfinite >= limit:
        raise NonFiniteUpdates(f"{int(nonfinite)} non-finite updates in a row (train.max_nonfinite_steps={limit})")
    return {**algorithm.summarize(metrics), "skipped_updates": int(skipped)}
