"""Device memory of the LoRA-GRPO update and the rollout, from the compiler alone: every argument a
`jax.ShapeDtypeStruct`, nothing allocated, so it runs anywhere (a CPU estimate of a GPU's needs).

`compiled.memory_analysis()` gives the bytes of the arguments (parameters, train state, batch), the outputs
and the temporaries (activations, gradients) of each program; the peak of a step is about arguments +
temporaries (outputs alias the donated state). `group_size_fit` turns two such estimates into the largest
micro-batch that fits a given capacity, assuming memory linear in the batch.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jax_inpaint_rl import algorithms, programs
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.algorithms.base import rollout_program
from jax_inpaint_rl.trainer.run import initial_state
from tools.bench import ours
from tools.bench.models import Model


def _abstract(tree, dtype=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), dtype or np.asarray(a).dtype), tree)


def _bytes(compiled) -> dict:
    analysis = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    out = {field: int(getattr(analysis, field, 0) or 0) for field in fields}
    out["peak_estimate_bytes"] = out["argument_size_in_bytes"] + out["temp_size_in_bytes"]
    return out


def estimate(model: Model, config, batch: int, resolution: int, dtype: str) -> dict:
    """{'rollout': bytes, 'update_grpo': bytes} of `config` (its trainable: LoRA or full) at `batch`."""
    rng = np.random.default_rng(0)
    latent_shape = model.family.latent_shape(resolution, resolution)
    cond = _abstract(model.conditioning(rng, batch), jnp.dtype(dtype))
    noise = jax.ShapeDtypeStruct((batch, *latent_shape), jnp.float32)
    denoiser = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), model.param_shapes())
    spec = trainable_lib.from_config(config.train)
    merge = lambda b, t: trainable_lib.merge(spec, b, t)  # noqa: E731
    base = jax.eval_shape(lambda p: trainable_lib.frozen_base(spec, p), denoiser)
    trainable = jax.eval_shape(lambda p: trainable_lib.init(spec, p, jax.random.key(0)), denoiser)
    policy = ours.make_policy(model, config, latent_shape)
    window = jax.ShapeDtypeStruct((config.sample.num_steps,), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    rollout = rollout_program(policy, merge).lower(base, trainable, cond, {"noise": noise}, key, window).compile()
    algorithm = algorithms.make("grpo", config)
    optimizer = programs.make_optimizer(config.train)
    state = jax.eval_shape(lambda t: initial_state(t, optimizer, algorithm.slots, False, jax.random.key(0)),
                           trainable)
    micro_batch = {"cond": cond, "advantages": jax.ShapeDtypeStruct((batch,), jnp.float32),
                   "weight": jax.ShapeDtypeStruct((batch,), jnp.float32), "window": window}
    one_step = {"x": jax.ShapeDtypeStruct((batch, 1, *latent_shape), jnp.float32),
                "x_next": jax.ShapeDtypeStruct((batch, 1, *latent_shape), jnp.float32),
                "old_log_prob": jax.ShapeDtypeStruct((batch, 1), jnp.float32),
                "step_index": jax.ShapeDtypeStruct((batch, 1), jnp.int32)}
    accumulate = programs.make_accumulate(policy, algorithm.objective, merge).lower(
        state, base, micro_batch, one_step, key).compile()
    apply = programs.make_apply(optimizer, config.ema, algorithm.after_step).lower(state).compile()
    update = _bytes(accumulate)
    update["apply_temp_size_in_bytes"] = _bytes(apply)["temp_size_in_bytes"]
    return {"batch": batch, "rollout": _bytes(rollout), "update_grpo": update}


def group_size_fit(small: dict, large: dict, capacity_bytes: int) -> int:
    """The largest batch whose linear-in-batch peak estimate fits `capacity_bytes`."""
    per_sample = (large["update_grpo"]["peak_estimate_bytes"] - small["update_grpo"]["peak_estimate_bytes"]) / (
        large["batch"] - small["batch"])
    fixed = small["update_grpo"]["peak_estimate_bytes"] - per_sample * small["batch"]
    return int((capacity_bytes - fixed) // per_sample) if per_sample > 0 else 0
