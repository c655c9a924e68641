"""Our side: the library's jitted rollout and update programs (jax_inpaint_rl/programs.py), built and fed
as jax_inpaint_rl/train.py builds and feeds them, on random weights created on the device."""
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl import programs, train
from jax_inpaint_rl.algorithms import grpo, objectives
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.steps import Sampler
from tools.bench import measure
from tools.bench.models import Model


def _random_leaf(key, name: str, shape, dtype):
    """The library's tiny-weight rule: kernels and embeddings N(0, 1 / fan_in), biases 0, norm scales 1."""
    if name == "bias":
        return jnp.zeros(shape, dtype)
    if name == "scale":
        return jnp.ones(shape, dtype)
    fan_in = shape[-2] * (shape[0] * shape[1] if len(shape) == 4 else 1) if name == "kernel" else shape[-1]
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)


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


def make_policy(model: Model, config, latent_shape) -> objectives.Policy:
    s = config.sample
    schedule = programs.make_schedule(model.family, config, s.num_steps, latent_shape)
    return programs.make_policy(model.family, config, schedule, Sampler(s.sampler, s.noise_level), s.guidance_scale)


def compile_program(jitted, *args):
    """(compiled, seconds to trace + lower + compile, jaxpr) for these argument shapes."""
    start = time.perf_counter()
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
    return compiled, time.perf_counter() - start, traced.jaxpr


def measure_rollout(policy, config, denoiser, cond, x_init, key, window, repeats: int):
    """Timings of the whole N-step rollout program (one lax.scan) and its last trajectory."""
    merge, base, trainable = trainable_lib.build(config.train, denoiser, jax.random.fold_in(key, 1))
    args = (base, trainable, cond, x_init, key, window)
    compiled, compile_s, _ = compile_program(programs.make_sample(policy, merge), *args)
    timings, trajectory = measure.timed_runs(lambda: compiled(*args), jax.block_until_ready, repeats, "ours rollout")
    return {"compile_s": compile_s, **timings, "images_per_s": x_init.shape[0] / timings["median_s"]}, trajectory


def update_batch(config, trajectory, cond, advantages, key) -> dict:
    """One minibatch as train.Run._policy_updates builds it: the whole rollout, one trained step per sample."""
    batch = advantages.shape[0]
    step_index = grpo.train_step_indices(key, batch, np.asarray(trajectory.window), config.train.timestep_fraction,
                                         config.train.timestep_mode)[:, 0]
    return {"latents": trajectory.latents, "log_probs": trajectory.log_probs, "window": trajectory.window,
            "cond": cond, "advantages": advantages, "weight": jnp.ones((batch,), jnp.float32),
            "step_index": step_index}


def measure_update(method: str, config, policy, denoiser, batch, key, repeats: int) -> dict:
    """Timings and FLOPs of one optimizer step: programs.make_accumulate on one micro-batch, then make_apply,
    as train.Run._micro_step runs them at the end of an accumulation window."""
    merge, base, trainable = trainable_lib.build(config.train, denoiser, jax.random.fold_in(key, 1))
    optimizer = programs.make_optimizer(config.train.learning_rate, config)
    state = train.initial_state(trainable, optimizer, config, jax.random.fold_in(key, 2))  # its own buffer: donated
    state_sharding = jax.tree.map(lambda a: a.sharding, state)
    objective = objectives.from_config(method, config.train)
    accumulate, accumulate_s, accumulate_jaxpr = compile_program(
        programs.make_accumulate(policy, objective, merge, state_sharding), state, base, batch, key)
    apply, apply_s, apply_jaxpr = compile_program(programs.make_apply(optimizer, config.ema, state_sharding), state)
    carried = {"state": state}

    def step():
        carried["state"], _ = accumulate(carried["state"], base, batch, key)  # both programs donate the state
        carried["state"] = apply(carried["state"])
        return carried["state"]

    timings, _ = measure.timed_runs(step, jax.block_until_ready, repeats, f"ours {method} update")
    return {"compile_s": accumulate_s + apply_s, **timings,
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
        batch = update_batch(config, trajectory, cond, advantages, key)
        policy_for_method = make_policy(model, config, latent_shape)
        return measure_update(method, config, policy_for_method, fresh_params(), batch, key, args.repeats)

    results["rollout"] = guarded(rollout_phase)
    for method, config in configs.items():
        results[f"update_{method}"] = (guarded(functools.partial(update_phase, method, config))
                                       if trajectory is not None else {"error": "no rollout to train on"})
    results["memory"] = measure.jax_peak_memory(device)
    return results
