"""The VLM policy's update: one jitted program, score (sampling.score, the LoRA merged) -> token-level GRPO loss
(loss.py) -> AdamW step on the LoRA tree.

Steps per sampled batch (trl's num_iterations and steps per generation). The batch is gone over
`num_iterations` times, each time in `minibatches` optimizer steps over disjoint slices of it (the loop calls
`step` with each slice's index). Slice j holds rows j, j + m, j + 2m, ... (m = minibatches): every slice draws
from every device's rows when the batch is split over a mesh (no data moves), and from every group, and the
slices are the same on any mesh. Each slice's loss is its share of the whole batch's (loss.py: the whole batch's
token and sequence counts).

On-policy ratio. With one step per batch (num_iterations = minibatches = 1, trl's default) the old policy is
the current one and its log-probs are this program's own, gradient stopped: the ratio is exactly 1 per token by
construction (trl does the same). The sampler's recorded log-probs come from `score` too, but in another
compiled program; XLA may round them 1 ulp apart (4.8e-7 measured on a tiny config), so they are compared here
(`sampler_logp_gap`, a check that sampler and trainer see the same policy) rather than put in the ratio. With
several steps the old policy is the sampler's, so the ratio's old log-probs are its recorded ones: the first
step's ratio is 1 to that rounding, later steps' move with the updates and the clip bounds them.
The KL term's reference is the LoRA-free base: `score` on the frozen parameters alone.

Sharding. The batch's arrays come split over the mesh's batch axes; the loss is one mean over the global batch,
so the gradient is the global batch's (XLA reduces it across devices). The LoRA tree and the optimizer state
leave the program placed as they came (`shardings`).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jax_inpaint_rl.vlm_policy import sampling
from jax_inpaint_rl.vlm_policy.loss import grpo_loss


class UpdateBatch(NamedTuple):
    prompts: sampling.Prompts
    tokens: jax.Array  # (B, T) int32
    mask: jax.Array  # (B, T) int32
    log_probs: jax.Array  # (B, T) the sampler's
    advantages: jax.Array  # (B,)
    keep: jax.Array  # (B,) bool


def minibatch(batch: UpdateBatch, index, count: int) -> UpdateBatch:
    """Slice `index` of `count` (module docstring: rows index, index + count, ...); `index` may be traced."""
    def rows(array, axis=0):
        moved = jnp.moveaxis(array, axis, 0)
        picked = moved.reshape(moved.shape[0] // count, count, *moved.shape[1:])[:, index]
        return jnp.moveaxis(picked, 0, axis)

    p = batch.prompts
    per_row = p.image_features.reshape(p.ids.shape[0], -1, p.image_features.shape[-1])  # (B, image tokens, D)
    prompts = sampling.Prompts(rows(p.ids), rows(p.mask), rows(p.positions, 1),
                               rows(per_row).reshape(-1, p.image_features.shape[-1]))
    return UpdateBatch(prompts, *(rows(a) for a in batch[1:]))


def make_objective(vlm, merge, *, temperature: float, end_id: int, eps_low: float, eps_high: float,
                   beta: float, aggregation: str, max_new_tokens: int, old_from_sampler: bool = False):
    """(trainable, base, batch, num_tokens=None, num_sequences=None) -> (loss, (metrics, per-token ratio (B, T))).
    `old_from_sampler`: the ratio's old log-probs are the batch's (several steps per batch), else this
    program's own (module docstring); num_tokens / num_sequences: the whole batch's when `batch` is a slice."""
    def objective(trainable, base, batch: UpdateBatch, num_tokens=None, num_sequences=None):
        def log_probs(params):
            return sampling.score(vlm, params, batch.prompts, batch.tokens, batch.mask, temperature=temperature,
                                  end_id=end_id)[0]

        logp = log_probs(merge(base, trainable))
        ref = jax.lax.stop_gradient(log_probs(base)) if beta else None
        own = jax.lax.stop_gradient(logp)
        old = batch.log_probs if old_from_sampler else own
        loss, metrics = grpo_loss(logp, old, batch.advantages, batch.mask, batch.keep, eps_low=eps_low,
                                  eps_high=eps_high, beta=beta, ref_log_probs=ref, aggregation=aggregation,
                                  max_completion_length=max_new_tokens, num_tokens=num_tokens,
                                  num_sequences=num_sequences)
        valid = batch.mask.astype(bool)
        metrics["sampler_logp_gap"] = jnp.max(jnp.where(valid, jnp.abs(own - batch.log_probs), 0.0))
        return loss, (metrics, jnp.exp(logp - old))

    return objective


def make_step(objective, optimizer: optax.GradientTransformation, minibatches: int = 1, shardings=None):
    """step(trainable, opt_state, base, batch, index=0) -> (trainable, opt_state, metrics), jitted: one optimizer
    step on slice `index` of `minibatches` of the batch (the whole batch for 1). Non-finite gradients leave the
    parameters and the optimizer state as they were (metric 'skipped'). `shardings`: (the LoRA tree's, the
    optimizer state's) placements the outputs keep."""
    @jax.jit
    def step(trainable, opt_state, base, batch: UpdateBatch, index=0) -> tuple[Any, Any, dict]:
        if minibatches == 1:
            part, totals = batch, {}
        else:
            kept = batch.mask * batch.keep[:, None].astype(batch.mask.dtype)
            part = minibatch(batch, index, minibatches)
            totals = {"num_tokens": jnp.sum(kept).astype(jnp.float32), "num_sequences": batch.mask.shape[0]}
        (loss, (metrics, _)), grads = jax.value_and_grad(objective, has_aux=True)(trainable, base, part, **totals)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        updates, new_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), skipped=(~finite).astype(jnp.float32))
        new_trainable, new_state = keep(new_trainable, trainable), keep(new_state, opt_state)
        if shardings is not None:
            new_trainable, new_state = jax.lax.with_sharding_constraint((new_trainable, new_state), shardings)
        return new_trainable, new_state, metrics

    return step
