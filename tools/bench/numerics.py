"""Numerics on the same weights: our denoiser and the torch reference's, in the bench dtype (bf16 on GPUs).

The torch denoiser is built with random weights and converted in memory to our
layout with the converters' key tables (tools/convert_weights), so both sides
run identical weights. Measured:
- one guided denoiser call: max |ours - torch| / max |torch|;
- a rollout's log-probs: our SDE rollout's transitions re-scored by the torch
  step on the torch denoiser, step by step (relative error of the log-probs);
- the on-policy ratio of each side: its own rollout re-scored by its own
  training-time computation, max |exp(logp_rescored - logp_rollout) - 1| (the
  ratio Flow-GRPO's users report drifting from 1 in bf16).
"""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

from jax_inpaint_rl.algorithms.base import rollout_program
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.models.params_io import unflatten
from jax_inpaint_rl.models.sd3.transformer import SD3Config
from tools.bench import ours, reference
from tools.bench.models import Model
from tools.convert_weights import calligrapher as calligrapher_convert
from tools.convert_weights import common
from tools.convert_weights import flux as flux_convert
from tools.convert_weights import sd3 as sd3_convert
from tools.convert_weights import sd15 as sd15_convert
from tools.convert_weights.calligrapher_torch import component_key


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor on the host as NumPy, bf16 kept as ml_dtypes.bfloat16 (NumPy has no bf16)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def placed(source: str, tensors, rules, shapes: dict, expected: dict, slot) -> dict:
    """Our flat tree {path: array} from (torch key, array) pairs through a converter's key table: `expected` is
    the table's per-layer shapes, `slot(path) -> (stacked path, row or None)` where a layer's tensor goes in
    `shapes` (the stacked tree)."""
    out = {}
    for path, array in common.convert(source, tensors, rules, expected):
        key, row = slot(path)
        if row is None:
            out[key] = array
        else:
            out.setdefault(key, np.zeros(shapes[key], array.dtype))[row] = array
    return out


def _stacked(source: str, tensors, rules, tree, stacks: tuple[str, ...]) -> dict:
    """`placed` for layers stacked per named scan (Flux's blocks, the adapter's ip kernels; () for none)."""
    shapes = flux_convert.shapes_of(tree)
    return placed(source, tensors, rules, shapes, flux_convert.per_layer_shapes(shapes, stacks),
                  functools.partial(flux_convert.split_layer, stacks=stacks))


def sd15_weights(model: Model, tensors) -> dict:
    return _stacked("torch sd15_inpaint", tensors, sd15_convert.rules_for("unet", model.denoiser_config),
                    model.param_shapes(), ())


def flux_weights(model: Model, tensors) -> dict:
    return _stacked("torch flux_fill", tensors, flux_convert.TRANSFORMER_RULES, model.param_shapes(),
                    flux_convert.TRANSFORMER_STACKS)


def sd3_weights(model: Model, tensors) -> dict:
    """Blocks into their run's stack; the position table is a buffer our model builds itself."""
    config = SD3Config.from_diffusers(model.denoiser_config)
    shapes = flux_convert.shapes_of(model.param_shapes())
    return placed("torch sd3", ((k, v) for k, v in tensors if k != sd3_convert.POSITION_TABLE),
                  sd3_convert.TRANSFORMER_RULES, shapes, sd3_convert.per_block_shapes(shapes, config),
                  functools.partial(sd3_convert.block_slot, slots=sd3_convert.block_slots(config)))


CALLIGRAPHER_TABLES = {  # component -> (key table, stacked layers), as the converters write each
    "transformer": (flux_convert.TRANSFORMER_RULES, flux_convert.TRANSFORMER_STACKS),
    "image_proj": (calligrapher_convert.IMAGE_PROJ_RULES, ()),
    "ip_attention": (calligrapher_convert.IP_RULES, calligrapher_convert.IP_STACKS),
}


def calligrapher_weights(model: Model, tensors) -> dict:
    """Each CalligrapherDenoiser tensor to its component under the converters' names, then their key tables."""
    parts = {name: [] for name in CALLIGRAPHER_TABLES}
    for key, value in tensors:
        component, canonical = component_key(key)
        parts[component].append((canonical, value))
    shapes = model.param_shapes()
    out = {}
    for name, (rules, stacks) in CALLIGRAPHER_TABLES.items():
        out.update({f"{name}/{path}": array for path, array in
                    _stacked(f"torch calligrapher {name}", parts[name], rules, shapes[name], stacks).items()})
    return out


WEIGHTS = {"sd15_inpaint": sd15_weights, "flux_fill": flux_weights, "sd3": sd3_weights,
           "calligrapher": calligrapher_weights}


def torch_to_ours(model: Model, net: torch.nn.Module) -> dict:
    """The torch denoiser's weights as our parameter tree (host NumPy), through the converters' key tables."""
    tensors = ((name, numpy_of(value)) for name, value in net.state_dict().items())
    return unflatten(WEIGHTS[model.name](model, tensors))


def to_torch_layout(model: Model, array) -> np.ndarray:
    """Our latent layout -> the reference's (Flux tokens (B, L, 64), NCHW for the UNet and SD3), float32."""
    return reference.FAMILIES[model.name].layout(np.asarray(array, np.float32))


def relative_error(ours_value, theirs) -> float:
    ours_value, theirs = np.asarray(ours_value, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours_value - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def measure(model: Model, config, inputs: dict, args, jax_device, torch_device: str) -> dict:
    """The three numbers of the module docstring, for `config`'s sampler and guidance."""
    s, dtype = config.sample, reference.TORCH_DTYPES[args.dtype]
    device = torch.device(torch_device)
    torch.manual_seed(args.seed)
    net = reference.build_denoiser(model, dtype, device, args.seed, remat=False)
    params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, args.dtype), torch_to_ours(model, net)),
                            jax_device)
    latent_shape = inputs["x_init"].shape[1:]
    policy = ours.make_policy(model, config, latent_shape)
    schedule = policy.schedule
    cond, x_init = jax.device_put(inputs["cond"], jax_device), jax.device_put(inputs["x_init"], jax_device)
    side = reference.FAMILIES[model.name]
    x_torch, cond_torch = side.inputs(inputs, dtype, device, s.guidance_scale)
    denoise = lambda net_, x, t: side.guided(net_, x, t, cond_torch, s.guidance_scale)  # noqa: E731
    tables = reference.coefficient_tables(schedule, device)
    step = lambda *a, **k: reference.STEPS[s.sampler](*a, noise_level=s.noise_level, **k)  # noqa: E731
    batch = x_init.shape[0]

    t0 = jnp.full((batch,), schedule["model_t"][0])
    ours_call = jax.jit(policy.guided)(params, x_init, t0, cond)
    with torch.no_grad():
        theirs_call = denoise(net, x_torch, tables["model_t"][torch.zeros(batch, dtype=torch.long, device=device)])
    call_error = relative_error(to_torch_layout(model, ours_call), numpy_of(theirs_call))

    window = jnp.ones(s.num_steps, jnp.float32)
    samples, _ = rollout_program(policy, lambda base, denoiser: denoiser)({}, params, cond, {"noise": x_init},
                                                                       jax.random.key(args.seed), window)
    latents, log_probs = np.asarray(samples["latents"], np.float32), np.asarray(samples["log_probs"], np.float32)
    rescore = jax.jit(lambda p, x, x_next, j: rollout_lib.score_transitions(
        policy.guided, p, cond, x, x_next, j, schedule, policy.sampler, window).log_prob)
    ours_rescored, torch_scored = [], []
    with torch.no_grad():
        for j in range(s.num_steps):
            index = jnp.full((batch,), j)
            ours_rescored.append(np.asarray(rescore(params, samples["latents"][:, j], samples["latents"][:, j + 1],
                                                    index)))
            x, x_next = (torch.from_numpy(np.array(to_torch_layout(model, latents[:, k]))).to(device)
                         for k in (j, j + 1))
            torch_index = torch.full((batch,), j, device=device)
            _, log_prob = step(denoise(net, x.to(dtype), tables["model_t"][torch_index]), x, tables, torch_index,
                               next_sample=x_next)
            torch_scored.append(numpy_of(log_prob.float()))
    torch_scored = np.stack(torch_scored, axis=1)
    ours_ratio = np.exp(np.stack(ours_rescored, axis=1) - log_probs)
    theirs_rescored = []  # torch's on-policy ratio: its own rollout re-scored step by step
    with torch.no_grad():
        latents_torch, logp_torch = reference.rollout(denoise, net, x_torch, tables, step, s.num_steps)
        for j in range(s.num_steps):
            torch_index = torch.full((batch,), j, device=device)
            _, log_prob = step(denoise(net, latents_torch[:, j], tables["model_t"][torch_index]), latents_torch[:, j],
                               tables, torch_index, next_sample=latents_torch[:, j + 1])
            theirs_rescored.append(numpy_of(log_prob.float()))
    theirs_ratio = np.exp(np.stack(theirs_rescored, axis=1) - numpy_of(logp_torch.float()))
    del net
    return {"dtype": args.dtype, "steps": s.num_steps, "batch": batch,
            "denoiser_call_relative_error": call_error,
            "rollout_log_prob_relative_error": relative_error(log_probs, torch_scored),
            "rollout_log_prob_max_abs_error": float(np.abs(log_probs - torch_scored).max()),
            "first_ratio_deviation": {"ours": float(np.abs(ours_ratio - 1).max()),
                                      "torch": float(np.abs(theirs_ratio - 1).max())}}
