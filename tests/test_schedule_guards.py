"""Flow-GRPO's 1 / (1 - sigma) guard holds for sigmas that are 1 only once cast to fp32."""
import jax
import numpy as np
import pytest

from jax_inpaint_rl.diffusion import schedules, steps

RNG = np.random.default_rng(0)
TAIL = [0.7, 0.4, 0.1]


@pytest.mark.parametrize("first", [1 - 1e-9, 1 + 2e-16, 1 - 2e-16])
def test_first_sigma_that_rounds_to_one_gets_the_exact_one_coefficients(first):
    # the case is real: a float64 test against 1.0 lets these through, fp32 makes them 1.0
    assert first != 1.0 and np.float32(first) == np.float32(1.0)
    rounded = schedules._flow_schedule(np.array([first] + TAIL))
    exact = schedules._flow_schedule(np.array([1.0] + TAIL))
    assert rounded.keys() == exact.keys()
    for name in exact:
        np.testing.assert_array_equal(rounded[name], exact[name], err_msg=name)
    np.testing.assert_array_equal(exact["sigma_safe"], np.float32([0.7] + TAIL))
    np.testing.assert_array_equal(exact["sigma"], np.float32([1.0] + TAIL))


@pytest.mark.parametrize("shift", [0.1, 0.3])
def test_sd3_shift_below_one_yields_a_safe_first_sigma(shift):
    # these shifts put the float64 first sigma 1 ulp off 1 (above for 0.1, below for 0.3)
    sigmas = schedules.sd3_shift(np.linspace(1.0, schedules.sd3_shift(1e-3, shift), 10), shift)
    assert sigmas[0] != 1.0
    schedule = schedules.sd3_schedule(10, shift)
    assert float(schedule["sigma"][0]) == 1.0
    assert float(schedule["sigma_safe"][0]) == float(schedule["sigma"][1])
    np.testing.assert_array_equal(schedule["sigma_safe"][1:], schedule["sigma"][1:])
    assert float(np.max(schedule["sigma_safe"])) < 1.0


def test_replacement_skips_a_second_sigma_that_also_rounds_to_one():
    schedule = schedules._flow_schedule(np.array([1.0, 1 - 1e-9, 0.5, 0.2]))
    np.testing.assert_array_equal(schedule["sigma_safe"], np.float32([0.5, 0.5, 0.5, 0.2]))


@pytest.mark.parametrize("noise_level", [0.7, 1.2])
def test_flow_grpo_step_is_finite_at_every_step_in_both_modes(noise_level):
    rounded = schedules._flow_schedule(np.array([1 - 1e-9] + TAIL))
    exact = schedules._flow_schedule(np.array([1.0] + TAIL))
    n = schedules.num_steps(rounded)
    x = RNG.standard_normal((n, 5, 4)).astype(np.float32)
    v = RNG.standard_normal((n, 5, 4)).astype(np.float32)
    given = RNG.standard_normal((n, 5, 4)).astype(np.float32)
    per_step = [(i, i) for i in range(n)] + [("per-sample", np.arange(n))]  # one step for all, or one per sample
    for label, index in per_step:
        coeffs, exact_coeffs = schedules.take_steps(rounded, index), schedules.take_steps(exact, index)
        key = jax.random.key(3)
        for mode in ({"key": key}, {"next_sample": given}):
            out = steps.flow_grpo_step(v, x, coeffs, noise_level, **mode)
            ref = steps.flow_grpo_step(v, x, exact_coeffs, noise_level, **mode)
            for field in ("sample", "log_prob", "mean", "std"):
                value = np.asarray(getattr(out, field))
                assert np.isfinite(value).all(), (label, sorted(mode), field)
                np.testing.assert_array_equal(value, np.asarray(getattr(ref, field)), err_msg=f"{label} {field}")
            assert (np.asarray(out.std) > 0).all()
    # at t = 1 the std is a sqrt(1 / (1 - sigma_2)) sqrt(1 - sigma_2), here a sqrt(0.3 / 0.3) = a
    first = steps.flow_grpo_step(v, x, schedules.take_steps(rounded, 0), noise_level, key=jax.random.key(0))
    np.testing.assert_allclose(first.std, noise_level, rtol=1e-5)
