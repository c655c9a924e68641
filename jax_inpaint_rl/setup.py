"""Build a run's pieces from its config: checks, model family, data loaders, reward, inference exports.

Every check here runs before anything is compiled, so a wrong path, name or
missing data field fails in seconds with a message that names it.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jax_inpaint_rl.checkpoint.export import CONFIG_FILE, read_denoiser, read_trees
from jax_inpaint_rl.data import loaders_from_config
from jax_inpaint_rl.diffusion.steps import STEP_FUNCTIONS, STEP_PREDICTIONS
from jax_inpaint_rl.models import family as family_lib
from jax_inpaint_rl.rewards.calculator import RewardCalculator, build_calculator

ADVANTAGE_STD = ("batch", "group", "none")
COMPUTE_DTYPES = ("float32", "bfloat16")
FLOAT16_REFUSED = ("model.compute_dtype='float16': float16 overflows in the denoisers' activations and the "
                   "SDE log-probs without dynamic loss scaling, which this trainer does not do; use 'bfloat16' "
                   "(the same memory and speed on GPUs and TPUs, with float32's exponent range)")


def validate(config, algorithm) -> None:
    """Reject bad values before anything is loaded or compiled."""
    s, t = config.sample, config.train
    checks = [
        (s.sampler in STEP_FUNCTIONS, f"sample.sampler={s.sampler!r}: expected one of {sorted(STEP_FUNCTIONS)}"),
        (config.model.compute_dtype != "float16", FLOAT16_REFUSED),
        (config.model.compute_dtype in COMPUTE_DTYPES,
         f"model.compute_dtype={config.model.compute_dtype!r}: expected one of {COMPUTE_DTYPES}"),
        (config.model.param_dtype in COMPUTE_DTYPES,
         f"model.param_dtype={config.model.param_dtype!r}: expected one of {COMPUTE_DTYPES}"),
        (s.images_per_prompt >= 1, "sample.images_per_prompt must be >= 1"),
        (t.minibatch_size >= 1, "train.minibatch_size must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
        (0 < t.timestep_fraction <= 1, "train.timestep_fraction must be in (0, 1]"),
        (config.advantage.std in ADVANTAGE_STD, f"advantage.std: expected one of {ADVANTAGE_STD}"),
        (s.window_size <= 0 or s.window_max_start + s.window_size <= s.num_steps,
         f"sample.window_max_start={s.window_max_start} + window_size={s.window_size} exceeds "
         f"sample.num_steps={s.num_steps}"),
        (config.checkpoint.interval >= 1, "checkpoint.interval (optimizer steps between saves) must be >= 1"),
    ]
    if algorithm.sampler is not None:
        checks.append((s.images_per_prompt >= 2, "sample.images_per_prompt must be >= 2 for group-relative RL"))
    for ok, message in checks:
        if not ok:
            raise ValueError(f"config: {message}")


def check_family(config, family) -> None:
    """The sampler fits the family's parameterization (a flow step on an epsilon model is meaningless)."""
    wants = STEP_PREDICTIONS[config.sample.sampler]
    if wants != family.parameterization.name:
        raise ValueError(f"config: sample.sampler={config.sample.sampler!r} steps {wants} predictions; "
                         f"model.family={family.name!r} predicts {family.parameterization.name}")
    if config.grpo.kl_mode == "flow_grpo" and config.grpo.kl_beta > 0 and family.parameterization.name != "velocity":
        raise ValueError("config: grpo.kl_mode='flow_grpo' divides by the flow SDE's sigma_t^2; "
                         f"{family.name} is an epsilon model: use kl_mode='exact'")


def data_requirements(config, family, algorithm) -> list[tuple[str, str, str]]:
    """(loader, example field, who needs it) for this family, algorithm and config."""
    reads = [(field, f"model.family={family.name!r} reads it") for field in ("prompt", *family.inputs)]
    requirements = [(phase, field, why) for phase in ("train", "eval") for field, why in reads]
    learns_from_data = algorithm.sampler is None or config.train.warmup_steps > 0
    if learns_from_data:
        requirements += [("sft", field, why) for field, why in reads]
    if config.train.warmup_steps > 0:
        requirements.append(("sft", "target", "the SFT warm-up (train.warmup_steps > 0) learns toward it"))
    requirements += [("train" if algorithm.sampler else "sft", field, f"train.method={algorithm.name!r} needs it")
                     for field in algorithm.needs]
    if config.train.autoencoder_steps > 0:
        requirements.append(("train", "image", "the autoencoder fit (train.autoencoder_steps > 0) reconstructs it"))
    return requirements


def check_data(config, family, algorithm, loaders: dict) -> None:
    """Every loader provides what the family reads and the algorithm needs; precomputed embeddings are ones
    the family takes. One error lists every missing field and who needs it."""
    problems = []
    for phase, field, why in data_requirements(config, family, algorithm):
        loader = loaders[phase]
        if field not in loader.fields:
            problems.append(f"{phase} data {getattr(loader, 'name', '')}: no '{field}' in every example "
                            f"(it has {sorted(loader.fields)}); {why}")
    for phase, loader in loaders.items():
        given = {field.split(":", 1)[1] for field in loader.fields if field.startswith("embedding:")}
        if given - set(family.text_embeddings):
            problems.append(f"{phase} data: precomputed embeddings {sorted(given - set(family.text_embeddings))} "
                            f"are not inputs of model.family={family.name!r} (it takes "
                            f"{sorted(family.text_embeddings) or 'none'})")
    if problems:
        raise ValueError("data does not fit the run:\n  " + "\n  ".join(dict.fromkeys(problems)))


def precomputed_embeddings(loaders: dict) -> frozenset[str]:
    """Embedding names every example of every loader supplies (their encoders need not be loaded)."""
    sets = [{f.split(":", 1)[1] for f in loader.fields if f.startswith("embedding:")} for loader in loaders.values()]
    return frozenset(set.intersection(*sets))


def build_family(config, embeddings: frozenset[str] = frozenset()):
    """(Family, params): a converted folder at model.path, or a tiny random model when model.tiny; floating
    params cast to model.param_dtype. Encoders whose outputs `embeddings` supply are not loaded."""
    build = family_lib.factory(config.model.family)
    common = dict(seed=config.seed, dtype=config.model.compute_dtype, remat=config.model.remat,
                  embeddings=embeddings)
    if config.model.tiny:
        family, params = build(config.model.family, path=None, **common)
    else:
        path = config.model.path
        if not path:
            raise ValueError("config: model.path is empty: convert weights with `python -m tools.convert_weights "
                             f"{config.model.family.replace('_', '-')} --src ... --dst DIR` and pass "
                             "--config.model.path=DIR")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"config: model.path={path}: no such folder")
        family, params = build(config.model.family, path=path, **common)
    dtype = jnp.dtype(config.model.param_dtype)
    cast = lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a  # noqa: E731
    return family, jax.tree.map(cast, params)


def build_loaders(config) -> dict:
    """{'train', 'eval', 'sft'} loaders; this host's shard of every batch. SFT batches hold
    train.minibatch_size examples over all hosts (the seeds' --train_batch_size)."""
    hosts = jax.process_count()
    if config.train.minibatch_size % hosts:
        raise ValueError(f"config: train.minibatch_size={config.train.minibatch_size} must split over {hosts} hosts")
    train, held_out, sft = loaders_from_config(
        config.data, prompts_per_batch=config.sample.prompts_per_batch,
        sft_batch_size=config.train.minibatch_size // hosts, seed=config.seed, process_index=jax.process_index(),
        process_count=hosts)
    if held_out is None:
        raise ValueError("config: data.eval_path is empty: a held-out set is needed for evaluation")
    return {"train": train, "eval": held_out, "sft": sft}


def build_reward(config) -> RewardCalculator:
    """The weighted reward calculator from config.reward.specs ({name: {weight, reward?, config?}})."""
    specs = config.reward.specs.to_dict() if hasattr(config.reward.specs, "to_dict") else dict(config.reward.specs)
    return build_calculator(specs)


def read_export(directory: str, use_ema: bool = False):
    """(family, params, config) of an inference export: the family rebuilt from the run's config, its
    denoiser (or EMA) and any fitted components from the export."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: not an inference export (written at the end of training in "
                                "<output_dir>/export)")
    with open(config_path) as f:
        config = ConfigDict(json.load(f))
    family, params = build_family(config)
    params = {**params, family.denoiser_key: read_denoiser(directory, params[family.denoiser_key], use_ema)}
    fitted = read_trees(directory, {k: v for k, v in params.items() if k != family.denoiser_key})
    return family, {**params, **fitted}, config


def as_host(tree):
    """A tree as host NumPy arrays (offloaded components: jit sends them to the device per call)."""
    return jax.tree.map(np.asarray, tree)
