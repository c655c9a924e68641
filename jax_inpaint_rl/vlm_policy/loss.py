"""Token-level GRPO for a text policy (REFERENCE_MATH.md, "Token-level GRPO for a text policy"), as trl defines it.

Per completion token t of sequence i, with the ratio r = exp(logp - old_logp) and the sequence's advantage A_i:

    loss_t = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_t,
    KL_t = exp(ref_logp - logp) - (ref_logp - logp) - 1      (k3: unbiased, >= 0, to the LoRA-free base)

eps_high > eps_low is DAPO's clip-higher. Aggregation over the completion mask m (B, T) (trl's `loss_type`):
- 'grpo':    mean over sequences of (sum_t m l / sum_t m): every sequence weighs the same, so a long answer's
             tokens weigh less each (the length bias Dr. GRPO points out).
- 'dapo':    sum m l / (completion tokens in the global batch), every token weighs the same. trl divides by
             `num_items_in_batch`, the tokens of the whole accumulated batch over all processes; here that count
             is `num_tokens` (the caller's, when the batch is split) or this batch's own (then it equals trl's
             'bnpo', which divides by the local batch's tokens).
- 'dr_grpo': sum m l / (B x max_completion_length): a constant normaliser, no length bias at all.
Samples the advantages module drops (groups without signal, failed rewards: `keep` False) get mask 0, so they
add nothing and count in no token total; 'grpo' and 'dr_grpo' still count them as sequences (B is static).

A split batch (update.py's minibatches, each its own optimizer step) passes the whole batch's `num_tokens` and
`num_sequences` (its B): each slice's loss is then its share of the whole batch's, every token keeping the
weight it has in the unsplit loss, and the slices' losses at the same parameters sum to it. (trl normalises each
optimizer step by its own batch instead; under Adam the two differ by a per-step scale only.)

Log-probs are log_softmax(logits / temperature) at the sampled token (trl's `selective_log_softmax` of logits
divided by the sampling temperature), fp32.
"""
import jax
import jax.numpy as jnp

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def token_log_probs(logits, tokens, temperature: float = 1.0):
    """(B, T, V) logits, (B, T) int tokens -> (B, T) fp32 log-probs of the tokens under softmax(logits / temp)."""
    scaled = logits.astype(jnp.float32) / temperature
    return jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[..., None], axis=-1)[..., 0]


def per_token_loss(log_probs, old_log_probs, advantages, *, eps_low: float, eps_high: float, beta: float = 0.0,
                   ref_log_probs=None):
    """(B, T) loss before aggregation, and the (B, T) ratio and KL (zeros without beta)."""
    ratio = jnp.exp(log_probs - old_log_probs)
    advantages = advantages[:, None].astype(jnp.float32)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    kl = jnp.zeros_like(loss)
    if beta:
        if ref_log_probs is None:
            raise ValueError("GRPO with beta > 0 needs ref_log_probs (the LoRA-free base's log-probs)")
        delta = ref_log_probs - log_probs
        kl = jnp.exp(delta) - delta - 1.0
        loss = loss + beta * kl
    return loss, ratio, kl


def aggregate(values, mask, aggregation: str, max_completion_length: int | None = None, num_tokens=None,
              num_sequences: int | None = None):
    """(B, T) per-token values -> scalar, as `aggregation` weighs tokens (module docstring); `num_tokens` and
    `num_sequences` default to this batch's."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(values * mask)
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    if aggregation == "grpo":
        return jnp.sum(jnp.sum(values * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)) / sequences
    if aggregation == "dapo":
        return total / jnp.maximum(jnp.sum(mask) if num_tokens is None else num_tokens, 1.0)
    if aggregation == "dr_grpo":
        return total / (sequences * (max_completion_length or mask.shape[1]))
    raise ValueError(f"GRPO loss aggregation {aggregation!r}: expected one of {AGGREGATIONS}")


def grpo_loss(log_probs, old_log_probs, advantages, mask, keep=None, *, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, ref_log_probs=None, aggregation: str = "grpo",
              max_completion_length: int | None = None, num_tokens=None, num_sequences: int | None = None):
    """(scalar loss, metrics). log_probs / old_log_probs / ref_log_probs / mask: (B, T); advantages, keep (B,)."""
    if keep is not None:
        mask = mask * keep[:, None].astype(mask.dtype)
    loss, ratio, kl = per_token_loss(log_probs, old_log_probs, advantages, eps_low=eps_low, eps_high=eps_high,
                                     beta=beta, ref_log_probs=ref_log_probs)
    value = aggregate(loss, mask, aggregation, max_completion_length, num_tokens, num_sequences)
    m = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    clipped = (ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)
    metrics = {"loss": value, "ratio_mean": jnp.sum(ratio * m) / tokens,
               "clip_fraction": jnp.sum(clipped * m) / tokens, "kl": jnp.sum(kl * m) / tokens}
    return value, metrics
