"""Token-level GRPO loss (vlm_policy/loss.py) against an independent float64 NumPy statement of trl's formulas, on
a hand-built batch that exercises both clip sides, both advantage signs, masked tokens, uneven lengths and a
dropped sample; gradients against the NumPy formula's analytic derivative."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inpaint_rl.vlm_policy import loss as loss_lib

EPS_LOW, EPS_HIGH, BETA, MAX_LEN = 0.2, 0.28, 0.04, 6
LOGP = np.array([[-1.1, -0.37, -2.9, -0.05, -1.7, -0.3],
                 [-0.61, -3.3, -0.9, -1.23, -0.4, -2.2],
                 [-2.05, -0.77, -0.12, -1.9, -0.66, -0.8],
                 [-0.5, -0.5, -1.5, -0.7, -0.2, -1.0]])
OLD = LOGP + np.array([[0.0, 0.4, -0.3, 0.11, -0.07, 0.9],  # r = exp(-delta): 1, 0.67 (< 1 - eps), 1.35 (> 1 + eps)
                       [-0.5, 0.05, 0.31, -0.13, 0.2, -0.2],
                       [0.17, -0.29, 0.6, 0.02, -0.4, 0.1],
                       [0.3, -0.3, 0.1, 0.2, -0.1, 0.0]])
REF = LOGP + np.array([[0.3, -0.2, 0.05, -0.6, 0.45, 0.1],
                       [0.07, 0.9, -0.33, 0.2, -0.15, 0.0],
                       [-0.8, 0.25, 0.12, -0.05, 0.3, 0.6],
                       [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], np.float64)
ADVANTAGES = np.array([1.3, -0.7, 0.45, 2.0])
KEEP = np.array([True, True, True, False])  # the last sample's group had no signal


def numpy_loss(logp, aggregation, beta):
    """trl's per-token loss and aggregation, float64; returns (loss, d loss / d logp)."""
    ratio = np.exp(logp - OLD)
    a = ADVANTAGES[:, None]
    unclipped, clipped = ratio * a, np.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a
    per_token = -np.minimum(unclipped, clipped)
    inside = (ratio >= 1 - EPS_LOW) & (ratio <= 1 + EPS_HIGH)
    grad_token = np.where(inside | (unclipped <= clipped), -ratio * a, 0.0)  # the clipped branch is constant
    if beta:
        delta = REF - logp
        per_token = per_token + beta * (np.exp(delta) - delta - 1)
        grad_token = grad_token + beta * (1 - np.exp(delta))
    mask = MASK * KEEP[:, None]
    if aggregation == "grpo":
        weights = mask / np.maximum(mask.sum(1, keepdims=True), 1) / len(mask)
    elif aggregation == "dapo":
        weights = mask / mask.sum()
    else:
        weights = mask / (len(mask) * MAX_LEN)
    return float(np.sum(per_token * weights)), grad_token * weights


def jax_loss(logp, aggregation, beta):
    value, _ = loss_lib.grpo_loss(logp, jnp.asarray(OLD, jnp.float32), jnp.asarray(ADVANTAGES, jnp.float32),
                                  jnp.asarray(MASK, jnp.float32), jnp.asarray(KEEP), eps_low=EPS_LOW,
                                  eps_high=EPS_HIGH, beta=beta, ref_log_probs=jnp.asarray(REF, jnp.float32),
                                  aggregation=aggregation, max_completion_length=MAX_LEN)
    return value


def test_the_batch_hits_both_clip_sides():
    ratio = np.exp(LOGP - OLD)[MASK.astype(bool)]
    assert (ratio > 1 + EPS_HIGH).any() and (ratio < 1 - EPS_LOW).any() and (np.abs(ratio - 1) < 0.1).any()


@pytest.mark.parametrize("beta", [0.0, BETA])
@pytest.mark.parametrize("aggregation", loss_lib.AGGREGATIONS)
def test_loss_and_gradient_match_numpy(aggregation, beta):
    expected, expected_grad = numpy_loss(LOGP, aggregation, beta)
    logp = jnp.asarray(LOGP, jnp.float32)
    got, grad = jax.value_and_grad(jax_loss)(logp, aggregation, beta)
    assert abs(float(got) - expected) <= 1e-6 * max(1.0, abs(expected)), (aggregation, beta, float(got), expected)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(grad)[~(MASK * KEEP[:, None]).astype(bool)] == 0)


def test_aggregations_differ_and_dapo_takes_the_global_token_count():
    values = {a: float(jax_loss(jnp.asarray(LOGP, jnp.float32), a, 0.0)) for a in loss_lib.AGGREGATIONS}
    assert len({round(v, 6) for v in values.values()}) == 3, values
    local = float(jax_loss(jnp.asarray(LOGP, jnp.float32), "dapo", 0.0))
    tokens = (MASK * KEEP[:, None]).sum()
    value, _ = loss_lib.grpo_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADVANTAGES), jnp.asarray(MASK),
                                  jnp.asarray(KEEP), eps_low=EPS_LOW, eps_high=EPS_HIGH, aggregation="dapo",
                                  num_tokens=2 * tokens)  # a micro-batch holding half the accumulated tokens
    np.testing.assert_allclose(float(value), local / 2, rtol=1e-6)


def test_on_policy_ratio_is_one_and_gradient_is_the_policy_gradient():
    """old == logp: ratio exactly 1 everywhere, the loss is -A per token, its gradient -A (x weights)."""
    logp = jnp.asarray(LOGP, jnp.float32)
    value, metrics = loss_lib.grpo_loss(logp, logp, jnp.asarray(ADVANTAGES, jnp.float32), jnp.asarray(MASK),
                                        jnp.asarray(KEEP), eps_low=EPS_LOW, eps_high=EPS_HIGH)
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_fraction"]) == 0.0
    lengths = MASK.sum(1)
    expected = np.mean(np.where(KEEP, -ADVANTAGES, 0.0) * (MASK * KEEP[:, None]).sum(1) / lengths)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)


def test_token_log_probs_is_log_softmax_of_logits_over_temperature():
    logits = np.random.default_rng(0).standard_normal((2, 3, 11)) * 3
    tokens = np.array([[0, 5, 10], [3, 3, 7]])
    for temperature in (1.0, 0.7):
        scaled = logits / temperature
        reference = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
        expected = np.take_along_axis(reference, tokens[..., None], -1)[..., 0]
        got = loss_lib.token_log_probs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), temperature)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_bad_aggregation_and_missing_reference_are_named():
    with pytest.raises(ValueError, match="bnpo2"):
        loss_lib.aggregate(jnp.ones((1, 2)), jnp.ones((1, 2)), "bnpo2")
    with pytest.raises(ValueError, match="ref_log_probs"):
        loss_lib.grpo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)), beta=0.1)


@pytest.mark.parametrize("aggregation", loss_lib.AGGREGATIONS)
def test_a_split_batch_keeps_every_token_weight(aggregation):
    """Two slices (rows 0, 2 and 1, 3: update.minibatch's strided split) given the whole batch's token and
    sequence counts: each slice's loss is its share of the unsplit one (the NumPy weights restricted to its rows),
    they sum to it, and 'dapo' divides by the whole batch's kept tokens in both."""
    whole, _ = numpy_loss(LOGP, aggregation, 0.0)
    kept = MASK * KEEP[:, None]
    parts = []
    for rows in ([0, 2], [1, 3]):
        value, _ = loss_lib.grpo_loss(jnp.asarray(LOGP[rows], jnp.float32), jnp.asarray(OLD[rows], jnp.float32),
                                      jnp.asarray(ADVANTAGES[rows], jnp.float32), jnp.asarray(MASK[rows]),
                                      jnp.asarray(KEEP[rows]), eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                      aggregation=aggregation, max_completion_length=MAX_LEN,
                                      num_tokens=kept.sum(), num_sequences=len(MASK))
        ratio = np.exp(LOGP[rows] - OLD[rows])
        a = ADVANTAGES[rows][:, None]
        per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
        normaliser = {"grpo": np.maximum(kept[rows].sum(1, keepdims=True), 1) * len(MASK),
                      "dapo": kept.sum(), "dr_grpo": len(MASK) * MAX_LEN}[aggregation]
        np.testing.assert_allclose(float(value), np.sum(per_token * kept[rows] / normaliser), rtol=1e-6)
        parts.append(float(value))
    np.testing.assert_allclose(sum(parts), whole, rtol=1e-6)
    assert min(abs(p) for p in parts) > 0  # both slices carry tokens
