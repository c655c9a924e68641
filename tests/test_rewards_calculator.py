"""Calculator: weighted sum, named parts, background futures, failures and invalid samples."""
import threading
import time

import numpy as np
import pytest

from jax_inpaint_rl.rewards import get_reward, register
from jax_inpaint_rl.rewards.calculator import RewardCalculator, build_calculator, summarize

B = 4
IMAGES = np.zeros((B, 8, 8, 3), np.uint8)
PROMPTS = ["p"] * B


def constant(values, extra=None):
    def reward(images, prompts, meta):
        return {"score": np.asarray(values, np.float32), **(extra or {})}

    return reward


def test_weighted_sum_and_named_parts():
    calc = RewardCalculator(
        {"a": constant([1, 2, 3, 4], {"sub": np.ones(B)}), "b": constant([10, 0, 10, 0])}, {"a": 0.5, "b": 2.0}
    )
    scores = calc(IMAGES, PROMPTS, {})
    np.testing.assert_allclose(scores["score"], [20.5, 1.0, 21.5, 2.0])
    np.testing.assert_allclose(scores["a/score"], [1, 2, 3, 4])
    np.testing.assert_allclose(scores["a/sub"], 1.0)
    np.testing.assert_allclose(scores["b/score"], [10, 0, 10, 0])
    np.testing.assert_allclose(scores["valid"], 1.0)
    assert summarize(scores)["score"] == pytest.approx(11.25)
    calc.close()


def test_submit_returns_before_rewards_finish_and_rewards_overlap():
    release = threading.Event()
    started = []

    def slow(images, prompts, meta):
        started.append(time.monotonic())
        assert release.wait(10)
        return {"score": np.ones(B)}

    calc = RewardCalculator({"x": slow, "y": slow}, {"x": 1.0, "y": 1.0})
    future = calc.submit(IMAGES, PROMPTS, {})
    deadline = time.monotonic() + 10
    while len(started) < 2 and time.monotonic() < deadline:  # both rewards running at once
        time.sleep(0.01)
    assert len(started) == 2 and not future.done()
    release.set()
    np.testing.assert_allclose(future.result(timeout=10)["score"], 2.0)
    calc.close()


def test_failure_propagates_and_nonfinite_is_rejected():
    def broken(images, prompts, meta):
        raise RuntimeError("judge unreachable")

    calc = RewardCalculator({"ok": constant(np.ones(B)), "bad": broken}, {"ok": 1.0, "bad": 1.0})
    with pytest.raises(RuntimeError, match="judge unreachable"):
        calc.submit(IMAGES, PROMPTS, {}).result(timeout=10)
    calc = RewardCalculator({"nan": constant([1, np.nan, 1, 1])}, {"nan": 1.0})
    with pytest.raises(RuntimeError, match=r"not finite for samples \[1\]"):
        calc(IMAGES, PROMPTS, {})


def test_invalid_samples_are_nan_in_total_and_excluded_from_summary():
    dropped = constant([np.nan, np.nan, 3, 4], {"valid": np.array([0, 0, 1, 1], np.float32)})
    calc = RewardCalculator({"remote": dropped, "local": constant(np.ones(B))}, {"remote": 1.0, "local": 1.0})
    scores = calc(IMAGES, PROMPTS, {})
    assert np.isnan(scores["score"][:2]).all()
    np.testing.assert_allclose(scores["score"][2:], [4, 5])
    np.testing.assert_allclose(scores["valid"], [0, 0, 1, 1])
    assert summarize(scores)["score"] == pytest.approx(4.5)


def test_build_from_config_with_registered_reward():
    @register("test_calculator_brightness")
    def make_brightness(scale: float = 1.0):
        return lambda images, prompts, meta: {"score": scale * images.mean(axis=(1, 2, 3))}

    calc = build_calculator(
        {"bright": {"reward": "test_calculator_brightness", "weight": 2.0, "config": {"scale": 0.5}}}
    )
    scores = calc(np.full((2, 4, 4, 3), 10, np.uint8), ["a", "b"], {})
    np.testing.assert_allclose(scores["score"], 10.0)
    with pytest.raises(ValueError, match="weight"):
        build_calculator({"bright": {"reward": "test_calculator_brightness"}})
    with pytest.raises(KeyError, match="unknown reward"):
        get_reward("no_such_reward")
    with pytest.raises(ValueError, match="already registered"):
        register("ocr")(make_brightness)


def test_busy_seconds_count_background_scoring_and_reset():
    def slow(images, prompts, meta):
        time.sleep(0.05)
        return {"score": np.ones(len(images), np.float32)}

    calc = RewardCalculator({"slow": slow}, {"slow": 1.0})
    futures = [calc.submit(IMAGES, PROMPTS, {}) for _ in range(2)]
    for future in futures:
        future.result()
    assert calc.take_busy_seconds() >= 0.1  # both batches, scored in worker threads
    assert calc.take_busy_seconds() == 0.0
    calc.close()
