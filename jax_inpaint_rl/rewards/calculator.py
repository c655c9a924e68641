"""Combine several rewards into one with weights, and run them off the training thread.

    calculator = build_calculator({
        "ocr": {"weight": 1.0, "config": {"mode": "crop"}},
        "judge": {"reward": "vlm", "weight": 0.5, "config": {"base_url": ..., "model": ...}},
    })
    future = calculator.submit(images, prompts, meta)   # returns at once
    ...                                                 # dispatch the next rollout
    scores = future.result()

score = sum_i weight_i * score_i (a plain weighted sum, not renormalised). The
result also holds every part as '<name>/<key>' ('ocr/score', 'judge/alignment',
...) for logging, and 'valid' (1 where every reward scored the sample; remote
rewards in drop mode mark dropped groups 0 and their total is NaN). All rewards of
one batch run concurrently; a reward that raises makes `result()` raise.
"""
import concurrent.futures
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.base import Meta, Reward, Scores, check_scores


def combine(parts: Mapping[str, Scores], weights: Mapping[str, float], batch: int) -> Scores:
    """Weighted total plus every named part, and the AND of the parts' validity."""
    total = np.zeros(batch, np.float32)
    valid = np.ones(batch, np.float32)
    out: Scores = {}
    for name, scores in parts.items():
        total = total + np.float32(weights[name]) * scores["score"]
        valid = valid * scores.get("valid", 1.0)
        out.update({f"{name}/{key}": value for key, value in scores.items()})
    out["score"] = np.where(valid > 0, total, np.nan).astype(np.float32)
    out["valid"] = valid
    return out


def _to_host(value: Any) -> Any:
    """Arrays (numpy or jax) to numpy, fetched in the calling worker thread; lists stay lists."""
    return list(value) if isinstance(value, (list, tuple)) else np.asarray(value)


class RewardCalculator:
    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float], max_pending: int = 2):
        missing = sorted(set(rewards) ^ set(weights))
        if missing:
            raise ValueError(f"calculator: rewards and weights must name the same rewards; mismatched: {missing}")
        if not rewards:
            raise ValueError("calculator: needs at least one reward")
        self.rewards, self.weights = dict(rewards), dict(weights)
        self._batches = concurrent.futures.ThreadPoolExecutor(max_workers=max_pending, thread_name_prefix="reward-batch")
        self._parts = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_pending * len(rewards), thread_name_prefix="reward-part"
        )
        self._busy_s, self._busy_lock = 0.0, threading.Lock()

    def __call__(self, images: Any, prompts: Sequence[str], meta: Meta) -> Scores:
        """Score one batch now (rewards in parallel), in this thread."""
        start = time.perf_counter()
        images = _to_host(images)
        meta = {field: _to_host(value) for field, value in meta.items()}
        jobs = {name: self._parts.submit(reward, images, list(prompts), meta) for name, reward in self.rewards.items()}
        parts = {name: check_scores(job.result(), len(images), name) for name, job in jobs.items()}
        with self._busy_lock:
            self._busy_s += time.perf_counter() - start
        return combine(parts, self.weights, len(images))

    def take_busy_seconds(self) -> float:
        """Seconds spent scoring since the last call: set against the time the trainer waited for the
        results, it says how much the overlap with sampling saved."""
        with self._busy_lock:
            busy, self._busy_s = self._busy_s, 0.0
        return busy

    def submit(self, images: Any, prompts: Sequence[str], meta: Meta) -> concurrent.futures.Future:
        """Score in the background; the caller must not modify the arrays until the future is done."""
        return self._batches.submit(self, images, list(prompts), dict(meta))

    def close(self) -> None:
        self._batches.shutdown(wait=True)
        self._parts.shutdown(wait=True)


def build_calculator(specs: Mapping[str, Mapping[str, Any]], max_pending: int = 2) -> RewardCalculator:
    """From config: {name: {"reward": registry name (default: name), "weight": w, "config": {...}}}."""
    rewards, weights = {}, {}
    for name, spec in specs.items():
        unknown = sorted(set(spec) - {"reward", "weight", "config"})
        if unknown or "weight" not in spec:
            raise ValueError(f"calculator: spec {name!r} needs 'weight' and may have 'reward', 'config'; got keys {sorted(spec)}")
        rewards[name] = get_reward(spec.get("reward", name), **dict(spec.get("config", {})))
        weights[name] = float(spec["weight"])
    return RewardCalculator(rewards, weights, max_pending)


def summarize(scores: Scores) -> dict[str, float]:
    """Batch means of every entry over valid samples, for the training log."""
    valid = scores["valid"] > 0
    return {name: float(np.mean(value[valid])) if valid.any() else float("nan") for name, value in scores.items()}
