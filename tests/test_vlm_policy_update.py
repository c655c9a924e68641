"""Several updates per sampled batch (vlm_policy/update.py, policy.num_iterations x policy.minibatches): the
strided slices are disjoint and cover the batch; on the tiny Qwen-Image-Edit Plus VLM, with the sampler's
recorded log-probs as the old policy, the first step's ratio is 1 per token to float rounding, and later steps
move it until the clip engages."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.models.qwen_image import family as qwen
from jax_inpaint_rl.vlm_policy import loop, sampling, update
from tests.test_vlm_policy_condition import tiny_vlm_prompts

END = qwen.TINY_IDS["<|im_end|>"]
STEPS = 4
EPS_LOW, EPS_HIGH = 0.2, 0.28


def numbered_batch(rows: int, image_tokens: int = 3) -> update.UpdateBatch:
    """Every array's entries name their row (row r holds r + 1, or 100 (r + 1) in the image features)."""
    r = np.arange(1, rows + 1)
    prompts = sampling.Prompts(jnp.asarray(np.repeat(r[:, None], 5, 1)), jnp.ones((rows, 5), jnp.int32),
                               jnp.asarray(np.broadcast_to(r[None, :, None], (3, rows, 5))),
                               jnp.asarray(np.repeat(100.0 * r, image_tokens)[:, None] * np.ones((1, 2))))
    per_row = jnp.asarray(np.repeat(r[:, None], STEPS, 1))
    return update.UpdateBatch(prompts, per_row, per_row, per_row.astype(jnp.float32), jnp.asarray(r, jnp.float32),
                              jnp.asarray(r % 2 == 0))


def test_minibatches_are_strided_disjoint_and_cover_the_batch():
    batch = numbered_batch(8)
    seen = []
    for index in range(4):
        part = update.minibatch(batch, index, 4)
        rows = np.asarray(part.advantages).astype(int)
        assert rows.tolist() == [index + 1, index + 5]  # rows index, index + 4 (1-based values)
        for leaf in (part.tokens, part.mask, part.log_probs, part.prompts.ids):
            assert np.all(np.asarray(leaf) == rows[:, None])
        assert np.all(np.asarray(part.prompts.positions) == rows[None, :, None])
        assert np.asarray(part.prompts.image_features)[:, 0].tolist() == list(np.repeat(100.0 * rows, 3))
        assert np.asarray(part.keep).tolist() == (rows % 2 == 0).tolist()
        seen += rows.tolist()
    assert sorted(seen) == list(range(1, 9))


@pytest.mark.slow  # compile-bound (sampling / update programs): CI's second stage
def test_first_ratio_is_one_then_the_updates_move_it_into_the_clip():
    _, vlm, params, prompts = tiny_vlm_prompts(["make it red", "add a hat", "remove the dog", "a blue sky"])
    spec = trainable_lib.Trainable("lora", rank=4, alpha=8.0, lora_pattern=loop.LORA_PATTERN)
    merge = lambda base, trainable: trainable_lib.merge(spec, base, trainable)  # noqa: E731
    lora = trainable_lib.init(spec, params, jax.random.key(1))
    out = sampling.make_sampler(vlm, merge, max_new_tokens=STEPS, end_id=END)(params, lora, prompts,
                                                                               jax.random.key(2))
    objective = update.make_objective(vlm, merge, temperature=1.0, end_id=END, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                      beta=0.0, aggregation="dapo", max_new_tokens=STEPS, old_from_sampler=True)
    batch = update.UpdateBatch(prompts, out.tokens, out.mask, out.log_probs, jnp.array([1.0, -1.0, 0.5, -0.5]),
                               jnp.ones(4, bool))
    _, (_, ratio) = jax.jit(objective)(lora, params, batch)
    valid = np.asarray(out.mask).astype(bool)
    first_gap = float(np.abs(np.asarray(ratio)[valid] - 1).max())

    step = update.make_step(objective, optax.adam(0.1), minibatches=2)
    trained, opt_state, history = lora, optax.adam(0.1).init(lora), []
    for _ in range(2):  # num_iterations
        for index in range(2):
            trained, opt_state, metrics = step(trained, opt_state, params, batch, index)
            history.append({k: float(v) for k, v in metrics.items()})
    print(f"first ratio vs 1: {first_gap:.2e} per token; per step (ratio_mean, clip_fraction): "
          f"{[(round(h['ratio_mean'], 4), round(h['clip_fraction'], 3)) for h in history]}")
    assert first_gap <= 1e-5, first_gap
    assert abs(history[0]["ratio_mean"] - 1) <= 1e-5 and history[0]["clip_fraction"] == 0
    later = history[1:]
    assert all(abs(h["ratio_mean"] - 1) > 1e-3 for h in later)  # the updates moved the policy off the sampler's
    assert max(h["clip_fraction"] for h in later) > 0
    assert all(h["skipped"] == 0 for h in history)
