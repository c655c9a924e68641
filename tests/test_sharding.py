"""A batch sharded over the `data` axis of 8 CPU devices gives the single-device loss and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_inpaint_rl.algorithms import grpo
from jax_inpaint_rl.diffusion import rollout as rollout_lib, schedules, steps
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.parallel import partition
from tests import toy_policy


def _grpo_loss(params, cond, traj, step_index, advantages, schedule, sampler):
    x, x_next, old = rollout_lib.gather_steps(traj, step_index)
    scored = rollout_lib.score_transitions(toy_policy.denoise, params, cond, x, x_next, step_index, schedule,
                                           sampler, traj.window)
    return grpo.grpo_loss(scored.log_prob, old + 0.01, advantages, clip_range=0.2, kl_beta=0.1, mean=scored.mean,
                          ref_mean=jnp.zeros_like(scored.mean), kl_var=scored.std**2).loss


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


def _flux_fill_shapes():
    from jax_inpaint_rl.models.flux import transformer as ft

    config = dict(in_channels=384, out_channels=64, guidance_embeds=True, num_layers=19, num_single_layers=38,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    return ft.param_shapes(ft.FluxConfig.from_diffusers(config))


def test_flux_partition_rules_split_the_full_size_transformer():
    """On the real Flux Fill shapes: tensor rules hit q/k/v (outputs) and out projections (inputs), and
    fsdp x tensor = 8 leaves each device 1/8 of the parameters (up to the replicated vectors)."""
    from jax_inpaint_rl.models.flux import family as flux

    shapes = _flux_fill_shapes()
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    specs = jax.tree_util.tree_map_with_path(
        lambda path, leaf: partition.leaf_spec(partition.path_string(path), leaf.shape, sizes, flux.TENSOR_RULES),
        shapes)
    double, single = specs["double_blocks"], specs["single_blocks"]
    assert double["attn"]["to_q"]["kernel"] == P(None, "fsdp", "tensor")  # (layers, in, out)
    assert double["attn"]["add_v_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert double["attn"]["to_out"]["kernel"] == P(None, "tensor", "fsdp")
    assert double["ff"]["net_2"]["kernel"] == P(None, "tensor", "fsdp")
    assert single["proj_mlp"]["kernel"] == P(None, "fsdp", "tensor")
    assert double["attn"]["to_q"]["bias"] == P(None, ("fsdp", "tensor"))  # no tensor rule: split 8 ways
    assert specs["x_embedder"]["kernel"] == P(None, ("fsdp", "tensor"))  # (384, 3072): the larger axis
    total = per_device = 0
    for leaf, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        names = [name for entry in spec if entry is not None for name in np.atleast_1d(entry)]
        split = np.prod([sizes[name] for name in names])
        total, per_device = total + np.prod(leaf.shape), per_device + np.prod(leaf.shape) / split
    assert per_device < 1.001 * total / 8


def test_tree_shardings_place_optimizer_state_like_its_parameters():
    import optax

    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = {"attn": {"to_q": {"kernel": jnp.zeros((8, 6)), "bias": jnp.zeros(6)}}}
    state = {"params": params, "opt": optax.adam(1e-3).init(params), "rng": jnp.zeros(2, jnp.uint32)}
    shardings = partition.tree_shardings(state, mesh, ((r"/to_q/kernel$", -1),))
    assert shardings["params"]["attn"]["to_q"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["opt"][0].mu["attn"]["to_q"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["params"]["attn"]["to_q"]["bias"].spec == P() and shardings["rng"].spec == P()
    placed = jax.device_put(state, shardings)
    assert placed["params"]["attn"]["to_q"]["kernel"].addressable_shards[0].data.shape == (4, 3)
