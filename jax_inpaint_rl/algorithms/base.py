"""What an algorithm is to the training loop: a value, built from the config by its module's `make`.

The loop (train.py, trainer/) never asks which algorithm it runs. It reads:
- `slots`: frozen copies of the trainable tree the objective needs ('old', 'ref'),
  created in the train state, placed, checkpointed;
- `sample_from`: the state tree rollouts sample with ('params', or NFT's 'old');
- `sampler`: (policy, merge) -> the jitted collection program
  (base, trainable, cond, start, key, window) -> (samples, latents to decode);
  `start` holds 'noise' (B, ...) and, when `needs` names 'target', the target
  latents 'x0'. None: the algorithm learns from the dataset (SFT);
- `windows`: (key, total steps) -> (sampling window, trainable window), host (T,) 0/1;
- `micro_batches`: (collected epoch, key) -> passes (inner epochs), each a list of
  `MicroBatch(batch, steps)`: per-sample fields, plus per-trained-step fields
  (B, K, ...) the update scans over (gradients of every step accumulated);
- `objective`: (policy, trainable params, frozen slots, micro-batch, key) -> (loss, metrics);
- `after_step`: state -> state inside the jitted optimizer step (DPO's reference refresh);
- `after_epoch`: (state, epoch) -> state after an epoch's updates (NFT's old params);
- `needs`: example fields it cannot run without ('target' for SFT and one-step GRPO);
- `summarize`: per-micro-batch host metrics -> the epoch's record;
- `check_family`: raises when the algorithm's settings do not fit a family (before anything loads).
Adding an algorithm is its own module with a `make(config) -> Algorithm` and one
registry line in algorithms/__init__.py.
"""
import dataclasses
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.rollout import sde_window
from jax_inpaint_rl.diffusion.schedules import Schedule
from jax_inpaint_rl.diffusion.steps import Sampler


@dataclasses.dataclass(frozen=True)
class Policy:
    """The model as the objectives see it: guided and unguided denoisers over trainable params, and the
    family's parameterization with the sampling schedule and step."""

    guided: Callable  # (denoiser params, x, t, cond) -> prediction, with the rollout's guidance
    unguided: Callable  # (denoiser params, x, t, cond) -> prediction, positive condition only
    parameterization: Any  # diffusion.parameterization.Velocity() | Epsilon()
    schedule: Schedule
    sampler: Sampler
    paste: Callable | None = None  # cond -> (region, source latents): Family.paste_region on the positive cond


class MicroBatch(NamedTuple):
    batch: dict  # per-sample (B, ...) arrays and shared small arrays (the (T,) window)
    steps: dict  # per-sample, per-trained-step (B, K, ...) arrays; {} for one objective call


def mean_metrics(records: list[dict]) -> dict:
    """Mean of every metric over all micro-batches and trained steps."""
    if not records:
        return {}
    names = set().union(*records)
    return {name: float(np.mean(np.concatenate([np.ravel(r[name]) for r in records if name in r])))
            for name in names}


def no_change(state, *unused):
    del unused
    return state


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    objective: Callable
    micro_batches: Callable[[dict, jax.Array], Iterable[list[MicroBatch]]]
    slots: tuple[str, ...] = ()
    sample_from: str = "params"
    sampler: Callable | None = None
    windows: Callable[[jax.Array, int], tuple[np.ndarray, np.ndarray]] | None = None
    after_step: Callable[[dict], dict] = no_change
    after_epoch: Callable[[dict, int], dict] = no_change
    needs: tuple[str, ...] = ()
    summarize: Callable[[list[dict]], dict] = mean_metrics
    check_family: Callable[[Any], None] = lambda family: None


# --- helpers the algorithms share --------------------------------------------------------------

def rollout_program(policy: Policy, merge: Callable) -> Callable:
    """Jitted (base, trainable, cond, start, key, window) -> ({'latents' (B, T+1, ...), 'log_probs' (B, T)},
    clean latents (B, ...)): the whole trajectory from start['noise'] in one scan, merged once. The collection
    program of GRPO, NFT and DPO, and evaluation's (window all zeros: the deterministic solver)."""
    @jax.jit
    def sample(base, trainable, cond, start, key, window):
        trajectory = rollout_lib.rollout(policy.guided, merge(base, trainable), cond, start["noise"],
                                         policy.schedule, policy.sampler, key, window,
                                         paste=policy.paste(cond) if policy.paste else None)
        return {"latents": trajectory.latents, "log_probs": trajectory.log_probs}, trajectory.latents[:, -1]

    return sample


def take(tree, index):
    """Rows `index` of every batch-leading array of a pytree (on the device: no host round trip)."""
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0), tree)


def shuffled_minibatches(key, size: int, minibatch_size: int) -> list[np.ndarray]:
    """A seeded permutation of range(size) cut into consecutive minibatches (the last may be shorter)."""
    order = np.asarray(jax.random.permutation(key, size))
    return [order[start:start + minibatch_size] for start in range(0, size, minibatch_size)]


def configured_window(sample, key, total: int) -> np.ndarray:
    """The SDE window of config.sample: every step (window_size 0), or window_size steps starting uniformly
    in [0, window_max_start] (Flow-GRPO-Fast / MixGRPO; window_size 1 is S1: one SDE step per trajectory)."""
    if sample.window_size <= 0:
        return sde_window(total)
    start = int(jax.random.randint(key, (), 0, sample.window_max_start + 1))
    return sde_window(total, start, sample.window_size)


def stochastic_windows(sample):
    """`Algorithm.windows` for algorithms that train the steps they sampled stochastically."""
    def windows(key, total: int):
        window = configured_window(sample, key, total)
        return window, window

    return windows
