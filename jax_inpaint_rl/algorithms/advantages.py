"""Group-relative advantages (REFERENCE_MATH.md section 2), jit-able with uneven groups.

Groups are given by integer ids, so a batch may hold groups of different sizes
(e.g. after dropping failed rewards). Dropped or zero-signal samples come back as
a `keep` mask: shapes stay static under jit, and losses weight by it.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

STD_EPS = 1e-4


class Advantages(NamedTuple):
    advantages: jax.Array  # (B,) clipped
    keep: jax.Array  # (B,) bool: False for samples of groups with no signal


def _group_mean(values, group_ids, num_groups, weights):
    total = jax.ops.segment_sum(values * weights, group_ids, num_groups)
    count = jax.ops.segment_sum(weights, group_ids, num_groups)
    return (total / jnp.maximum(count, 1.0))[group_ids]


def group_advantages(rewards, group_ids, num_groups: int, *, baseline: str = "group", std: str = "batch",
                     clip: float = 5.0, valid=None, drop_zero_signal: bool = True) -> Advantages:
    """A = (r - mean) / (std + 1e-4), clipped to +-clip.

    baseline: 'group' (per-prompt mean) or 'batch' (one mean; the seeds'
    per_prompt_stat_tracking=False). std: 'batch' (flow_grpo's choice for
    SD3/Flux/Qwen), 'group' (per prompt) or 'none'. `valid` (B,) excludes samples
    (e.g. failed rewards) from every statistic. Population std (ddof 0) throughout.
    drop_zero_signal: groups with no signal get keep False and advantage 0. With the
    group baseline a group has signal when its valid rewards are not all equal
    (max > min, so at least two valid samples); with the batch baseline when some
    valid reward differs from the batch mean (flow_grpo keeps such groups).
    """
    rewards = rewards.astype(jnp.float32)
    valid = jnp.ones_like(rewards) if valid is None else valid.astype(jnp.float32)
    is_valid = valid > 0
    rewards = jnp.where(is_valid, rewards, 0.0)  # an invalid reward (even NaN) touches no statistic
    if baseline == "group":
        center = _group_mean(rewards, group_ids, num_groups, valid)
    elif baseline == "batch":
        center = jnp.sum(rewards * valid) / jnp.maximum(valid.sum(), 1.0)
    else:
        raise ValueError(f"advantage baseline {baseline!r}: expected 'group' or 'batch'")
    centered = (rewards - center) * valid
    if std == "group":
        normalized = centered / (jnp.sqrt(_group_mean(centered**2, group_ids, num_groups, valid)) + STD_EPS)
    elif std == "batch":
        batch_mean = jnp.sum(rewards * valid) / jnp.maximum(valid.sum(), 1.0)
        batch_var = jnp.sum(((rewards - batch_mean) * valid) ** 2) / jnp.maximum(valid.sum(), 1.0)
        normalized = centered / (jnp.sqrt(batch_var) + STD_EPS)
    elif std == "none":
        normalized = centered
    else:
        raise ValueError(f"advantage std {std!r}: expected 'group', 'batch' or 'none'")
    advantages = jnp.clip(normalized, -clip, clip)
    keep = is_valid
    if drop_zero_signal:
        keep = keep & _has_signal(rewards, centered, is_valid, group_ids, num_groups, baseline)[group_ids]
    return Advantages(jnp.where(keep, advantages, 0.0), keep)


def _has_signal(rewards, centered, is_valid, group_ids, num_groups: int, baseline: str):
    """(num_groups,) bool. Decided on the rewards, not on the advantages: the fp32 mean of equal rewards (six
    0.3s) can sit 1 ulp off them, and dividing by a group std of the same size turns that into an advantage
    far from 0."""
    if baseline == "group":
        highest = jax.ops.segment_max(jnp.where(is_valid, rewards, -jnp.inf), group_ids, num_groups)
        lowest = jax.ops.segment_min(jnp.where(is_valid, rewards, jnp.inf), group_ids, num_groups)
        return highest > lowest
    return jax.ops.segment_max(jnp.where(is_valid, jnp.abs(centered), 0.0), group_ids, num_groups) > 0


def group_ids_for(num_groups: int, group_size: int):
    """Group-major ids [0,0,..,1,1,..] matching `rollout.initial_noise`."""
    return jnp.repeat(jnp.arange(num_groups), group_size)
