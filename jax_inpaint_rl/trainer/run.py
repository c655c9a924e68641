"""A training run's pieces, built once from the config: the family and algorithm values, the mesh, the
placed parameters and train state, the jitted programs, loaders, rewards and logs.

`Run` is the one mutable object of a training run (its state pytree, epoch and
history advance); the phase modules (collect, update, evaluate, checkpoints) are
functions of it.
"""
import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from jax_inpaint_rl import algorithms, programs, report, setup
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.algorithms.base import Algorithm, rollout_program
from jax_inpaint_rl.checkpoint.export import read_denoiser
from jax_inpaint_rl.checkpoint.manager import Checkpointer
from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models.family import Family
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.parallel import partition
from jax_inpaint_rl.rewards.calculator import RewardCalculator
from jax_inpaint_rl.trainer import control, output


@dataclasses.dataclass
class Programs:
    """The jitted programs of a run, built once; accumulate / apply once per algorithm (warm-up and main)."""

    encode: Callable
    encode_image: Callable
    decode: Callable
    sample: Callable | None  # the algorithm's collection program
    sample_eval: Callable  # deterministic rollout over sample.eval_num_steps
    policy: Any
    updates: dict[tuple[str, float], tuple[Callable, Callable]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    config: Any
    family: Family
    algorithm: Algorithm
    warmup: Algorithm  # SFT: the warm-up's algorithm
    mesh: Any
    loaders: dict  # 'train', 'eval', 'sft'
    rewards: RewardCalculator
    log: report.MetricLog
    checkpointer: Checkpointer
    frozen: dict  # the components the denoiser is not (VAE, text encoders); offloaded ones as host arrays
    denoiser_base: Any  # the frozen part of the denoiser (empty for full fine-tuning)
    merge: Callable  # (denoiser_base, trainable) -> denoiser params
    latent_shape: tuple[int, ...]
    state: dict
    programs: Programs
    lock: output.FolderLock | None = None
    phase: str = "autoencoder"  # where the run stands: a phase name of train.phases
    phase_step: int = 0  # steps done in that phase
    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    last_saved_step: int = 0  # the optimizer step of the last checkpoint
    stop_requested: bool = False
    resumed_from: int | None = None
    summary: dict = dataclasses.field(default_factory=dict)

    def close(self) -> None:
        """Finish pending saves, stop the reward workers, close the logs, release the output folder."""
        self.checkpointer.close()
        self.rewards.close()
        self.log.close()
        if self.lock is not None:
            self.lock.release()

    @property
    def frozen_params(self):
        """The non-trained components, with a fitted autoencoder from the state where there is one."""
        return {**self.frozen, **self.state["base"]} if "base" in self.state else self.frozen

    def next_key(self) -> jax.Array:
        """A fresh key from the state's rng (on the device: no host round trip)."""
        keys = jax.random.split(jax.random.wrap_key_data(self.state["rng"]))
        self.state = {**self.state, "rng": jax.random.key_data(keys[0])}
        return keys[1]

    def shard(self, tree):
        """Per-sample arrays split over the data axes, anything else (e.g. the (T,) window) replicated.

        Host (NumPy) arrays are this host's rows of the global batch (each host
        reads its own shard); device arrays are already global. A batch that the
        data-parallel size does not divide (an eval set may be any size) is
        replicated on a single host; training sizes are checked at start-up."""
        leaves = [leaf for leaf in jax.tree.leaves(tree) if np.ndim(leaf)]
        if not leaves:
            return jax.device_put(tree, mesh_lib.replicated(self.mesh))
        batch = max(_global_rows(leaf) for leaf in leaves)
        data_parallel = mesh_lib.data_parallel_size(self.mesh)
        if batch % data_parallel and jax.process_count() > 1:
            raise ValueError(f"a batch of {batch} rows does not split over {data_parallel} data-parallel devices; "
                             "with several hosts every batch (eval included) must")
        replicated = mesh_lib.replicated(self.mesh)
        per_sample = mesh_lib.batch_sharding(self.mesh) if batch % data_parallel == 0 else replicated

        def place(a):
            if not (np.ndim(a) and _global_rows(a) == batch):
                return jax.device_put(a, replicated)
            if isinstance(a, jax.Array):
                return jax.device_put(a, per_sample)
            return jax.make_array_from_process_local_data(per_sample, np.asarray(a))

        return jax.tree.map(place, tree)

    def updates_for(self, algorithm: Algorithm) -> tuple[Callable, Callable]:
        """(accumulate, apply) of `algorithm`'s objective, built on first use: the SFT warm-up (and the control
        arm) steps at train.warmup_learning_rate where the config sets one, the run's algorithm at
        train.learning_rate (RL fine-tuning usually wants a smaller one than SFT)."""
        train = self.config.train
        learning_rate = (train.get("warmup_learning_rate", train.learning_rate) if algorithm is self.warmup
                         else train.learning_rate)
        if (algorithm.name, learning_rate) not in self.programs.updates:
            sharding = jax.tree.map(lambda a: a.sharding, self.state)
            optimizer = programs.make_optimizer(ConfigDict({**train.to_dict(), "learning_rate": learning_rate}))
            self.programs.updates[algorithm.name, learning_rate] = (
                programs.make_accumulate(self.programs.policy, algorithm.objective, self.merge, sharding),
                programs.make_apply(optimizer, self.config.ema, algorithm.after_step, sharding))
        return self.programs.updates[algorithm.name, learning_rate]


def _global_rows(leaf) -> int:
    """Rows of the global batch: device arrays are global, host arrays one host's share."""
    rows = np.shape(leaf)[0]
    return rows if isinstance(leaf, jax.Array) else rows * jax.process_count()


def initial_state(trainable, optimizer, slots: tuple[str, ...], ema: bool, key) -> dict[str, Any]:
    """Everything a resume needs, as one pytree (the frozen base is rebuilt from the config)."""
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    state = {"params": trainable, "opt_state": optimizer.init(trainable),
             "grad_sum": jax.tree.map(jnp.zeros_like, trainable), "grad_count": jnp.zeros((), jnp.int32),
             "step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jnp.array(jax.random.key_data(key))}  # own buffer: donated
    if ema:
        state["ema"] = copy(trainable)
    for slot in slots:
        state[slot] = copy(trainable)
    return state


def _check_divisible(config, data_parallel: int) -> None:
    """Every sharded batch must split evenly over the data-parallel devices (prompts_per_batch is per host)."""
    s = config.sample
    sizes = {"train.minibatch_size": config.train.minibatch_size,
             "sample.prompts_per_batch * hosts * sample.images_per_prompt":
                 s.prompts_per_batch * jax.process_count() * s.images_per_prompt}
    for name, size in sizes.items():
        if size % data_parallel:
            raise ValueError(f"config: {name}={size} must be a multiple of the {data_parallel} data-parallel devices")


def build(config, *, family=None, params=None, loaders: dict | None = None,
          reward_fn: Callable | None = None) -> Run:
    """Check the config, the output folder and the data, load (or take) the family, place params and state,
    build the programs. Nothing is written before every check passed.

    `family` / `params`, `loaders` ({'train', 'eval'} and optionally 'sft') and
    `reward_fn` replace what the config would build (tests, notebooks)."""
    algorithm, warmup = algorithms.from_config(config), algorithms.make("sft", config)
    setup.validate(config, algorithm)
    os.makedirs(config.output_dir, exist_ok=True)
    lock = output.FolderLock(config.output_dir) if jax.process_index() == 0 else None
    try:
        checkpointer = Checkpointer(os.path.join(config.output_dir, "checkpoints"), keep=config.checkpoint.keep)
        output.check_resumable(config, checkpointer)
        checked = family if family is not None else setup.build_family(config, weights=False)[0]
        loaders = (setup.build_loaders(config, checked.style_resolution) if loaders is None
                   else {"sft": loaders["train"], **loaders})
        embeddings = setup.precomputed_embeddings(loaders)
        setup.check_family(config, checked, algorithm)
        setup.check_data(config, checked, algorithm, loaders)
        output.write_config(config)
        if family is None:
            family, params = setup.build_family(config, embeddings)
        return _assemble(config, family, params, algorithm, warmup, loaders, checkpointer, lock, reward_fn)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _assemble(config, family, params, algorithm, warmup, loaders, checkpointer, lock, reward_fn) -> Run:
    """Place the params and the initial train state on the mesh and build the programs."""
    if config.checkpoint.init_from:  # start from a previous run's export (the seeds' initial adapter path)
        params = {**params, family.denoiser_key: read_denoiser(config.checkpoint.init_from,
                                                               params[family.denoiser_key])}
    mesh = mesh_lib.make_mesh({"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor})
    _check_divisible(config, mesh_lib.data_parallel_size(mesh))
    merge, denoiser_base, trainable = trainable_lib.build(
        config.train, params[family.denoiser_key], jax.random.fold_in(jax.random.key(config.seed), 1))
    offloaded = set(family.text_encoders) if config.model.offload_text_encoders else set()

    def place(tree):
        """On the mesh, split by parameter path: fsdp / the family's tensor rules (parallel/partition.py)."""
        return jax.device_put(tree, partition.tree_shardings(tree, mesh, family.tensor_rules))

    frozen = {name: setup.as_host(value) if name in offloaded else place(value)
              for name, value in params.items() if name != family.denoiser_key}
    state = initial_state(trainable, programs.make_optimizer(config.train), algorithm.slots, config.ema.enabled,
                          jax.random.key(config.seed))
    if config.train.get("sft_control", False):  # the control arm's start, written when the warm-up ends
        state = control.with_slot(state)
    if config.train.autoencoder_steps > 0:  # the autoencoder fit's components and Adam state: part of a resume
        state["base"] = {name: value for name, value in frozen.items() if name not in offloaded}
        state["autoencoder_opt"] = autoencoder_optimizer(config.train).init(state["base"])
    resolution = config.data.resolution
    latent_shape = family.latent_shape(resolution, resolution)
    rewards = setup.build_reward(config) if reward_fn is None else RewardCalculator({"custom": reward_fn},
                                                                                      {"custom": 1.0})
    return Run(config=config, family=family, algorithm=algorithm, warmup=warmup, mesh=mesh, loaders=loaders,
               rewards=rewards, log=report.MetricLog(config.output_dir, enabled=jax.process_index() == 0),
               checkpointer=checkpointer, frozen=frozen, denoiser_base=place(denoiser_base), merge=merge,
               latent_shape=latent_shape, state=place(state), lock=lock,
               programs=build_programs(config, family, algorithm, merge, latent_shape))


def autoencoder_optimizer(train):
    """Adam for the autoencoder fit of tiny models (trainer/autoencoder.py)."""
    return optax.adam(train.autoencoder_learning_rate)


def build_programs(config, family: Family, algorithm: Algorithm, merge, latent_shape) -> Programs:
    s = config.sample
    sampler = Sampler(s.sampler, s.noise_level)

    def policy(num_steps):
        schedule = schedules.from_strength(family.schedule(num_steps, latent_shape), s.strength)
        return programs.make_policy(family, schedule, sampler, s.guidance_scale)

    train_policy = policy(s.num_steps)
    return Programs(
        encode=programs.make_encode(family), encode_image=jax.jit(family.encode_image),
        decode=programs.make_decode(family),
        sample=algorithm.sampler(train_policy, merge) if algorithm.sampler is not None else None,
        sample_eval=rollout_program(policy(s.eval_num_steps), merge), policy=train_policy)
