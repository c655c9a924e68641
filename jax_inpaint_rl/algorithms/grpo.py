"""GRPO for diffusion: PPO-clip on per-step transition ratios, plus KL to the reference.

Log-probs are means over dims, so ratios stay close to 1 and the clip range is
tiny (1e-4). The KL between two Gaussian steps that share a std is the squared
mean difference over 2 std^2, with std = sigma_t sqrt(-dt) (REFERENCE_MATH.md 3):
`kl_mode='exact'`. Flow-GRPO divides by sigma_t^2 instead (it leaves out the
sqrt(-dt)), which is the exact KL times (-dt): `kl_mode='flow_grpo'` reproduces
it, so a seed's kl_beta means the same; in exact mode the same strength is
kl_beta x (-dt) (dt = sigma_next - sigma, 0.025 - 0.1 for 10 - 40 steps).

The algorithm value (`make`) rolls out whole trajectories with log-probs from
the current params, trains the SDE-window steps each sample drew
(train.timestep_fraction / timestep_mode), and scans over a minibatch's trained
steps in one program, accumulating their gradients.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jax_inpaint_rl.algorithms.base import (Algorithm, MicroBatch, Policy, mean_metrics, rollout_program,
                                            shuffled_minibatches, stochastic_windows, take)
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.schedules import take_steps
from jax_inpaint_rl.diffusion.steps import mean_over_dims, per_sample

KL_MODES = ("exact", "flow_grpo")
# the first update's ratios must equal 1 (no update yet); a deviation above this fraction of the clip range
# means rollout and training log-probs disagree enough to move which samples clip
RATIO_WARNING_FRACTION = 0.1


class GRPOTerms(NamedTuple):
    loss: jax.Array
    policy_loss: jax.Array
    kl: jax.Array
    ratio: jax.Array  # (B,)
    clip_fraction: jax.Array
    approx_kl: jax.Array


def _masked_mean(values, weights):
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def gaussian_step_kl(mean, ref_mean, variance):
    """(B,) KL(N(mean, v) || N(ref_mean, v)) averaged over dims; 0 where the variance is 0."""
    variance = per_sample(variance, mean)
    safe = jnp.where(variance > 0, variance, 1.0)
    per_dim = jnp.where(variance > 0, (mean - ref_mean) ** 2 / (2 * safe), 0.0)
    return mean_over_dims(per_dim)


def kl_variance(std, coeffs, mode: str):
    """The variance the KL divides by: the step's std^2 ('exact'), or sigma_t^2 = std^2 / (-dt) as
    Flow-GRPO writes it ('flow_grpo'; flow schedules only)."""
    if mode == "exact":
        return std**2
    if mode == "flow_grpo":
        return std**2 / (coeffs["sigma"] - coeffs["sigma_next"])
    raise ValueError(f"grpo kl_mode {mode!r}: expected one of {KL_MODES}")


def grpo_loss(log_prob, old_log_prob, advantages, *, clip_range: float, adv_clip_max: float = 5.0,
              kl_beta: float = 0.0, mean=None, ref_mean=None, kl_var=None, weights=None) -> GRPOTerms:
    """L = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))) + beta KL, per sample.

    weights (B,) mask out samples that carry no signal or no stochastic step;
    kl_var (B,) is the variance the KL divides by (`kl_variance`).
    """
    weights = jnp.ones_like(log_prob) if weights is None else weights.astype(jnp.float32)
    advantages = jnp.clip(advantages, -adv_clip_max, adv_clip_max)
    ratio = jnp.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = _masked_mean(jnp.maximum(unclipped, clipped), weights)
    if kl_beta > 0:
        kl = _masked_mean(gaussian_step_kl(mean, jax.lax.stop_gradient(ref_mean), kl_var), weights)
    else:
        kl = jnp.zeros((), jnp.float32)
    log_ratio = jax.lax.stop_gradient(log_prob - old_log_prob)
    return GRPOTerms(
        loss=policy_loss + kl_beta * kl,
        policy_loss=policy_loss,
        kl=kl,
        ratio=jax.lax.stop_gradient(ratio),
        clip_fraction=_masked_mean((jnp.abs(log_ratio) > jnp.log1p(clip_range)).astype(jnp.float32), weights),
        approx_kl=_masked_mean(0.5 * log_ratio**2, weights),
    )


def grpo_objective(policy: Policy, params, frozen, batch, key, *, clip_range: float, adv_clip_max: float,
                   kl_beta: float, kl_mode: str = "exact"):
    """PPO-clip on one stored transition per sample.

    batch: x, x_next (B, ...), old_log_prob (B,), step_index (B,) schedule steps, window (T,), cond,
    advantages (B,), weight (B,).
    """
    del key
    x, x_next, step_index = batch["x"], batch["x_next"], batch["step_index"]
    score = functools.partial(rollout_lib.score_transitions, policy.guided, cond=batch["cond"], latents=x,
                              next_latents=x_next, step_index=step_index, schedule=policy.schedule,
                              sampler=policy.sampler, window=batch["window"],
                              region=policy.paste(batch["cond"])[0] if policy.paste else None)
    scored = score(params=params)
    ref_mean = score(params=frozen["ref"]).mean if kl_beta > 0 else None
    terms = grpo_loss(scored.log_prob, batch["old_log_prob"], batch["advantages"], clip_range=clip_range,
                      adv_clip_max=adv_clip_max, kl_beta=kl_beta, mean=scored.mean, ref_mean=ref_mean,
                      kl_var=kl_variance(scored.std, take_steps(policy.schedule, step_index), kl_mode),
                      weights=batch["weight"])
    metrics = {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl,
               "clip_fraction": terms.clip_fraction, "approx_kl": terms.approx_kl,
               "ratio_mean": _masked_mean(terms.ratio, batch["weight"]),
               "ratio_min": jnp.min(jnp.where(batch["weight"] > 0, terms.ratio, jnp.inf)),
               "ratio_max": jnp.max(jnp.where(batch["weight"] > 0, terms.ratio, -jnp.inf))}
    return terms.loss, metrics


def train_step_indices(key, batch: int, window, fraction: float = 1.0, mode: str = "first"):
    """(B, K) step indices each sample trains on, drawn from the stochastic window steps.

    mode 'first': the first floor(n * fraction) window steps, in order;
    'shuffle': a random permutation per sample, truncated to that count;
    'one': a single random window step per sample (of a full rollout).
    `window` is a host (T,) 0/1 array, so K is static.
    """
    window_steps = np.flatnonzero(np.asarray(window) > 0)
    if window_steps.size == 0:
        raise ValueError("the SDE window has no stochastic step to train on")
    count = 1 if mode == "one" else max(1, int(window_steps.size * fraction))
    steps = jnp.asarray(window_steps)
    if mode == "first":
        return jnp.broadcast_to(steps[:count], (batch, count))
    if mode in ("shuffle", "one"):
        keys = jax.random.split(key, batch)
        return jax.vmap(lambda k: jax.random.permutation(k, steps)[:count])(keys)
    raise ValueError(f"timestep mode {mode!r}: expected 'first', 'shuffle' or 'one'")


def transitions(collected: dict, index, step_index) -> dict:
    """The stored transitions x_j -> x_{j+1} of samples `index` at their steps step_index (B, K), as the
    (B, K, ...) per-step fields of a micro-batch."""
    latents, log_probs = take(collected["samples"]["latents"], index), take(collected["samples"]["log_probs"], index)
    rows = jnp.arange(len(index))[:, None]
    return {"x": latents[rows, step_index], "x_next": latents[rows, step_index + 1],
            "old_log_prob": log_probs[rows, step_index], "step_index": step_index}


def rollout_micro_batches(collected: dict, key, *, train, step_fields=transitions):
    """Inner epochs of shuffled minibatches; each sample trains the window steps `train_step_indices` draws.

    collected: samples, cond, advantages, keep (B,), train_window (T,)."""
    batch_size = collected["advantages"].shape[0]
    passes = []
    for inner_key in jax.random.split(key, train.inner_epochs):
        order_key, step_key = jax.random.split(inner_key)
        step_index = train_step_indices(step_key, batch_size, collected["train_window"], train.timestep_fraction,
                                        train.timestep_mode)
        passes.append([MicroBatch(
            {"cond": take(collected["cond"], index), "advantages": collected["advantages"][index],
             "weight": collected["keep"][index].astype(jnp.float32), "window": collected["train_window"]},
            step_fields(collected, index, step_index[index]))
            for index in shuffled_minibatches(order_key, batch_size, train.minibatch_size)])
    return passes


def summarize(records: list[dict], clip_range: float) -> dict:
    """Means, the extreme ratios, and the first micro-batch's deviation from ratio 1 (no update has happened
    before it: rollout and training must agree), with a warning above RATIO_WARNING_FRACTION x clip range."""
    summary = mean_metrics(records)
    if not records:
        return summary
    summary["ratio_min"] = float(min(np.min(r["ratio_min"]) for r in records))
    summary["ratio_max"] = float(max(np.max(r["ratio_max"]) for r in records))
    first = records[0]
    deviation = float(max(abs(np.ravel(first["ratio_max"])[0] - 1), abs(np.ravel(first["ratio_min"])[0] - 1)))
    summary["first_ratio_deviation"] = deviation
    if deviation > RATIO_WARNING_FRACTION * clip_range:
        logging.warning("ratio before any update deviates from 1 by %.2e (> %g x clip range %g): rollout and "
                        "training log-probs disagree", deviation, RATIO_WARNING_FRACTION, clip_range)
    return summary


def check_settings(g) -> None:
    problems = [message for bad, message in (
        (g.clip_range <= 0, f"grpo.clip_range={g.clip_range}: expected > 0"),
        (g.kl_beta < 0, f"grpo.kl_beta={g.kl_beta}: expected >= 0"),
        (g.kl_mode not in KL_MODES, f"grpo.kl_mode={g.kl_mode!r}: expected one of {KL_MODES}")) if bad]
    if problems:
        raise ValueError("config: " + "; ".join(problems))


def check_family(family, g) -> None:
    """Flow-GRPO's KL divides by the flow SDE's sigma_t^2, which an epsilon model's DDIM steps do not have."""
    if g.kl_beta > 0 and g.kl_mode == "flow_grpo" and family.parameterization.name != "velocity":
        raise ValueError(f"config: grpo.kl_mode='flow_grpo' divides by the flow SDE's sigma_t^2; {family.name} is "
                         f"an {family.parameterization.name} model: use kl_mode='exact'")


def make(config) -> Algorithm:
    """GRPO from config.grpo (clip_range, kl_beta, kl_mode) and config.train (adv_clip_max and the loop)."""
    g, train = config.grpo, config.train
    check_settings(g)
    return Algorithm(
        name="grpo",
        objective=functools.partial(grpo_objective, clip_range=g.clip_range, adv_clip_max=train.adv_clip_max,
                                    kl_beta=g.kl_beta, kl_mode=g.kl_mode),
        micro_batches=functools.partial(rollout_micro_batches, train=train),
        slots=("ref",) if g.kl_beta > 0 else (),
        sampler=rollout_program,
        windows=stochastic_windows(config.sample),
        summarize=functools.partial(summarize, clip_range=g.clip_range),
        check_family=functools.partial(check_family, g=g))
