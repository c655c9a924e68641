"""Build a run's pieces from its config: model family, data loaders, reward.

Every check here runs before anything is compiled, so a wrong path or name fails
in seconds with a message that names it.
"""
import importlib
import os

import jax

from jax_inpaint_rl.data import loaders_from_config
from jax_inpaint_rl.rewards.calculator import RewardCalculator, build_calculator

FAMILY_MODULES = {
    "sd15_inpaint": "jax_inpaint_rl.models.sd15_inpaint",
    "flux_fill": "jax_inpaint_rl.models.flux",
    "flux_kontext": "jax_inpaint_rl.models.flux",
    "flux_dev": "jax_inpaint_rl.models.flux",
}


def build_family(config):
    """(Family, params): a converted folder at model.path, or a tiny random model when model.tiny."""
    name = config.model.family
    if name not in FAMILY_MODULES:
        raise ValueError(f"config: model.family={name!r}: expected one of {sorted(FAMILY_MODULES)}")
    module = importlib.import_module(FAMILY_MODULES[name])
    if config.model.tiny:
        return module.tiny(name=name, seed=config.seed, dtype=config.model.compute_dtype)
    path = config.model.path
    if not path:
        raise ValueError("config: model.path is empty: convert weights with `python -m tools.convert_weights "
                         f"{name.replace('_', '-')} --src ... --dst DIR` and pass --config.model.path=DIR")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config: model.path={path}: no such folder")
    return module.load(path, name=name, dtype=config.model.compute_dtype, remat=config.model.remat)


def build_loaders(config):
    """(train, held-out) loaders; this host's shard of every batch (prompts only, the trainer forms groups)."""
    train, held_out = loaders_from_config(config.data, prompts_per_batch=config.sample.prompts_per_batch,
                                          group_size=1, seed=config.seed, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    if held_out is None:
        raise ValueError("config: data.eval_path is empty: a held-out set is needed for evaluation")
    return train, held_out


def build_reward(config) -> RewardCalculator:
    """The weighted reward calculator from config.reward.specs ({name: {weight, reward?, config?}})."""
    specs = config.reward.specs.to_dict() if hasattr(config.reward.specs, "to_dict") else dict(config.reward.specs)
    return build_calculator(specs)
