"""Rewards: OCR, VLM judge, CLIP score, inpainting scores, remote rewards (GenEval among them), and the
calculator.

`get_reward(name, **config)` builds a reward from the registry. Built-ins are
imported on first use, so serving the OCR reward never imports jax and the
trainer never imports onnxruntime unless it asks for OCR. Add your own with

    @register("my_reward")
    def make_my_reward(**config) -> Reward: ...
"""
import importlib

from jax_inpaint_rl.rewards.base import Reward, RewardError, RewardFactory  # noqa: F401

# name -> "module:factory", imported lazily by get_reward
_BUILTIN = {
    "ocr": "jax_inpaint_rl.rewards.ocr:make_ocr_reward",
    "vlm": "jax_inpaint_rl.rewards.vlm:make_vlm_reward",
    "clip_score": "jax_inpaint_rl.rewards.clip_score:make_clip_score",
    "clip_head": "jax_inpaint_rl.rewards.clip_score:make_clip_head",
    "preservation": "jax_inpaint_rl.rewards.inpaint_scores:make_preservation",
    "reference_similarity": "jax_inpaint_rl.rewards.inpaint_scores:make_reference_similarity",
    "seam": "jax_inpaint_rl.rewards.inpaint_scores:make_seam",
    "shape_fill": "jax_inpaint_rl.rewards.shape_fill:make_shape_fill",
    "region": "jax_inpaint_rl.rewards.inpaint_scores:make_region_only",
    "remote": "jax_inpaint_rl.rewards.remote:make_remote_reward",
    "geneval": "jax_inpaint_rl.rewards.geneval:make_geneval_reward",
    "geneval_evaluator": "jax_inpaint_rl.rewards.geneval:make_geneval_evaluator",
}
_REGISTERED: dict[str, RewardFactory] = {}


def register(name: str):
    """Decorator: register a factory `(**config) -> Reward` under `name`."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        if name in _BUILTIN or name in _REGISTERED:
            raise ValueError(f"reward name {name!r} is already registered")
        _REGISTERED[name] = factory
        return factory

    return wrap


def reward_names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})


def get_factory(name: str) -> RewardFactory:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown reward {name!r}; known: {reward_names()}")
    module, attr = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def get_reward(name: str, **config) -> Reward:
    """Build the reward registered as `name` with its config (keyword arguments of its factory)."""
    return get_factory(name)(**config)
