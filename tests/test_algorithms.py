"""Advantages and losses against independent NumPy formulas, gradients and limits."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inpaint_rl.algorithms import advantages as adv_lib, dpo, ema, grpo, nft, sft
from jax_inpaint_rl.diffusion import parameterization

RNG = np.random.default_rng(0)


# ---------- advantages ----------

def np_advantages(rewards, groups, baseline, std, clip):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    batch_std = rewards.std()
    for g in np.unique(groups):
        idx = groups == g
        center = rewards[idx].mean() if baseline == "group" else rewards.mean()
        scale = {"group": (rewards[idx] - center).std() if baseline == "group" else
                 np.sqrt(((rewards[idx] - center) ** 2).mean()), "batch": batch_std, "none": None}[std]
        out[idx] = (rewards[idx] - center) / (scale + 1e-4) if scale is not None else rewards[idx] - center
    return np.clip(out, -clip, clip)


@pytest.mark.parametrize("baseline,std", [("group", "batch"), ("group", "group"), ("batch", "batch"), ("group", "none")])
def test_advantages_match_numpy_on_uneven_groups(baseline, std):
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    rewards = RNG.standard_normal(10).astype(np.float32) * 3
    out = adv_lib.group_advantages(jnp.asarray(rewards), jnp.asarray(groups), 4, baseline=baseline, std=std,
                                   clip=2.5, drop_zero_signal=False)
    np.testing.assert_allclose(out.advantages, np_advantages(rewards, groups, baseline, std, 2.5), rtol=1e-5, atol=1e-5)


def test_zero_signal_groups_and_invalid_samples_are_dropped():
    groups = jnp.array([0, 0, 1, 1, 1, 2, 2])
    rewards = jnp.array([0.5, 0.5, 0.1, 0.9, 0.4, 1.0, 0.0])
    valid = jnp.array([1, 1, 1, 1, 1, 1, 0])
    out = adv_lib.group_advantages(rewards, groups, 3, valid=valid)
    np.testing.assert_array_equal(out.keep, [False, False, True, True, True, False, False])
    np.testing.assert_array_equal(np.asarray(out.advantages)[[0, 1, 5, 6]], 0.0)
    # the invalid sample is excluded from group 2's statistics: a lone valid sample has no signal
    kept = adv_lib.group_advantages(rewards, groups, 3, valid=valid, baseline="group", std="group")
    assert not bool(kept.keep[5])


def test_group_ids_are_group_major():
    np.testing.assert_array_equal(adv_lib.group_ids_for(3, 2), [0, 0, 1, 1, 2, 2])


# ---------- GRPO ----------

def toy_log_prob(theta, x_next, x):
    """A Gaussian step whose mean depends on theta: the same log-prob form as steps.py."""
    mean = x * theta[0] + theta[1]
    std = 0.3
    return (-((x_next - mean) ** 2) / (2 * std**2) - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)).mean(axis=1)


def test_grpo_gradient_matches_finite_differences():
    x, x_next = jnp.asarray(RNG.standard_normal((6, 5)), jnp.float32), jnp.asarray(RNG.standard_normal((6, 5)), jnp.float32)
    theta_old = jnp.array([0.9, 0.1])
    old = toy_log_prob(theta_old, x_next, x)
    advantages = jnp.asarray(RNG.standard_normal(6), jnp.float32)

    def loss(theta):
        return grpo.grpo_loss(toy_log_prob(theta, x_next, x), old, advantages, clip_range=0.2).loss

    theta = jnp.array([0.92, 0.08])
    analytic = np.asarray(jax.grad(loss)(theta))
    h = 1e-3
    numeric = [(loss(theta.at[i].add(h)) - loss(theta.at[i].add(-h))) / (2 * h) for i in range(2)]
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4)
    assert np.all(np.abs(analytic) > 1e-3)


@pytest.mark.parametrize("advantage,log_ratio,clipped", [(1.0, 0.3, True), (1.0, -0.3, False),
                                                         (-1.0, -0.3, True), (-1.0, 0.3, False)])
def test_ppo_clipping_zeroes_the_gradient_where_it_must(advantage, log_ratio, clipped):
    old = jnp.zeros(1)
    grad = jax.grad(lambda lp: grpo.grpo_loss(lp, old, jnp.array([advantage]), clip_range=0.1).loss)(
        jnp.array([log_ratio]))
    if clipped:
        assert float(grad[0]) == 0.0
    else:
        np.testing.assert_allclose(grad, -advantage * np.exp(log_ratio), rtol=1e-6)


def test_grpo_on_policy_value_and_metrics():
    lp = jnp.asarray(RNG.standard_normal(8), jnp.float32)
    advantages = jnp.asarray(RNG.standard_normal(8), jnp.float32)
    terms = grpo.grpo_loss(lp, lp, advantages, clip_range=1e-4)
    np.testing.assert_array_equal(terms.ratio, 1.0)
    np.testing.assert_allclose(terms.policy_loss, -advantages.mean(), rtol=1e-6)
    assert float(terms.clip_fraction) == 0.0 and float(terms.approx_kl) == 0.0


def test_grpo_advantage_clip_and_weights():
    lp = jnp.zeros(3)
    terms = grpo.grpo_loss(lp, lp, jnp.array([10.0, -10.0, 1.0]), clip_range=0.1, adv_clip_max=2.0,
                           weights=jnp.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(terms.policy_loss, -(2.0 + 1.0) / 2, rtol=1e-6)


def test_kl_uses_the_step_std_and_vanishes_at_the_reference():
    mean = jnp.asarray(RNG.standard_normal((3, 4, 2)), jnp.float32)
    ref = jnp.asarray(RNG.standard_normal((3, 4, 2)), jnp.float32)
    std = jnp.array([0.2, 0.5, 0.0])
    kl = grpo.gaussian_step_kl(mean, ref, std**2)
    expected = ((np.asarray(mean) - np.asarray(ref)) ** 2).reshape(3, -1).mean(1) / (2 * np.array([0.2, 0.5, 1.0]) ** 2)
    np.testing.assert_allclose(kl[:2], expected[:2], rtol=1e-5)
    assert float(kl[2]) == 0.0
    np.testing.assert_array_equal(grpo.gaussian_step_kl(mean, mean, std**2), 0.0)
    terms = grpo.grpo_loss(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), clip_range=0.1, kl_beta=0.04, mean=mean,
                           ref_mean=ref, kl_var=std**2)
    np.testing.assert_allclose(terms.loss, 0.04 * np.asarray(kl).mean(), rtol=1e-5)


def test_flow_grpo_kl_mode_divides_by_sigma_squared():
    """Flow-GRPO's KL divides by sigma_t^2 (no sqrt(-dt) in its std): the exact KL times (-dt)."""
    sigma, sigma_next, a = np.array([0.9, 0.55]), np.array([0.8, 0.3]), 0.7
    sigma_t = a * np.sqrt(sigma / (1 - sigma))
    std = sigma_t * np.sqrt(sigma - sigma_next)
    coeffs = {"sigma": jnp.asarray(sigma, jnp.float32), "sigma_next": jnp.asarray(sigma_next, jnp.float32)}
    mean = jnp.asarray(RNG.standard_normal((2, 5)), jnp.float32)
    ref = jnp.asarray(RNG.standard_normal((2, 5)), jnp.float32)
    f32 = jnp.asarray(std, jnp.float32)
    exact = grpo.gaussian_step_kl(mean, ref, grpo.kl_variance(f32, coeffs, "exact"))
    flow = grpo.gaussian_step_kl(mean, ref, grpo.kl_variance(f32, coeffs, "flow_grpo"))
    squared = ((np.asarray(mean, np.float64) - np.asarray(ref, np.float64)) ** 2).mean(1)
    np.testing.assert_allclose(flow, squared / (2 * sigma_t**2), rtol=1e-5)
    np.testing.assert_allclose(flow, np.asarray(exact) * (sigma - sigma_next), rtol=1e-5)
    with pytest.raises(ValueError, match="kl_mode"):
        grpo.kl_variance(f32, coeffs, "anchor")


def test_train_step_indices_modes():
    window = np.array([0, 1, 1, 1, 1, 0], np.float32)
    first = grpo.train_step_indices(jax.random.key(0), 3, window, 0.5, "first")
    np.testing.assert_array_equal(first, [[1, 2]] * 3)
    shuffled = np.asarray(grpo.train_step_indices(jax.random.key(0), 50, window, 1.0, "shuffle"))
    assert shuffled.shape == (50, 4) and all(sorted(row) == [1, 2, 3, 4] for row in shuffled)
    one = np.asarray(grpo.train_step_indices(jax.random.key(1), 200, window, 1.0, "one"))
    assert one.shape == (200, 1) and set(one[:, 0]) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="no stochastic step"):
        grpo.train_step_indices(jax.random.key(0), 2, np.zeros(4), 1.0, "first")


# ---------- NFT ----------

def np_nft(v, v_old, x_t, x0, t, advantages, beta, clip_max, mode, kl_beta, v_ref):
    a = np.asarray(advantages, np.float64)
    a = {"normal": np.clip(a, -clip_max, clip_max), "positive_only": np.clip(a, 0, clip_max),
         "negative_only": np.clip(a, -clip_max, 0), "one_only": (a > 0).astype(float), "binary": np.sign(a)}[mode]
    r = np.clip(a / clip_max / 2 + 0.5, 0, 1)
    tt = t.reshape(-1, *([1] * (x0.ndim - 1)))
    losses = []
    for pred in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
        x0_pred = x_t - tt * pred
        diff = (x0_pred - x0).reshape(len(x0), -1)
        weight = np.maximum(np.abs(diff).mean(1), 1e-5)
        losses.append((diff**2).mean(1) / weight)
    policy = (clip_max * (r * losses[0] / beta + (1 - r) * losses[1] / beta)).mean()
    kl = ((v - v_ref) ** 2).reshape(len(v), -1).mean(1).mean()
    return policy + kl_beta * kl


@pytest.mark.parametrize("mode", nft.ADV_MODES)
def test_nft_loss_matches_numpy(mode):
    shape = (5, 4, 3)
    v, v_old, v_ref, x0, eps = (RNG.standard_normal(shape) for _ in range(5))
    t = RNG.uniform(0.1, 0.9, 5)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    advantages = np.array([3.0, -7.0, 0.0, 0.5, -0.2])
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    x0_of = lambda v_mix: f32(x_t) - f32(t)[:, None, None] * v_mix  # noqa: E731
    terms = nft.nft_loss(f32(v), f32(v_old), f32(x0), f32(advantages), x0_estimate=x0_of, beta=0.5,
                         adv_clip_max=5.0, adv_mode=mode, kl_beta=0.01, ref_prediction=f32(v_ref))
    np.testing.assert_allclose(terms.loss, np_nft(v, v_old, x_t, x0, t, advantages, 0.5, 5.0, mode, 0.01, v_ref),
                               rtol=1e-4)


def test_nft_limits_and_gradient_direction():
    shape = (2, 6)
    x0, eps, v_old = (jnp.asarray(RNG.standard_normal(shape), jnp.float32) for _ in range(3))
    t = jnp.array([0.5, 0.5])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v_true = eps - x0
    loss = lambda v, a: nft.nft_loss(v, v_old, x0, a, x0_estimate=lambda p: x_t - t[:, None] * p,  # noqa: E731
                                     beta=1.0).loss
    # v_theta == v_old: v+ == v- so the reward weight cannot matter
    np.testing.assert_allclose(loss(v_old, jnp.array([5.0, 5.0])), loss(v_old, jnp.array([-5.0, -5.0])), rtol=1e-6)
    # positive advantage: a gradient step moves v toward the velocity that reconstructs x0
    grad = jax.grad(loss)(v_old, jnp.array([5.0, 5.0]))
    step = v_old - 1e-2 * grad
    assert float(jnp.sum((step - v_true) ** 2)) < float(jnp.sum((v_old - v_true) ** 2))
    # negative advantage: the policy moves away from it (toward the implicit negative's complement)
    grad_neg = jax.grad(loss)(v_old, jnp.array([-5.0, -5.0]))
    assert float(jnp.sum(grad * grad_neg)) < 0
    np.testing.assert_allclose(nft.reward_weight(jnp.array([5.0, -5.0, 0.0, 50.0]), "normal", 5.0), [1, 0, 0.5, 1])


def test_old_params_decay_types():
    np.testing.assert_allclose([nft.old_params_decay(s, "copy") for s in (0, 100)], [0, 0])
    np.testing.assert_allclose([nft.old_params_decay(s, "1") for s in (0, 100, 1000)], [0, 0.1, 0.5], rtol=1e-6)
    np.testing.assert_allclose([nft.old_params_decay(s, "2") for s in (0, 74, 75, 175, 1000)],
                               [0, 0, 0, 0.75, 0.999], rtol=1e-6)
    with pytest.raises(ValueError, match="decay_type"):
        nft.old_params_decay(0, "3")
    state = {"old": {"w": jnp.zeros(2)}, "params": {"w": jnp.ones(2)}}
    assert nft.decay_old_params(state, 500, "0") is state  # seed 004's type 0: a fixed reference
    np.testing.assert_allclose(nft.decay_old_params(state, 100, "1")["old"]["w"], 0.9, rtol=1e-6)
    np.testing.assert_array_equal(nft.decay_old_params(state, 7, "copy")["old"]["w"], 1.0)


# ---------- DPO ----------

def test_dpo_loss_matches_numpy_and_limits():
    e = [jnp.asarray(RNG.uniform(0, 1, 6), jnp.float32) for _ in range(4)]
    beta = 50.0
    terms = dpo.dpo_loss(*e, beta=beta)
    logit = -beta / 2 * ((np.asarray(e[0]) - np.asarray(e[1])) - (np.asarray(e[2]) - np.asarray(e[3])))
    np.testing.assert_allclose(terms.loss, np.mean(np.log1p(np.exp(-logit))), rtol=1e-5)
    same = dpo.dpo_loss(e[0], e[1], e[0], e[1], beta=beta)
    np.testing.assert_allclose(same.loss, np.log(2.0), rtol=1e-6)
    # lowering the winner's error lowers the loss; lowering the loser's raises it
    g_w, g_l = jax.grad(lambda w, l: dpo.dpo_loss(w, l, e[2], e[3], beta=beta).loss, argnums=(0, 1))(e[0], e[1])
    assert np.all(np.asarray(g_w) > 0) and np.all(np.asarray(g_l) < 0)


def test_winner_loser_and_reference_refresh():
    rewards = jnp.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.3])
    win, lose, has = dpo.winner_loser(rewards, 2, 3)
    np.testing.assert_array_equal(win, [1, 3])
    np.testing.assert_array_equal(lose, [0, 3])
    np.testing.assert_array_equal(has, [True, False])
    ref, params = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    np.testing.assert_array_equal(dpo.refresh_reference(ref, params, 4, 2)["w"], 1.0)
    np.testing.assert_array_equal(dpo.refresh_reference(ref, params, 3, 2)["w"], 0.0)
    assert dpo.refresh_reference(ref, params, 4, 0) is ref
    np.testing.assert_allclose(dpo.denoising_error(jnp.ones((2, 3)), jnp.zeros((2, 3))), [1.0, 1.0])


# ---------- SFT and EMA ----------

def test_sft_mask_weighted_loss_matches_numpy():
    pred, target = RNG.standard_normal((2, 4, 4, 3)), RNG.standard_normal((2, 4, 4, 3))
    mask = (RNG.uniform(size=(2, 4, 4, 1)) > 0.5).astype(np.float32)
    weights = sft.region_weights(jnp.asarray(mask), inside=1.0, outside=0.0)
    ours = sft.sft_loss(jnp.asarray(pred), jnp.asarray(target), weights)
    err = (pred - target) ** 2
    m = np.broadcast_to(mask, err.shape)
    expected = np.mean([(err[i] * m[i]).sum() / m[i].sum() for i in range(2)])
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    np.testing.assert_allclose(sft.sft_loss(jnp.asarray(pred), jnp.asarray(target)), err.mean(), rtol=1e-5)


def test_parameterizations_match_numpy():
    """x_t, regression targets and x0 estimates of both parameterizations, against REFERENCE_MATH in float64."""
    x0, eps = RNG.standard_normal((3, 2, 2, 4)), RNG.standard_normal((3, 2, 2, 4))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    velocity, epsilon = parameterization.Velocity(), parameterization.Epsilon()
    t = np.array([0.1, 0.37, 0.93])
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x0 + tt * eps
    np.testing.assert_allclose(velocity.noised(f32(x0), f32(eps), f32(t)), x_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(velocity.target(f32(x0), f32(eps)), eps - x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(velocity.x0(f32(eps - x0), f32(x_t), f32(t)), x0, rtol=1e-4, atol=1e-5)
    steps = np.array([1, 480, 999])
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ab = np.cumprod(1 - betas)[steps][:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    np.testing.assert_allclose(epsilon.noised(f32(x0), f32(eps), f32(steps)), x_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(epsilon.target(f32(x0), f32(eps)), eps)
    np.testing.assert_allclose(epsilon.x0(f32(eps), f32(x_t), f32(steps)), x0, rtol=1e-4, atol=1e-4)
    times = velocity.training_time(jax.random.key(0), 1000)
    assert 0 < float(times.min()) and float(times.max()) < 1 and abs(float(times.mean()) - 0.5) < 0.05
    timesteps = np.asarray(epsilon.training_time(jax.random.key(0), 1000))
    assert timesteps.min() >= 0 and timesteps.max() <= 999 and np.all(timesteps == np.round(timesteps))


def test_ema_update_and_interval():
    avg, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(ema.ema_update(avg, params, 0.9)["w"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(ema.ema_update_every(avg, params, 3, 0.9, interval=2)["w"], 0.0)
    np.testing.assert_allclose(ema.ema_update_every(avg, params, 4, 0.9, interval=2)["w"], 0.1, rtol=1e-6)


def test_first_ratio_warning_is_tied_to_the_clip_range():
    """A first-update ratio off by 3e-5 is noise with clip range 1e-3 but a real disagreement with 1e-4 (the
    default), where the old fixed 1e-3 threshold never warned."""
    first = {"ratio_min": np.array([1 - 3e-5, 1.0]), "ratio_max": np.array([1 + 2e-5, 1.1]), "loss": np.zeros(2)}
    later = {"ratio_min": np.array([0.9]), "ratio_max": np.array([1.2]), "loss": np.ones(1)}
    with mock.patch.object(grpo.logging, "warning") as warning:
        summary = grpo.summarize([first, later], clip_range=1e-4)
    assert warning.called
    assert summary["first_ratio_deviation"] == pytest.approx(3e-5, rel=1e-3)
    assert (summary["ratio_min"], summary["ratio_max"], summary["loss"]) == (0.9, 1.2, pytest.approx(1 / 3))
    with mock.patch.object(grpo.logging, "warning") as warning:
        grpo.summarize([first], clip_range=1e-3)
    assert not warning.called
