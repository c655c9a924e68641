"""Schedules and steps against diffusers and independent NumPy formulas; rollout on-policy check."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from jax_inpaint_rl.diffusion import guidance, rollout as rollout_lib, schedules, steps
from tests import toy_policy

RNG = np.random.default_rng(0)


# ---------- schedules vs diffusers ----------

@pytest.mark.parametrize("num_steps,shift", [(10, 3.0), (28, 3.0), (40, 1.0)])
def test_sd3_schedule_matches_diffusers(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    ours = schedules.sd3_schedule(num_steps, shift)
    np.testing.assert_allclose(ours["sigma"], scheduler.sigmas[:-1].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours["sigma_next"], scheduler.sigmas[1:].numpy(), rtol=1e-6, atol=1e-7)


# Flux.1's scheduler config; Qwen-Image's (shift_terminal 0.02, max 8192 tokens); a linear time shift
DYNAMIC_CONFIGS = {
    "flux": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096),
    "qwen_image": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                       max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential", shift=1.0),
    "linear": dict(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.7, base_image_seq_len=64,
                   max_image_seq_len=2048, shift_terminal=0.1, time_shift_type="linear"),
}


@pytest.mark.parametrize("name", sorted(DYNAMIC_CONFIGS))
@pytest.mark.parametrize("num_steps,seq_len", [(4, 256), (20, 1024), (50, 4096)])
def test_shifted_schedule_matches_diffusers(name, num_steps, seq_len):
    """Our sigmas from the scheduler config equal diffusers' FlowMatchEulerDiscreteScheduler given the pipelines'
    linspace(1, 1/N, N) and mu = calculate_shift(seq_len, ...) as the Flux / Qwen-Image pipelines compute it."""
    config = DYNAMIC_CONFIGS[name]
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    c = scheduler.config
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    mu = seq_len * slope + c.base_shift - slope * c.base_image_seq_len  # the pipelines' calculate_shift
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    shift = schedules.DynamicShift.from_diffusers(dict(scheduler.config))
    assert shift.mu(seq_len) == pytest.approx(mu, rel=1e-12)
    ours = schedules.shifted_schedule(num_steps, seq_len, shift)
    np.testing.assert_allclose(ours["sigma"], scheduler.sigmas[:-1].numpy(), rtol=2e-6, atol=1e-7)
    assert float(ours["sigma_next"][-1]) == 0.0
    if c.shift_terminal:
        assert float(ours["sigma"][-1]) == pytest.approx(c.shift_terminal, rel=1e-6)
    # the denominator substitute is the schedule's second sigma at t = 1
    assert float(ours["sigma_safe"][0]) == pytest.approx(float(scheduler.sigmas[1]), rel=1e-6)


@pytest.mark.parametrize("key,value", [("use_dynamic_shifting", False), ("use_karras_sigmas", True),
                                       ("time_shift_type", "cubic"), ("_class_name", "DDIMScheduler")])
def test_dynamic_shift_refuses_other_schedulers(key, value):
    with pytest.raises(ValueError, match=key if key != "time_shift_type" else "cubic"):
        schedules.DynamicShift.from_diffusers({**DYNAMIC_CONFIGS["qwen_image"], key: value}, "x/scheduler_config.json")


def _sd15_ddim():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@pytest.mark.parametrize("num_steps", [5, 20, 50])
def test_ddim_schedule_matches_diffusers(num_steps):
    scheduler = _sd15_ddim()
    scheduler.set_timesteps(num_steps)
    ours = schedules.ddim_schedule(num_steps)
    np.testing.assert_array_equal(np.asarray(ours["model_t"]).astype(int), scheduler.timesteps.numpy())
    ac = scheduler.alphas_cumprod.numpy()
    np.testing.assert_allclose(ours["alpha_bar"], ac[scheduler.timesteps.numpy()], rtol=1e-6)


def test_ddim_eta0_and_eta1_steps_match_diffusers():
    scheduler = _sd15_ddim()
    scheduler.set_timesteps(10)
    ours = schedules.ddim_schedule(10)
    x = RNG.standard_normal((2, 4, 4, 3)).astype(np.float32)
    eps = RNG.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = RNG.standard_normal((2, 4, 4, 3)).astype(np.float32)
    to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    for i, t in enumerate(scheduler.timesteps):
        coeffs = schedules.take_steps(ours, i)
        ref0 = scheduler.step(to_torch(eps), t, to_torch(x), eta=0.0).prev_sample.permute(0, 2, 3, 1).numpy()
        out0 = steps.ddim_step(eps, x, coeffs, 0.0, key=jax.random.key(0))
        np.testing.assert_allclose(out0.sample, ref0, rtol=1e-5, atol=1e-5)
        ref1 = scheduler.step(to_torch(eps), t, to_torch(x), eta=1.0,
                              variance_noise=to_torch(noise)).prev_sample.permute(0, 2, 3, 1).numpy()
        out1 = steps.ddim_step(eps, x, coeffs, 1.0, key=jax.random.key(0))
        sample1 = out1.mean + np.asarray(out1.std)[:, None, None, None] * noise
        np.testing.assert_allclose(sample1, ref1, rtol=1e-5, atol=1e-5)


def test_ode_step_matches_flow_match_euler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    ours = schedules.sd3_schedule(6, 3.0)
    x = RNG.standard_normal((2, 3, 5)).astype(np.float32)
    v = RNG.standard_normal((2, 3, 5)).astype(np.float32)
    for i, t in enumerate(scheduler.timesteps):
        ref = scheduler.step(torch.from_numpy(v), t, torch.from_numpy(x)).prev_sample.numpy()
        np.testing.assert_allclose(steps.ode_step(v, x, schedules.take_steps(ours, i)).sample, ref, rtol=1e-6, atol=1e-6)


# ---------- steps vs independent NumPy formulas ----------

def np_gaussian_log_prob(sample, mean, std):
    std = np.asarray(std, np.float64).reshape(-1, *([1] * (sample.ndim - 1)))
    density = -((sample - mean) ** 2) / (2 * std**2) - np.log(std) - np.log(np.sqrt(2 * np.pi))
    return density.reshape(sample.shape[0], -1).mean(axis=1)


def np_flow_step(kind, v, x, t, t_next, t_safe, a):
    """REFERENCE_MATH.md section 1, written out in float64."""
    dt = t_next - t
    x0_hat, eps_hat = x - t * v, x + (1 - t) * v
    if kind == "flow_grpo":
        sigma_t = a * np.sqrt(t / (1 - t_safe))
        mean = x + (v + sigma_t**2 / (2 * t) * eps_hat) * dt
        return mean, sigma_t * np.sqrt(-dt)
    if kind == "dance_grpo":
        return x + (v + a**2 / (2 * t) * eps_hat) * dt, a * np.sqrt(t - t_next)
    if kind == "cps":
        sigma = t_next * np.sin(a * np.pi / 2)
        return (1 - t_next) * x0_hat + np.sqrt(t_next**2 - sigma**2) * eps_hat, sigma
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,a", [("flow_grpo", 0.7), ("flow_grpo", 1.2), ("dance_grpo", 0.3), ("cps", 0.9)])
def test_flow_step_mean_std_and_log_prob_match_numpy(kind, a):
    schedule = schedules.shifted_schedule(8, 1024)
    x = RNG.standard_normal((3, 6, 4)).astype(np.float32)
    v = RNG.standard_normal((3, 6, 4)).astype(np.float32)
    step_fn = steps.STEP_FUNCTIONS[kind]
    for i in range(7):  # the last step of CPS has std 0; checked separately
        c = {k: float(val[i]) for k, val in schedule.items()}
        mean, std = np_flow_step(kind, v.astype(np.float64), x.astype(np.float64), c["sigma"], c["sigma_next"],
                                 c["sigma_safe"], a)
        out = step_fn(v, x, schedules.take_steps(schedule, i), a, key=jax.random.key(i))
        np.testing.assert_allclose(out.mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.std, np.full(3, std), rtol=1e-5)
        expected = np_gaussian_log_prob(np.asarray(out.sample, np.float64), mean, np.full(3, std))
        np.testing.assert_allclose(out.log_prob, expected, rtol=1e-5, atol=1e-5)


def test_ddim_log_prob_matches_numpy():
    schedule = schedules.ddim_schedule(10)
    x = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
    eps = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
    for i in range(10):
        ab, abp = float(schedule["alpha_bar"][i]), float(schedule["alpha_bar_prev"][i])
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        std = np.sqrt((1 - abp) / (1 - ab) * (1 - ab / abp))
        mean = np.sqrt(abp) * x0 + np.sqrt(1 - abp - std**2) * eps
        out = steps.ddim_step(eps, x, schedules.take_steps(schedule, i), 1.0, key=jax.random.key(i))
        np.testing.assert_allclose(out.mean, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out.log_prob, np_gaussian_log_prob(np.asarray(out.sample, np.float64), mean,
                                                                      np.full(2, std)), rtol=1e-5, atol=1e-4)


def test_scoring_a_given_sample_equals_sampling_it():
    schedule = schedules.sd3_schedule(5)
    x, v = RNG.standard_normal((2, 8)).astype(np.float32), RNG.standard_normal((2, 8)).astype(np.float32)
    coeffs = schedules.take_steps(schedule, 2)
    drawn = steps.flow_grpo_step(v, x, coeffs, 0.7, key=jax.random.key(3))
    scored = steps.flow_grpo_step(v, x, coeffs, 0.7, next_sample=drawn.sample)
    np.testing.assert_array_equal(drawn.log_prob, scored.log_prob)
    with pytest.raises(ValueError, match="key"):
        steps.flow_grpo_step(v, x, coeffs, 0.7)


@pytest.mark.parametrize("kind", ["flow_grpo", "dance_grpo", "cps"])
def test_vanishing_noise_reproduces_ode(kind):
    schedule = schedules.sd3_schedule(6)
    x, v = RNG.standard_normal((2, 3, 3)).astype(np.float32), RNG.standard_normal((2, 3, 3)).astype(np.float32)
    for i in range(6):
        coeffs = schedules.take_steps(schedule, i)
        ode = steps.ode_step(v, x, coeffs).sample
        tiny = steps.STEP_FUNCTIONS[kind](v, x, coeffs, 1e-6, key=jax.random.key(i))
        np.testing.assert_allclose(tiny.sample, ode, atol=1e-5)
        off = steps.Sampler(kind, 0.9).step(v, x, coeffs, window=0.0, key=jax.random.key(i))
        np.testing.assert_allclose(off.sample, ode, atol=1e-6)
        np.testing.assert_array_equal(off.log_prob, 0.0)


def test_cps_anchor_log_prob_form():
    schedule = schedules.sd3_schedule(4)
    x, v = RNG.standard_normal((2, 5)).astype(np.float32), RNG.standard_normal((2, 5)).astype(np.float32)
    out = steps.cps_step(v, x, schedules.take_steps(schedule, 1), 0.8, key=jax.random.key(0), log_prob_form="anchor")
    np.testing.assert_allclose(out.log_prob, -np.mean((np.asarray(out.sample) - np.asarray(out.mean)) ** 2, axis=1),
                               rtol=1e-6)


# ---------- rollout ----------

def _toy_rollout(sampler, schedule, window=None, batch=4, same=False, key=0):
    params = toy_policy.init_params(jax.random.key(1))
    cond = toy_policy.make_cond(jax.random.key(2), batch)
    x_init = rollout_lib.initial_noise(jax.random.key(3), batch // 2, 2, toy_policy.LATENT_SHAPE, same)
    run = jax.jit(lambda p, c, x, k, w: rollout_lib.rollout(toy_policy.denoise, p, c, x, schedule, sampler, k, w))
    return params, cond, run(params, cond, x_init, jax.random.key(key), window)


@pytest.mark.parametrize("sampler,schedule", [
    (steps.Sampler("flow_grpo", 0.7), schedules.sd3_schedule(6)),
    (steps.Sampler("dance_grpo", 0.3), schedules.shifted_schedule(6, 256)),
    (steps.Sampler("cps", 0.8), schedules.sd3_schedule(6)),
    (steps.Sampler("ddim", 1.0), schedules.ddim_schedule(6)),
])
def test_on_policy_ratio_is_exactly_one(sampler, schedule):
    window = rollout_lib.sde_window(6, start=1, size=3)
    params, cond, traj = _toy_rollout(sampler, schedule, window)
    assert traj.latents.shape == (4, 7, *toy_policy.LATENT_SHAPE)
    assert traj.log_probs.shape == (4, 6) and traj.stds.shape == (4, 6)
    np.testing.assert_array_equal(np.asarray(traj.stds)[:, [0, 4, 5]], 0.0)  # outside the window: deterministic
    assert np.all(np.asarray(traj.stds)[:, 1:4] > 0)

    @jax.jit
    def rescore(p, step_index):
        x, x_next, _ = rollout_lib.gather_steps(traj, step_index)
        return rollout_lib.score_transitions(toy_policy.denoise, p, cond, x, x_next, step_index, schedule,
                                             sampler, traj.window).log_prob

    for j in range(6):
        log_prob = rescore(params, jnp.full((4,), j))
        ratio = np.exp(np.asarray(log_prob) - np.asarray(traj.log_probs[:, j]))
        np.testing.assert_array_equal(ratio, 1.0)


def test_rollout_is_a_function_of_the_key_and_groups_share_noise():
    sampler, schedule = steps.Sampler("flow_grpo", 0.7), schedules.sd3_schedule(4)
    _, _, a = _toy_rollout(sampler, schedule, same=True, key=5)
    _, _, b = _toy_rollout(sampler, schedule, same=True, key=5)
    _, _, c = _toy_rollout(sampler, schedule, same=True, key=6)
    np.testing.assert_array_equal(a.latents, b.latents)
    assert not np.allclose(a.latents[:, -1], c.latents[:, -1])
    np.testing.assert_array_equal(a.latents[0, 0], a.latents[1, 0])  # same initial noise within a group
    assert not np.allclose(a.latents[0, -1], a.latents[1, -1])  # the SDE makes them differ


def test_random_window_has_the_requested_size():
    for seed in range(5):
        window = np.asarray(rollout_lib.random_sde_window(jax.random.key(seed), 10, 3, 4))
        start = int(np.flatnonzero(window)[0])
        assert window.sum() == 3 and 0 <= start <= 4
    with pytest.raises(ValueError, match="does not fit"):
        rollout_lib.sde_window(5, start=3, size=4)


def test_guidance_values_match_their_formulas():
    """Batched CFG (one doubled call), embedded guidance (a model input) and true CFG (two calls, rescaled to
    the positive prediction's norm over the feature axis, as Qwen-Image's pipelines do), against NumPy."""
    params = toy_policy.init_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, *toy_policy.LATENT_SHAPE))
    t = jnp.full((2,), 0.5)
    pos, neg = toy_policy.make_cond(jax.random.key(2), 2), toy_policy.make_cond(jax.random.key(3), 2)
    cond = {"positive": pos, "negative": neg}
    u = np.asarray(toy_policy.denoise(params, x, t, neg), np.float64)
    c = np.asarray(toy_policy.denoise(params, x, t, pos), np.float64)
    cfg = guidance.BatchedCFG()
    np.testing.assert_allclose(cfg.guided(toy_policy.denoise, 4.0)(params, x, t, cond), u + 4.0 * (c - u),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cfg.unguided(toy_policy.denoise, 4.0)(params, x, t, cond), c, rtol=1e-6)
    combined = u + 4.0 * (c - u)
    rescaled = combined * np.linalg.norm(c, axis=-1, keepdims=True) / np.linalg.norm(combined, axis=-1, keepdims=True)
    true_cfg = guidance.TrueCFG()
    np.testing.assert_allclose(true_cfg.guided(toy_policy.denoise, 4.0)(params, x, t, cond), rescaled, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(guidance.TrueCFG(rescale=False).guided(toy_policy.denoise, 4.0)(params, x, t, cond),
                               combined, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(true_cfg.guided(toy_policy.denoise, 1.0)(params, x, t, cond), c, rtol=1e-6)
    assert cfg.needs_negative and true_cfg.needs_negative and not guidance.EmbeddedGuidance.needs_negative
    seen = {}
    guidance.EmbeddedGuidance().guided(lambda p, x, t, cond: seen.update(cond) or x, 30.0)(params, x, t, pos)
    np.testing.assert_array_equal(seen["guidance"], [30.0, 30.0])


def test_gaussian_log_prob_is_zero_for_deterministic_steps_and_finite_gradient():
    sample = jnp.ones((2, 3))
    grad = jax.grad(lambda m: steps.gaussian_log_prob(sample, m, jnp.zeros(2)).sum())(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)
    assert math.isclose(float(steps.gaussian_log_prob(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1))[0]),
                        -0.5 * math.log(2 * math.pi), rel_tol=1e-6)


@pytest.mark.parametrize("total,strength", [(10, 1.0), (10, 0.6), (3, 0.6), (7, 0.35), (50, 0.999), (4, 0.25)])
def test_strength_keeps_the_steps_diffusers_runs(total, strength):
    """schedules.from_strength keeps the last steps exactly as diffusers' inpainting get_timesteps does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint import (
        StableDiffusion3InpaintPipeline)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(total)
    holder = type("Holder", (), {"scheduler": scheduler})()
    timesteps, kept = StableDiffusion3InpaintPipeline.get_timesteps(holder, total, strength, "cpu")
    cut = schedules.from_strength(schedules.sd3_schedule(total, 3.0), strength)
    assert schedules.kept_steps(total, strength) == kept == schedules.num_steps(cut)
    np.testing.assert_allclose(np.asarray(cut["model_t"]) * 1000, timesteps.numpy(), rtol=1e-5)
