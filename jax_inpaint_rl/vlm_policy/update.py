"""The VLM policy's update: one jitted program, score (sampling.score, the LoRA merged) -> token-level GRPO loss
(loss.py) -> AdamW step on the LoRA tree.

On-policy ratio. Each sampled batch makes one optimizer step (trl's num_iterations = 1), so the old policy is the
current one and its log-probs are this program's own, gradient stopped: the ratio is exactly 1 per token by
construction (trl does the same). The sampler's recorded log-probs come from `score` too, but in another
compiled program; XLA may round them 1 ulp apart (4.8e-7 measured on a tiny config), so they are compared here
(`sampler_logp_gap`, a check that sampler and trainer see the same policy) rather than put in the ratio.
The KL term's reference is the LoRA-free base: `score` on the frozen parameters alone.
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


def make_objective(vlm, merge, *, temperature: float, end_id: int, eps_low: float, eps_high: float,
                   beta: float, aggregation: str, max_new_tokens: int):
    """(trainable, base, batch) -> (loss, (metrics, per-token ratio (B, T)))."""
    def objective(trainable, base, batch: UpdateBatch):
        def log_probs(params):
            return sampling.score(vlm, params, batch.prompts, batch.tokens, batch.mask, temperature=temperature,
                                  end_id=end_id)[0]

        logp = log_probs(merge(base, trainable))
        ref = jax.lax.stop_gradient(log_probs(base)) if beta else None
        old = jax.lax.stop_gradient(logp)
        loss, metrics = grpo_loss(logp, old, batch.advantages, batch.mask, batch.keep, eps_low=eps_low,
                                  eps_high=eps_high, beta=beta, ref_log_probs=ref, aggregation=aggregation,
                                  max_completion_length=max_new_tokens)
        valid = batch.mask.astype(bool)
        metrics["sampler_logp_gap"] = jnp.max(jnp.where(valid, jnp.abs(old - batch.log_probs), 0.0))
        return loss, (metrics, jnp.exp(logp - old))

    return objective


def make_step(objective, optimizer: optax.GradientTransformation):
    """step(trainable, opt_state, base, batch) -> (trainable, opt_state, metrics), jitted; non-finite gradients
    leave the parameters and the optimizer state as they were (metric 'skipped')."""
    @jax.jit
    def step(trainable, opt_state, base, batch: UpdateBatch) -> tuple[Any, Any, dict]:
        (loss, (metrics, _)), grads = jax.value_and_grad(objective, has_aux=True)(trainable, base, batch)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        updates, new_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), skipped=(~finite).astype(jnp.float32))
        return keep(new_trainable, trainable), keep(new_state, opt_state), metrics

    return step
