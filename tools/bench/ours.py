"""Our side: the library's jitted rollout and update programs (jax_inpaint_rl/programs.py), built and fed
as the trainer (jax_inpaint_rl/trainer/) builds and feeds them, on random weights created on the device."""
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl import algorithms, programs
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.algorithms.base import Policy, rollout_program
from jax_inpaint_rl.trainer.run import initial_state
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models import random_init
from tools.bench import measure
from tools.bench.models import Model


def _random_leaf(key, name: str, shape, dtype):
    """The library's random-weight rule (models/random_init.py), drawn with jax.random on the device."""
    if name in random_init.CONSTANT_LEAVES:
        return jnp.full(shape, random_init.CONSTANT_LEAVES[name], dtype)
    return (jax.random.normal(key, shape, jnp.float32) * random_init.leaf_std(name, tuple(shape))).astype(dtype)


def device_random_params(shapes, dtype, device) -> Callable[[int], Any]:
    """seed -> random weights, made by one jitted program (compiled once) straight into device memory: a 12B
    tree never touches the host. RngBitGenerator keys ('rbg') keep the compile short for hundreds of tensors."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    def build(key):
        keys = jax.random.split(key, len(with_paths))
        return treedef.unflatten([_random_leaf(k, path[-1].key, leaf.shape, dtype)
                                  for k, (path, leaf) in zip(keys, with_paths)])

    jitted = jax.jit(build, out_shardings=jax.sharding.SingleDeviceSharding(device))
    return lambda seed: jitted(jax.random.key(seed, impl="rbg"))


def params_builder(model: Model, dtype, device) -> Callable[[int], Any]:
    """seed -> denoiser weights on `device`. Tiny: the library's host-side builder; full: made on the device."""
    if model.host_params is not None:
        return lambda seed: jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, dtype), model.host_params(seed)),
                                           device)
    return device_random_params(model.param_shapes(), dtype, device)


def make_policy(model: Model, config, latent_shape) -> Policy:
    s = config.sample
    return programs.make_policy(model.family, model.family.schedule(s.num_steps, latent_shape),
                                Sampler(s.sampler, s.noise_level), s.guidance_scale)


def compile_program(jitted, *args):
    """(compiled, seconds to trace + lower + compile, jaxpr) for these argument shapes."""
    start = time.perf_counter()
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
    return compiled, time.perf_counter() - start, traced.jaxpr


def measure_rollout(policy, config, denoiser, cond, x_init, key, window, repeats: int):
    """Timings of the whole N-step rollout program (one lax.scan) and its samples."""
    merge, base, trainable = trainable_lib.build(config.train, denoiser, jax.random.fold_in(key, 1))
    args = (base, trainable, cond, {"noise": x_init}, key, window)
    compiled, compile_s, _ = compile_program(rollout_program(policy, merge), *args)
    timings, (samples, _) = measure.timed_runs(lambda: compiled(*args), jax.block_until_ready, repeats,
                                               "ours rollout")
    return {"compile_s": compile_s, **timings, "images_per_s": x_init.shape[0] / timings["median_s"]}, samples


def update_micro_batch(algorithm, samples, cond, advantages, window, key):
    """The first micro-batch the algorithm's own `micro_batches` makes of this rollout (one trained step per
    sample: the bench config sets timestep_mode 'one' and minibatch_size = the batch)."""
    collected = {"samples": samples, "cond": cond, "advantages": advantages,
                 "keep": jnp.ones(advantages.shape, bool), "train_window": np.asarray(window)}
    return algorithm.micro_batches(collected, key)[0][0]


def measure_update(algorithm, config, policy, denoiser, micro_batch, key, repeats: int) -> dict:
    """Timings and FLOPs of one optimizer step: programs.make_accumulate on one micro-batch, then make_apply,
    as trainer/update.py runs them at the end of an accumulation window."""
    merge, base, trainable = trainable_lib.build(config.train, denoiser, jax.random.fold_in(key, 1))
    optimizer = programs.make_optimizer(config.train)
    state = initial_state(trainable, optimizer, algorithm.slots, False, jax.random.fold_in(key, 2))  # donated
    state_sharding = jax.tree.map(lambda a: a.sharding, state)
    batch, steps = micro_batch
    accumulate, accumulate_s, accumulate_jaxpr = compile_program(
        programs.make_accumulate(policy, algorithm.objective, merge, state_sharding), state, base, batch, steps, key)
    apply, apply_s, apply_jaxpr = compile_program(
        programs.make_apply(optimizer, config.ema, algorithm.after_step, state_sharding), state)
    carried = {"state": state}

    def step():
        carried["state"], _ = accumulate(carried["state"], base, batch, steps, key)  # both programs donate it
        carried["state"] = apply(carried["state"])
        return carried["state"]

    timings, _ = measure.timed_runs(step, jax.block_until_ready, repeats, f"ours {algorithm.name} update")
    return {"compile_s": accumulate_s + apply_s, **timings,
            "trained_params": sum(leaf.size for leaf in jax.tree.leaves(trainable)),
            **measure.program_flops([(accumulate, accumulate_jaxpr), (apply, apply_jaxpr)])}


def out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def guarded(phase):
    """Run a phase; an out-of-memory failure becomes the phase's result instead of ending the run."""
    try:
        return phase()
    except jax.errors.JaxRuntimeError as error:
        if not out_of_memory(error):
            raise
        return {"error": f"out of memory: {str(error).splitlines()[0][:300]}"}


def run(model: Model, configs: dict, inputs: dict, args, device) -> dict:
    """Rollout, then one update per method in `configs` ({'grpo': config, 'nft': config}); fresh weights
    for each phase since the update donates them."""
    rollout_config = configs["grpo"]
    latent_shape = inputs["x_init"].shape[1:]
    policy = make_policy(model, rollout_config, latent_shape)
    put = functools.partial(jax.device_put, device=device)
    cond, x_init, advantages = put(inputs["cond"]), put(inputs["x_init"]), put(inputs["advantages"])
    key = jax.random.key(args.seed)
    window = put(rollout_lib.sde_window(rollout_config.sample.num_steps))
    build_params = params_builder(model, args.dtype, device)
    fresh_params = functools.partial(build_params, args.seed)  # each phase its own: updates donate them
    results, trajectory = {}, None

    def rollout_phase():
        nonlocal trajectory
        measured, trajectory = measure_rollout(policy, rollout_config, fresh_params(), cond, x_init, key, window,
                                               args.repeats)
        return measured

    def update_phase(method, config):
        algorithm = algorithms.make(method, config)
        micro_batch = update_micro_batch(algorithm, trajectory, cond, advantages, window, key)
        return measure_update(algorithm, config, make_policy(model, config, latent_shape), fresh_params(),
                              micro_batch, key, args.repeats)

    results["rollout"] = guarded(rollout_phase)
    for method, config in configs.items():
        results[f"update_{method}"] = (guarded(functools.partial(update_phase, method, config))
                                       if trajectory is not None else {"error": "no rollout to train on"})
    results["memory"] = measure.jax_peak_memory(device)
    return results
