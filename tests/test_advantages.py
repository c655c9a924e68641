"""Zero-signal groups of group_advantages: decided on the valid rewards, not on fp32 advantages.

With the group baseline a group of equal rewards has no signal; with the batch baseline its
rewards still differ from the batch mean, so it is kept (flow_grpo's per_prompt_stat_tracking=False)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inpaint_rl.algorithms import advantages as adv_lib

COMBOS = [(baseline, std) for baseline in ("group", "batch") for std in ("batch", "group", "none")]
CLIP = 1.5

# Groups whose rewards are all equal, in values fp32 does not hold exactly, in group sizes
# where the fp32 mean lands 1 ulp off the value; then groups with real spread.
EQUAL_GROUPS = [[0.3] * 6, [0.9] * 3, [1 / 3] * 8, [0.1] * 8]
SPREAD_GROUPS = [[0.1, 0.5, 0.2, 0.4], [0.7, 0.25, 0.6], [0.3, 0.3, 0.3, 0.3, 0.3, 0.9]]


def _batch(groups):
    rewards = np.concatenate([np.asarray(g, np.float32) for g in groups])
    ids = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    return rewards, ids


def np_advantages(rewards, groups, valid, baseline, std, clip):
    """REFERENCE_MATH section 2 in float64 over the valid samples; 0 for the others."""
    rewards, valid = np.asarray(rewards, np.float64), np.asarray(valid, bool)
    r_valid = rewards[valid]
    out = np.zeros_like(rewards)
    for g in np.unique(groups):
        idx = (groups == g) & valid
        if not idx.any():
            continue
        center = rewards[idx].mean() if baseline == "group" else r_valid.mean()
        centered = rewards[idx] - center
        if std == "batch":
            centered = centered / (r_valid.std() + 1e-4)
        elif std == "group":
            centered = centered / (np.sqrt((centered**2).mean()) + 1e-4)
        out[idx] = centered
    return np.clip(out, -clip, clip)


def old_keep(rewards, ids, num_groups, valid, baseline, std):
    """The criterion this replaces: a group is kept when any of its fp32 advantages is non-zero."""
    out = adv_lib.group_advantages(jnp.asarray(rewards), jnp.asarray(ids), num_groups, baseline=baseline, std=std,
                                   clip=CLIP, valid=jnp.asarray(valid), drop_zero_signal=False)
    signal = jax.ops.segment_max(jnp.abs(out.advantages) * jnp.asarray(valid, jnp.float32), jnp.asarray(ids),
                                 num_groups) > 0
    return np.asarray((jnp.asarray(valid) > 0) & signal[jnp.asarray(ids)])


def test_fp32_mean_of_equal_rewards_is_off_by_an_ulp():
    """The case is real: for every chosen equal group, r - mean(r) in fp32 is not 0."""
    for group in EQUAL_GROUPS:
        r = np.asarray(group, np.float32)
        fp32_mean = np.add.accumulate(r, dtype=np.float32)[-1] / np.float32(len(r))  # sequential fp32 sum
        assert len(set(r.tolist())) == 1
        assert r[0] - fp32_mean != 0, group


@pytest.mark.parametrize("baseline,std", COMBOS)
def test_equal_reward_groups_are_dropped_and_spread_groups_match_numpy(baseline, std):
    groups = EQUAL_GROUPS + SPREAD_GROUPS
    rewards, ids = _batch(groups)
    num_groups = len(groups)
    valid = np.ones(len(rewards), bool)
    equal = ids < len(EQUAL_GROUPS)
    # the old criterion keeps every equal group (fp32 noise, or r - batch mean with the batch baseline)
    assert old_keep(rewards, ids, num_groups, valid, baseline, std)[equal].all()
    no_signal = equal if baseline == "group" else np.zeros_like(equal)

    fn = jax.jit(functools.partial(adv_lib.group_advantages, num_groups=num_groups, baseline=baseline, std=std,
                                   clip=CLIP))
    out = fn(jnp.asarray(rewards), jnp.asarray(ids))
    keep, advantages = np.asarray(out.keep), np.asarray(out.advantages)
    assert keep.shape == advantages.shape == rewards.shape
    np.testing.assert_array_equal(keep, ~no_signal)
    np.testing.assert_array_equal(advantages[no_signal], 0.0)
    expected = np_advantages(rewards, ids, valid, baseline, std, CLIP)
    np.testing.assert_allclose(advantages[~no_signal], expected[~no_signal], rtol=1e-5, atol=1e-5)
    assert np.abs(advantages[~equal]).max() > 0.1  # the spread groups carry real signal
    if std == "batch":
        assert np.abs(advantages).max() == pytest.approx(CLIP)  # and the clip is exercised


@pytest.mark.parametrize("baseline,std", COMBOS)
def test_invalid_samples_never_make_signal(baseline, std):
    groups = [
        [0.3, 0.3, 5.0, 0.3, -2.0],  # one distinct valid value, differing invalid ones: no group signal
        [0.1, np.nan, 0.1, 0.1],  # an invalid NaN reward touches no statistic: all finite
        [0.7, 0.2, 0.9],  # a single valid sample: no group signal
        [0.4, 0.6],  # no valid sample: dropped
        [0.1, 0.8, 0.8, 0.35],  # spread among the valid samples: kept except the invalid one
        [0.2, 0.6, 0.5],  # spread, all valid
    ]
    valid_groups = [[1, 1, 0, 1, 0], [1, 0, 1, 1], [0, 1, 0], [0, 0], [1, 0, 1, 1], [1, 1, 1]]
    rewards, ids = _batch(groups)
    valid = np.concatenate([np.asarray(v, bool) for v in valid_groups])
    out = adv_lib.group_advantages(jnp.asarray(rewards), jnp.asarray(ids), len(groups), baseline=baseline, std=std,
                                   clip=CLIP, valid=jnp.asarray(valid))
    keep, advantages = np.asarray(out.keep), np.asarray(out.advantages)
    assert np.isfinite(advantages).all()
    # group baseline: only the groups with spread among valid rewards; batch baseline: every valid sample
    # (their rewards differ from the batch mean)
    expected_keep = valid & (ids >= 4) if baseline == "group" else valid
    np.testing.assert_array_equal(keep, expected_keep)
    np.testing.assert_array_equal(advantages[~expected_keep], 0.0)
    clean = np.where(valid, rewards, 0.0)
    expected = np_advantages(clean, ids, valid, baseline, std, CLIP)
    np.testing.assert_allclose(advantages[expected_keep], expected[expected_keep], rtol=1e-5, atol=1e-5)


def test_without_drop_invalid_samples_are_still_not_kept():
    rewards = jnp.array([0.3, 0.3, 0.3, 0.9, 0.1, 0.5])
    ids = jnp.array([0, 0, 0, 1, 1, 1])
    valid = jnp.array([1, 1, 1, 1, 0, 1])
    out = adv_lib.group_advantages(rewards, ids, 2, valid=valid, drop_zero_signal=False)
    np.testing.assert_array_equal(out.keep, [True, True, True, True, False, True])
    assert float(out.advantages[4]) == 0.0
