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

from jax_inpaint_rl.checkpoint.export import CONFIG_FILE, holds_denoiser, read_denoiser, read_trees
from jax_inpaint_rl.data import loaders_from_config
from jax_inpaint_rl.diffusion.steps import STEP_FUNCTIONS, STEP_PREDICTIONS
from jax_inpaint_rl.models import family as family_lib
from jax_inpaint_rl.models.layers import attention
from jax_inpaint_rl.rewards.calculator import RewardCalculator, build_calculator

FLOAT16_REFUSED = ("model.compute_dtype='float16': float16 overflows in the denoisers' activations and the "
                   "SDE log-probs without dynamic loss scaling, which this trainer does not do; use 'bfloat16' "
                   "(the same memory and speed on GPUs and TPUs, with float32's exponent range)")
DATA_FORMATS = ("synthetic", "self_bench", "json", "jsonl", "txt", "tfds", "flow_grpo")


def one_of(*values):
    return lambda v: v in values, f"one of {list(values)}"


def at_least(low):
    return lambda v: v >= low, f">= {low}"


def positive():
    return lambda v: v > 0, "> 0"


def mesh_axis():
    return lambda v: v == -1 or v >= 1, "-1 (the remaining devices) or >= 1"


# every config field with a known set or range: (field, (check, what is expected))
FIELD_RULES = (
    ("model.compute_dtype", one_of("float32", "bfloat16")),
    ("model.param_dtype", one_of("float32", "bfloat16")),
    ("model.attention", one_of(*attention.IMPLEMENTATIONS)),
    ("data.format", one_of(*DATA_FORMATS)),
    ("data.resolution", at_least(8)),
    ("data.num_examples", at_least(1)),
    ("data.num_eval_examples", at_least(1)),
    ("sample.num_steps", at_least(1)),
    ("sample.eval_num_steps", at_least(1)),
    ("sample.guidance_scale", at_least(0.0)),
    ("sample.sampler", one_of(*STEP_FUNCTIONS)),
    ("sample.noise_level", at_least(0.0)),
    ("sample.strength", (lambda v: 0 < v <= 1, "in (0, 1]")),
    ("sample.window_size", at_least(0)),
    ("sample.window_max_start", at_least(0)),
    ("sample.images_per_prompt", at_least(1)),
    ("sample.prompts_per_batch", at_least(1)),
    ("sample.batches_per_epoch", at_least(1)),
    ("train.num_epochs", at_least(0)),
    ("train.max_train_steps", at_least(0)),
    ("train.autoencoder_steps", at_least(0)),
    ("train.autoencoder_learning_rate", positive()),
    ("train.warmup_steps", at_least(0)),
    ("train.learning_rate", positive()),
    ("train.weight_decay", at_least(0.0)),
    ("train.max_grad_norm", positive()),
    ("train.minibatch_size", at_least(1)),
    ("train.gradient_accumulation_steps", at_least(1)),
    ("train.inner_epochs", at_least(1)),
    ("train.timestep_fraction", (lambda v: 0 < v <= 1, "in (0, 1]")),
    ("train.timestep_mode", one_of("first", "shuffle", "one")),
    ("train.adv_clip_max", positive()),
    ("train.max_nonfinite_steps", at_least(1)),
    ("advantage.std", one_of("batch", "group", "none")),
    ("ema.decay", (lambda v: 0 <= v <= 1, "in [0, 1]")),
    ("ema.interval", at_least(1)),
    ("mesh.data", mesh_axis()),
    ("mesh.fsdp", mesh_axis()),
    ("mesh.tensor", mesh_axis()),
    ("checkpoint.interval", at_least(1)),
    ("checkpoint.keep", at_least(1)),
    ("checkpoint.resume_step", at_least(-1)),
    ("eval.interval", at_least(1)),
    ("eval.num_grid", at_least(0)),
)


def field(config, dotted: str):
    for name in dotted.split("."):
        config = config[name]
    return config


def validate(config, algorithm) -> None:
    """Reject bad values before anything is loaded or compiled: every field with a known set or range
    (FIELD_RULES), then the relations between fields; one error lists every problem."""
    if config.model.compute_dtype == "float16":
        raise ValueError(f"config: {FLOAT16_REFUSED}")
    problems = [f"{name}={field(config, name)!r}: expected {expected}" for name, (ok, expected) in FIELD_RULES
                if not ok(field(config, name))]
    s = config.sample
    if s.window_size > 0 and s.window_max_start + s.window_size > s.num_steps:
        problems.append(f"sample.window_max_start={s.window_max_start} + window_size={s.window_size} exceeds "
                        f"sample.num_steps={s.num_steps}")
    if algorithm.sampler is not None and s.images_per_prompt < 2:
        problems.append(f"sample.images_per_prompt={s.images_per_prompt}: expected >= 2 for group-relative RL")
    if problems:
        raise ValueError("config: " + "; ".join(problems))


def check_family(config, family, algorithm) -> None:
    """The sampler fits the family's parameterization (a flow step on an epsilon model is meaningless), and the
    algorithm fits the family."""
    wants = STEP_PREDICTIONS[config.sample.sampler]
    if wants != family.parameterization.name:
        raise ValueError(f"config: sample.sampler={config.sample.sampler!r} steps {wants} predictions; "
                         f"model.family={family.name!r} predicts {family.parameterization.name}")
    if config.sample.strength < 1 and family.paste_region is None:
        raise ValueError(f"config: sample.strength={config.sample.strength} starts from the noised source, which "
                         f"model.family={family.name!r} does not keep (only families that paste their source, "
                         "e.g. sd3_inpaint with a 16-channel transformer)")
    algorithm.check_family(family)


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


def build_family(config, embeddings: frozenset[str] = frozenset(), weights: bool = True):
    """(Family, params): a converted folder at model.path, or a tiny random model when model.tiny; floating
    params cast to model.param_dtype. Encoders whose outputs `embeddings` supply are not loaded. With
    `weights=False` only the configs are read and params is None (the checks before loading). Selects the
    attention kernel (model.attention) for every program traced afterwards."""
    attention.use(config.model.attention)
    build = family_lib.factory(config.model.family)
    common = dict(seed=config.seed, dtype=config.model.compute_dtype, remat=config.model.remat,
                  embeddings=embeddings, weights=weights)
    if config.model.tiny:
        family, params = build(config.model.family, path=None, **common)
    else:
        path = config.model.path
        if not path:
            raise ValueError(f"config: model.path is empty for model.family={config.model.family!r}: convert "
                             "weights with `python -m tools.convert_weights <subcommand> --src ... --dst DIR` "
                             "(README, 'Converting weights'; `--help` lists the subcommands) and pass "
                             "--config.model.path=DIR")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"config: model.path={path}: no such folder")
        family, params = build(config.model.family, path=path, **common)
    if params is None:
        return family, None
    dtype = jnp.dtype(config.model.param_dtype)
    cast = lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a  # noqa: E731
    return family, jax.tree.map(cast, params)


def build_loaders(config, style_resolution: int = 0) -> dict:
    """{'train', 'eval', 'sft'} loaders; this host's shard of every batch. SFT batches hold
    train.minibatch_size examples over all hosts (the seeds' --train_batch_size); with `style_resolution` (a
    family that reads 'style_image') batches carry the style crop at that size."""
    hosts = jax.process_count()
    if config.train.minibatch_size % hosts:
        raise ValueError(f"config: train.minibatch_size={config.train.minibatch_size} must split over {hosts} hosts")
    train, held_out, sft = loaders_from_config(
        config.data, prompts_per_batch=config.sample.prompts_per_batch,
        sft_batch_size=config.train.minibatch_size // hosts, style_resolution=style_resolution or None,
        seed=config.seed, process_index=jax.process_index(), process_count=hosts)
    if held_out is None:
        raise ValueError("config: data.eval_path is empty: a held-out set is needed for evaluation")
    return {"train": train, "eval": held_out, "sft": sft}


def build_reward(config) -> RewardCalculator:
    """The weighted reward calculator from config.reward.specs ({name: {weight, reward?, config?}})."""
    specs = config.reward.specs.to_dict() if hasattr(config.reward.specs, "to_dict") else dict(config.reward.specs)
    return build_calculator(specs)


def read_export(directory: str, use_ema: bool = False):
    """(family, params, config) of an inference export: the family rebuilt from the run's config, its
    denoiser (or EMA; kept as built when the run trained none) and any fitted components from the export."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: not an inference export (written at the end of training in "
                                "<output_dir>/export)")
    with open(config_path) as f:
        config = ConfigDict(json.load(f))
    family, params = build_family(config)
    if holds_denoiser(directory) or use_ema:
        params = {**params, family.denoiser_key: read_denoiser(directory, params[family.denoiser_key], use_ema)}
    fitted = read_trees(directory, {k: v for k, v in params.items() if k != family.denoiser_key})
    return family, {**params, **fitted}, config


def as_host(tree):
    """A tree as host NumPy arrays (offloaded components: jit sends them to the device per call)."""
    return jax.tree.map(np.asarray, tree)
