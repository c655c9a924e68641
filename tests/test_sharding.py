"""A batch sharded over the `data` axis of 8 CPU devices gives the single-device loss and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inpaint_rl.algorithms import grpo
from jax_inpaint_rl.diffusion import rollout as rollout_lib, schedules, steps
from jax_inpaint_rl.parallel import mesh as mesh_lib
from tests import toy_policy


def _grpo_loss(params, cond, traj, step_index, advantages, schedule, sampler):
    x, x_next, old = rollout_lib.gather_steps(traj, step_index)
    scored = rollout_lib.score_transitions(toy_policy.denoise, params, cond, x, x_next, step_index, schedule,
                                           sampler, traj.window)
    return grpo.grpo_loss(scored.log_prob, old + 0.01, advantages, clip_range=0.2, kl_beta=0.1, mean=scored.mean,
                          ref_mean=jnp.zeros_like(scored.mean), std=scored.std).loss


def test_sharded_loss_and_gradient_equal_single_device():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    batch = 16
    schedule, sampler = schedules.sd3_schedule(4), steps.Sampler("flow_grpo", 0.7)
    params = toy_policy.init_params(jax.random.key(0))
    cond = toy_policy.make_cond(jax.random.key(1), batch)
    x_init = rollout_lib.initial_noise(jax.random.key(2), batch // 4, 4, toy_policy.LATENT_SHAPE)
    traj = jax.jit(lambda p, c, x: rollout_lib.rollout(toy_policy.denoise, p, c, x, schedule, sampler,
                                                       jax.random.key(3)))(params, cond, x_init)
    step_index = jnp.arange(batch) % 4
    advantages = jnp.linspace(-2, 2, batch)
    loss_and_grad = jax.value_and_grad(
        lambda p, c, tr, s, a: _grpo_loss(p, c, tr, s, a, schedule, sampler))
    single = jax.jit(loss_and_grad)(params, cond, traj, step_index, advantages)

    mesh = mesh_lib.make_mesh({"data": -1})
    shard, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    put = lambda tree, s: jax.device_put(tree, s)  # noqa: E731
    traj_sharded = traj._replace(model_t=put(traj.model_t, rep), window=put(traj.window, rep))
    traj_sharded = traj_sharded._replace(**{f: put(getattr(traj, f), shard)
                                            for f in ("latents", "log_probs", "means", "stds")})
    args = (put(params, rep), put(cond, shard), traj_sharded, put(step_index, shard), put(advantages, shard))
    assert len(args[4].sharding.device_set) == 8
    sharded = jax.jit(loss_and_grad, out_shardings=rep)(*args)
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mesh_from_config_and_errors():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh_lib.data_parallel_size(mesh) == 8
    with pytest.raises(ValueError, match="needs 12 devices"):
        mesh_lib.make_mesh({"data": 3, "tensor": 4})
    with pytest.raises(ValueError, match="unknown"):
        mesh_lib.make_mesh({"model": 8})
