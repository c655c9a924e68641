"""k completions per prompt from Qwen2.5-VL (LoRA merged inside jit) with a fixed-shape KV cache, and the scorer
whose per-token log-probs both the sampler records and GRPO's update uses.

Layout. Prompts come right-padded to a static length P (the family's `tokenize`: the chat template, the image's
<|image_pad|> tokens, the instruction, "<|im_start|>assistant\\n"). The cache has P + T slots (T =
max_new_tokens): one jitted prefill writes the prompts at slots 0 .. P-1, then a `lax.while_loop` decodes token k
of every row at slot P + k, one compiled step for all k. A right-padded row's gap between its prompt and slot P
stays masked, and every row's positions are its own (`decode_positions`: its prompt length + k + its RoPE delta),
so the gap changes nothing. The loop stops when every row has emitted <|im_end|> (or after T tokens). `greedy`
takes each row's most likely token (evaluation's deterministic completions) instead of drawing it.

Sharding. Given a mesh, the per-row arrays (the cache's batch axis, the loop's tokens, mask and log-probs, the
outputs) are kept split over its batch axes (parallel/mesh.py): each device decodes its own rows and the
parameters are whatever placement they come with (replicated, or fsdp-split by parallel/partition.py).

Completions: tokens (B, T) int32, 0 after a row's end; mask (B, T) 1 on generated tokens, the end token included
(trl's completion mask); a row that ran out of tokens has no end token.

Log-probs. The policy is softmax(logits / temperature) over the vocabulary without the vision special tokens
(<|image_pad|> etc. are never sampled: in a completion they would be taken for image slots); top-p truncates
only the sampling, not the log-probs (as in trl, whose log-probs are log_softmax(logits / temperature)). The
log-probs GRPO's ratio uses are `Completions.log_probs`: `score` (one teacher-forced forward over prompt +
completion, the program the update differentiates) run on the sampled tokens with the sampling parameters at the
end of the sampling program, so the first update's ratio is 1. `decode_log_probs` are the same quantities read
off the KV-cache decode (they agree to float rounding; kept as a check, not used by the loss).

The sequence `score` reads (`sequence_inputs`) is [prompt (P slots, right-padded) | completion (T) | end (1)]:
the end slot holds <|im_end|> for rows that ran out of tokens (the conditioning's sequence ends with it), masked
otherwise. Causal attention keeps it out of the completion's log-probs; its last hidden states are the DiT's
conditioning (condition.py).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_inpaint_rl.models.qwen_vl import language
from jax_inpaint_rl.models.qwen_vl.model import QwenVL, decode_positions
from jax_inpaint_rl.parallel.mesh import BATCH_AXES
from jax_inpaint_rl.vlm_policy.loss import token_log_probs


class Prompts(NamedTuple):
    ids: jax.Array  # (B, P) int32, right-padded
    mask: jax.Array  # (B, P) int32
    positions: jax.Array  # (3, B, P) int32 multimodal RoPE positions (model.rope_index)
    image_features: jax.Array  # (n, D) the vision tower's output for the batch's images (`vision_features`)


class Completions(NamedTuple):
    tokens: jax.Array  # (B, T) int32
    mask: jax.Array  # (B, T) int32
    log_probs: jax.Array  # (B, T) fp32: `score`'s, what the ratio uses
    decode_log_probs: jax.Array  # (B, T) fp32: read off the KV-cache decode
    logits: Any = None  # (B, T, V) fp32 decode logits (sampler built with return_logits=True), else None


def split_rows(tree, mesh, axis: int = 0):
    """Inside a jitted program: `tree`'s arrays kept split over the mesh's batch axes along `axis` (their rows);
    unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P(*(None,) * axis, BATCH_AXES)))


def banned_ids(vlm: QwenVL) -> tuple[int, ...]:
    """Token ids a completion never holds: the vision placeholders."""
    c = vlm.config
    return (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)


def policy_logits(logits, banned: tuple[int, ...]):
    """fp32 logits with the banned ids at -inf."""
    return logits.astype(jnp.float32).at[..., jnp.asarray(banned)].set(-jnp.inf)


def top_p_filter(logits, top_p: float):
    """Logits outside the smallest set of tokens whose probability reaches top_p set to -inf (nucleus)."""
    if top_p >= 1.0:
        return logits
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top token is always kept
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def vision_features(vlm: QwenVL, params, pixels, grid):
    """The vision tower's merged features (n, D) of the processor's patches (B, N, D_patch) and static grids."""
    return vlm.apply({"params": params}, pixels.reshape(-1, pixels.shape[-1]), grid, method=_visual)


def _visual(module: QwenVL, patches, grid):
    return module.visual(patches, grid)


def rope_deltas(positions, mask):
    """(B, 1) per-row RoPE delta (next position - token count), from the prompts' positions and mask."""
    lengths = jnp.sum(mask, axis=1)
    highest = jnp.max(jnp.where(mask.astype(bool), jnp.max(positions, axis=0), -1), axis=1)
    return (highest + 1 - lengths)[:, None].astype(jnp.int32)


def sequence_inputs(prompts: Prompts, tokens, mask, end_id: int):
    """(ids, mask, positions) of [prompt | completion | end] (module docstring), (B, P + T + 1)."""
    batch, steps = tokens.shape
    lengths = jnp.sum(prompts.mask, axis=1)
    ran_out = jnp.sum(mask, axis=1) == steps
    ids = jnp.concatenate([prompts.ids, tokens, jnp.full((batch, 1), end_id, tokens.dtype)], axis=1)
    full_mask = jnp.concatenate([prompts.mask, mask, ran_out[:, None].astype(mask.dtype)], axis=1)
    after = lengths[:, None] + jnp.arange(steps + 1)[None] + rope_deltas(prompts.positions, prompts.mask)
    positions = jnp.concatenate([prompts.positions, jnp.broadcast_to(after[None], (3, batch, steps + 1))], axis=2)
    return ids.astype(jnp.int32), full_mask.astype(jnp.int32), positions.astype(jnp.int32)


def score(vlm: QwenVL, params, prompts: Prompts, tokens, mask, *, temperature: float, end_id: int):
    """Teacher-forced forward: (per-token log-probs (B, T) of `tokens`, last hidden states (B, P + T + 1, D) and
    the sequence's mask (B, P + T + 1)). Token k is predicted at slot len - 1 (k = 0) or P + k - 1."""
    ids, full_mask, positions = sequence_inputs(prompts, tokens, mask, end_id)
    hidden, _ = vlm.apply({"params": params}, ids, positions, full_mask, image_features=prompts.image_features)
    length = prompts.ids.shape[1]
    lengths = jnp.sum(prompts.mask, axis=1)
    slots = jnp.concatenate([lengths[:, None] - 1, jnp.broadcast_to(length + jnp.arange(tokens.shape[1] - 1),
                                                                    (tokens.shape[0], tokens.shape[1] - 1))], axis=1)
    predicting = jnp.take_along_axis(hidden, slots[..., None], axis=1)
    logits = policy_logits(vlm.apply({"params": params}, predicting, method=QwenVL.logits), banned_ids(vlm))
    return token_log_probs(logits, tokens, temperature), hidden, full_mask


def make_sampler(vlm: QwenVL, merge, *, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 end_id: int, return_logits: bool = False, cache_dtype=jnp.float32, greedy: bool = False,
                 mesh=None):
    """sample(base, trainable, prompts: Prompts, key) -> Completions, jitted; `merge(base, trainable)` gives the
    VLM's parameters (algorithms/trainable.merge: LoRA merged inside the program). `greedy`: argmax tokens (the
    key is not used; the log-probs are still those of softmax(logits / temperature)); `mesh`: rows split over
    its batch axes (module docstring)."""
    if temperature <= 0:
        raise ValueError(f"policy.temperature={temperature}: expected > 0 (the policy's softmax temperature; "
                         "deterministic completions: greedy=True)")
    if not 0 < top_p <= 1:
        raise ValueError(f"policy.top_p={top_p}: expected in (0, 1]")
    banned = banned_ids(vlm)
    steps = max_new_tokens

    def next_logits(params, ids, positions, mask, cache, index, features=None):
        hidden, cache = vlm.apply({"params": params}, ids, positions, mask, image_features=features, cache=cache,
                                  cache_index=index)
        return hidden, cache

    @jax.jit
    def sample(base, trainable, prompts: Prompts, key) -> Completions:
        params = merge(base, trainable)
        batch, length = prompts.ids.shape
        lengths = jnp.sum(prompts.mask, axis=1)
        deltas = rope_deltas(prompts.positions, prompts.mask)
        cache = language.init_cache(vlm.config.text, batch, length + steps, cache_dtype)
        cache = {"key": split_rows(cache["key"], mesh, 1), "value": split_rows(cache["value"], mesh, 1),
                 "mask": split_rows(cache["mask"], mesh)}
        hidden, cache = next_logits(params, prompts.ids, prompts.positions, prompts.mask, cache, 0,
                                    prompts.image_features)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
        logits = policy_logits(vlm.apply({"params": params}, last, method=QwenVL.logits), banned)[:, 0]

        def body(carry):
            k, logits, cache, done, tokens, mask, decode_logp, kept = carry
            scaled = logits / temperature
            if greedy:
                token = jnp.argmax(logits, axis=-1)
            else:
                token = jax.random.categorical(jax.random.fold_in(key, k), top_p_filter(scaled, top_p), axis=-1)
            token = jnp.where(done, 0, token).astype(jnp.int32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
            tokens = tokens.at[:, k].set(token)
            mask = mask.at[:, k].set((~done).astype(jnp.int32))
            decode_logp = decode_logp.at[:, k].set(jnp.where(done, 0.0, logp))
            if return_logits:
                kept = kept.at[:, k].set(logits)
            done = done | (token == end_id)
            hidden, cache = next_logits(params, token[:, None], decode_positions(lengths + k, deltas),
                                        jnp.ones((batch, 1), jnp.int32), cache, length + k)
            logits = policy_logits(vlm.apply({"params": params}, hidden, method=QwenVL.logits), banned)[:, 0]
            return k + 1, logits, cache, done, tokens, mask, decode_logp, kept

        kept = jnp.zeros((batch, steps, logits.shape[-1]) if return_logits else (), jnp.float32)
        rows = split_rows((jnp.zeros(batch, bool), jnp.zeros((batch, steps), jnp.int32),
                           jnp.zeros((batch, steps), jnp.int32), jnp.zeros((batch, steps), jnp.float32)), mesh)
        carry = (jnp.int32(0), split_rows(logits, mesh), cache, *rows, kept)
        carry = jax.lax.while_loop(lambda c: (c[0] < steps) & ~jnp.all(c[3]), body, carry)
        _, _, _, _, tokens, mask, decode_logp, kept = carry
        log_probs, _, _ = score(vlm, params, prompts, tokens, mask, temperature=temperature, end_id=end_id)
        return split_rows(Completions(tokens, mask, log_probs * mask, decode_logp, kept if return_logits else None),
                          mesh)

    return sample


def prompts_from_tokens(vlm: QwenVL, params, tokens, grid) -> Prompts:
    """A Qwen-Image family's `tokenize` output ({'ids', 'mask', 'positions' (B, L, 3), 'pixels'}) as Prompts,
    the images through the vision tower once (`grid`: the static per-image (t, h, w) grids)."""
    return Prompts(jnp.asarray(tokens["ids"]), jnp.asarray(tokens["mask"]),
                   jnp.moveaxis(jnp.asarray(tokens["positions"]), -1, 0),
                   vision_features(vlm, params, jnp.asarray(tokens["pixels"]), grid))
