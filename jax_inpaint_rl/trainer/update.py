"""Updates: an algorithm's micro-batches through its accumulate program, the optimizer step at the end of
every accumulation window, metrics kept on the device.

The host reads nothing per micro-batch: `train` only dispatches; `settle` reads
the metrics and the non-finite counter once (per epoch, or per logged span of
warm-up steps). A micro-batch's trained steps run as one call each, or scanned in
one call with train.scan_trained_steps (measured slower on XLA:CPU; see
tools/bench/update_phase.py).
"""
import jax
from tqdm import tqdm

from jax_inpaint_rl.algorithms.base import Algorithm, MicroBatch
from jax_inpaint_rl.trainer.run import Run


class NonFiniteUpdates(FloatingPointError):
    """train.max_nonfinite_steps non-finite losses or gradients in a row."""


def train(run: Run, algorithm: Algorithm, collected: dict, key) -> list:
    """Dispatch every micro-batch of `collected`; an optimizer step after each gradient_accumulation_steps
    micro-batches and at the end of each pass. Returns the device metrics, unread."""
    accumulate, apply = run.updates_for(algorithm)
    train_config = run.config.train
    metrics = []
    for micro_batches in algorithm.micro_batches(collected, key):
        for number, micro_batch in enumerate(tqdm(micro_batches, desc=f"epoch {run.epoch} update", leave=False,
                                                  disable=len(micro_batches) < 4)):
            batch = run.shard(micro_batch.batch)
            for steps in ([micro_batch.steps] if train_config.scan_trained_steps else one_step_each(micro_batch)):
                run.state, step_metrics = accumulate(run.state, run.denoiser_base, batch, run.shard(steps),
                                                     run.next_key())
                metrics.append(step_metrics)
            if (number + 1) % train_config.gradient_accumulation_steps == 0 or number == len(micro_batches) - 1:
                run.state = apply(run.state)
    return metrics


def one_step_each(micro_batch: MicroBatch) -> list[dict]:
    """A micro-batch's per-step fields (B, K, ...) as K single-step slices (B, 1, ...)."""
    if not micro_batch.steps:
        return [{}]
    count = jax.tree.leaves(micro_batch.steps)[0].shape[1]
    return [jax.tree.map(lambda a, k=k: a[:, k:k + 1], micro_batch.steps) for k in range(count)]


def settle(run: Run, algorithm: Algorithm, device_metrics: list) -> dict:
    """Read the metrics and counters once; raise when the non-finite limit was reached (the caller saves the
    last good state: non-finite updates leave params and optimizer untouched)."""
    metrics, nonfinite, skipped = jax.device_get((device_metrics, run.state["nonfinite"], run.state["skipped"]))
    limit = run.config.train.max_nonfinite_steps
    if nonfinite >= limit:
        raise NonFiniteUpdates(f"{int(nonfinite)} non-finite updates in a row (train.max_nonfinite_steps={limit})")
    return {**algorithm.summarize(metrics), "skipped_updates": int(skipped)}
