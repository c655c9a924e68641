"""The PyTorch reference, written the way Flow-GRPO (DDPO for SD1.5) runs it.

Rollout: a Python loop over the steps, each a diffusers denoiser call with guidance (CFG by batch
concatenation for SD1.5 and SD3, as their pipelines do; the embedded guidance input for Flux Fill and
Calligrapher) and an SDE step with the log-prob of its transition: DDIM with eta for SD1.5, Flow-GRPO's SDE
for the flow families, in fp32. Update: the loss on one stored step per sample (PPO-clip for GRPO on the guided
call, DiffusionNFT's implicit-negative loss on the unguided one against a frozen copy), backward, grad-norm clip
and an AdamW step. Eager, or with torch.compile on the denoiser.

Each family is a `TorchFamily` (FAMILIES): how its denoiser is built and called, and its inputs in the layout
the diffusers model takes. The per-step coefficient tables are the library's host-computed schedule
(tests/test_diffusion.py proves it equal to diffusers' schedulers); everything that runs per step is written
here.
"""
import copy
import dataclasses
import functools
import gc
import math
from typing import Callable

import numpy as np
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.sd3 import family as sd3
from tools.bench import measure
from tools.bench.models import Model
from tools.convert_weights.calligrapher_torch import CalligrapherDenoiser

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --- the denoiser: built on the device, random ----------------------------------------------------------

def randomize_(net: torch.nn.Module, seed: int) -> None:
    """Biases 0, 1-D weights (norm scales) 1, matrices and kernels N(0, 1 / fan_in)."""
    generator = torch.Generator(next(net.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)


def no_buffers(net: torch.nn.Module) -> tuple[str, ...]:
    """For denoisers without buffers: nothing to fill."""
    del net
    return ()


@torch.no_grad()
def sd3_buffers(net: SD3Transformer2DModel) -> tuple[str, ...]:
    """The position table (a buffer diffusers builds at construction, left empty by `to_empty`), rebuilt on its
    device as diffusers builds it."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    embed = net.pos_embed
    table = get_2d_sincos_pos_embed(net.inner_dim, embed.pos_embed_max_size, base_size=embed.base_size,
                                    interpolation_scale=embed.interpolation_scale, device=embed.pos_embed.device)
    embed.pos_embed.copy_(table.float().unsqueeze(0))
    return ("pos_embed.pos_embed",)


def build_denoiser(model: Model, dtype: torch.dtype, device: torch.device, seed: int, remat: bool) -> torch.nn.Module:
    """Built on the meta device, materialised on `device` in `dtype`: a 12B model never exists in fp32 or on
    the host. Buffers are rebuilt by the family (`to_empty` leaves them uninitialised); one it does not rebuild
    is an error."""
    side = FAMILIES[model.name]
    with torch.device("meta"):
        net = side.denoiser(**model.denoiser_config)
    net = net.to(dtype=dtype).to_empty(device=device)
    randomize_(net, seed)
    unfilled = sorted({name for name, _ in net.named_buffers()} - set(side.fill_buffers(net)))
    if unfilled:
        raise ValueError(f"{model.name}: torch denoiser buffers {unfilled} are left uninitialised by to_empty; "
                         "its TorchFamily.fill_buffers must rebuild them")
    if remat:
        net.enable_gradient_checkpointing()
    return net


# --- inputs and guided denoiser calls, per family ----------------------------------------------------------

def _to_torch(array, device) -> torch.Tensor:
    """A host array (numpy, or a jax array read back) as a tensor on `device`; np.array copies it writable."""
    return torch.from_numpy(np.array(array)).to(device)


def nchw(array) -> np.ndarray:
    """Our channels-last latents (B, h, w, C) as the UNet / SD3 transformer take them."""
    return np.asarray(array).transpose(0, 3, 1, 2)


def packed_tokens(array) -> np.ndarray:
    """Our packed latent grid (B, h/2, w/2, 4C) as Flux's token sequence (B, L, 4C), row-major."""
    array = np.asarray(array)
    return array.reshape(array.shape[0], -1, array.shape[-1])


def sd15_inputs(inputs: dict, dtype, device, guidance_scale: float):
    """NCHW latents; the CFG batch [negative, positive] concatenated once, as the pipelines do."""
    del guidance_scale  # applied per step
    to = lambda a: _to_torch(nchw(a), device)  # noqa: E731
    positive, negative = inputs["cond"]["positive"], inputs["cond"]["negative"]
    image = torch.cat([to(positive["mask"]), to(positive["masked_latents"])], dim=1).to(dtype)
    text = torch.cat([_to_torch(negative["text"], device), _to_torch(positive["text"], device)]).to(dtype)
    return to(inputs["x_init"]), {"text": text, "image": torch.cat([image, image])}


def sd15_guided(net, x, t, cond, scale: float):
    """eps_uncond + scale (eps_text - eps_uncond) from one UNet call on [latents 4, mask 1, masked latents 4]."""
    doubled = torch.cat([x, x]).to(cond["image"].dtype)
    eps = net(torch.cat([doubled, cond["image"]], dim=1), torch.cat([t, t]), encoder_hidden_states=cond["text"],
              return_dict=False)[0].float()
    uncond, text = eps.chunk(2)
    return uncond + scale * (text - uncond)


def sd15_unguided(net, x, t, cond):
    """The positive prompt's prediction alone (what the library's NFT and SFT objectives train)."""
    image = cond["image"].chunk(2)[1]
    return net(torch.cat([x.to(image.dtype), image], dim=1), t, encoder_hidden_states=cond["text"].chunk(2)[1],
               return_dict=False)[0].float()


def flux_inputs(inputs: dict, dtype, device, guidance_scale: float):
    """Packed (B, L, 64) latent tokens; Fill's masked-image + mask tokens concatenated per step on channels."""
    x_init, cond = inputs["x_init"], inputs["cond"]
    batch, height, width, _ = x_init.shape
    tokens = lambda a: _to_torch(packed_tokens(a), device)  # noqa: E731
    return tokens(x_init), {
        "text": _to_torch(cond["text"], device).to(dtype), "pooled": _to_torch(cond["pooled"], device).to(dtype),
        "fill": tokens(cond["fill"]).to(dtype), "img_ids": _to_torch(flux.image_ids(height, width), device),
        "txt_ids": _to_torch(flux.text_ids(cond["text"].shape[1]), device),
        "guidance": torch.full((batch,), guidance_scale, device=device)}


def _flux_call(net, x, t, cond, **extra):
    hidden = torch.cat([x.to(cond["fill"].dtype), cond["fill"]], dim=-1)
    return net(hidden_states=hidden, timestep=t, guidance=cond["guidance"], pooled_projections=cond["pooled"],
               encoder_hidden_states=cond["text"], txt_ids=cond["txt_ids"], img_ids=cond["img_ids"],
               return_dict=False, **extra)[0].float()


def flux_guided(net, x, t, cond, scale: float):
    """Velocity; the guidance scale is the model input cond['guidance'] (Flux is guidance-distilled), so the
    guided and the unguided call are one call."""
    del scale
    return _flux_call(net, x, t, cond)


def calligrapher_inputs(inputs: dict, dtype, device, guidance_scale: float):
    """Flux Fill's inputs on the canvas (strip rows first), the pooled image embedding, and the strip's token
    count (W x W pixels: as many latent rows as the canvas has columns)."""
    x_init, cond = flux_inputs(inputs, dtype, device, guidance_scale)
    columns = inputs["x_init"].shape[2]
    return x_init, {**cond, "image_embeds": _to_torch(inputs["cond"]["image_embeds"], device).to(dtype),
                    "strip_tokens": columns * columns}


def calligrapher_guided(net, x, t, cond, scale: float):
    """Velocity of CalligrapherDenoiser on the canvas (embedded guidance: guided and unguided are one call); as
    the family's denoise, the strip's tokens carry no gradient."""
    del scale
    velocity = _flux_call(net, x, t, cond, image_embeds=cond["image_embeds"])
    strip = cond["strip_tokens"]
    return torch.cat([velocity[:, :strip].detach(), velocity[:, strip:]], dim=1)


SD3_TIMESTEP_SCALE = sd3.FlowShift().num_train_timesteps  # the bench's families use the default scheduler


def sd3_inputs(inputs: dict, dtype, device, guidance_scale: float):
    """NCHW latents; text and pooled text of both prompts, and their CFG batch [negative, positive]
    concatenated once, as StableDiffusion3Pipeline does."""
    del guidance_scale  # applied per step
    prompts = {side: {name: _to_torch(value, device).to(dtype) for name, value in inputs["cond"][side].items()}
               for side in ("negative", "positive")}
    both = {name: torch.cat([prompts["negative"][name], prompts["positive"][name]]) for name in ("text", "pooled")}
    return _to_torch(nchw(inputs["x_init"]), device), {"both": both, "positive": prompts["positive"]}


def _sd3_call(net, x, t, prompt):
    """Velocity; the transformer takes the scheduler's timesteps, sigma x num_train_timesteps."""
    return net(hidden_states=x.to(prompt["text"].dtype), timestep=t * SD3_TIMESTEP_SCALE,
               encoder_hidden_states=prompt["text"], pooled_projections=prompt["pooled"], return_dict=False)[0].float()


def sd3_unguided(net, x, t, cond):
    return _sd3_call(net, x, t, cond["positive"])


def sd3_guided(net, x, t, cond, scale: float):
    """v_uncond + scale (v_text - v_uncond) from one call on the doubled batch; one call on the positive prompt
    at a scale <= 1 (the pipeline's do_classifier_free_guidance)."""
    if scale <= 1.0:
        return sd3_unguided(net, x, t, cond)
    uncond, text = _sd3_call(net, torch.cat([x, x]), torch.cat([t, t]), cond["both"]).chunk(2)
    return uncond + scale * (text - uncond)


@dataclasses.dataclass(frozen=True)
class TorchFamily:
    denoiser: Callable[..., torch.nn.Module]  # (**Model.denoiser_config) -> the module (built on the meta device)
    fill_buffers: Callable[[torch.nn.Module], tuple[str, ...]]  # rebuilds what to_empty left empty; their names
    layout: Callable[[np.ndarray], np.ndarray]  # our latents (host) -> the layout the module takes
    inputs: Callable  # (host inputs, dtype, device, guidance scale) -> (initial latents, cond), on the device
    guided: Callable  # (net, x, t, cond, scale) -> prediction in fp32, with the family's guidance
    unguided: Callable  # (net, x, t, cond) -> the positive prompt's prediction (NFT trains it, as ours does)


FAMILIES = {
    "sd15_inpaint": TorchFamily(UNet2DConditionModel, no_buffers, nchw, sd15_inputs, sd15_guided, sd15_unguided),
    "flux_fill": TorchFamily(FluxTransformer2DModel, no_buffers, packed_tokens, flux_inputs, flux_guided,
                             functools.partial(flux_guided, scale=None)),
    "sd3": TorchFamily(SD3Transformer2DModel, sd3_buffers, nchw, sd3_inputs, sd3_guided, sd3_unguided),
    "calligrapher": TorchFamily(CalligrapherDenoiser, no_buffers, packed_tokens, calligrapher_inputs,
                                calligrapher_guided, functools.partial(calligrapher_guided, scale=None)),
}


# --- SDE steps with log-probs (fp32) --------------------------------------------------------------------

def coefficient_tables(schedule: dict, device) -> dict[str, torch.Tensor]:
    tables = {name: _to_torch(np.asarray(values), device) for name, values in schedule.items()}
    if "sigma" in tables:  # Flow-GRPO's sigma_max: the second sigma, used where sigma == 1
        sigmas = torch.cat([tables["sigma"], tables["sigma_next"][-1:]])
        tables["sigma_max"] = sigmas[1]
    return tables


def _per_sample(table: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table[index].view(-1, *([1] * (like.ndim - 1)))


def _sample_and_score(mean, std, next_sample):
    """Draw (or take) the next sample; log N(next; mean, std^2) averaged over every non-batch dim."""
    if next_sample is None:
        next_sample = mean + std * torch.randn_like(mean)
    log_prob = -((next_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return next_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddim_step(eps, x, tables, index, noise_level: float, next_sample=None):
    """DDPO's DDIM step; noise_level is its eta."""
    alpha_bar, alpha_bar_prev = _per_sample(tables["alpha_bar"], index, x), _per_sample(tables["alpha_bar_prev"],
                                                                                         index, x)
    x0 = (x - torch.sqrt(1 - alpha_bar) * eps) / torch.sqrt(alpha_bar)
    std = noise_level * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
    mean = torch.sqrt(alpha_bar_prev) * x0 + torch.sqrt(torch.clamp(1 - alpha_bar_prev - std**2, min=0.0)) * eps
    return _sample_and_score(mean, std, next_sample)


def flow_grpo_step(v, x, tables, index, noise_level: float, next_sample=None):
    """Flow-GRPO's SDE step: std_t = a sqrt(sigma / (1 - sigma)), mean with the score correction."""
    sigma, sigma_next = _per_sample(tables["sigma"], index, x), _per_sample(tables["sigma_next"], index, x)
    dt = sigma_next - sigma
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, tables["sigma_max"], sigma)))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return _sample_and_score(mean, std_t * torch.sqrt(-dt), next_sample)


STEPS = {"ddim": ddim_step, "flow_grpo": flow_grpo_step}


@torch.no_grad()
def rollout(denoise, net, x_init, tables, step, num_steps: int):
    """(latents (B, T + 1, ...), log-probs (B, T)) from a Python loop of guided calls and SDE steps."""
    x, latents, log_probs = x_init, [x_init], []
    for j in range(num_steps):
        index = torch.full((x.shape[0],), j, device=x.device)
        x, log_prob = step(denoise(net, x, tables["model_t"][index]), x, tables, index)
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)


# --- updates ----------------------------------------------------------------------------------------------

def _optimizer_step(net, optimizer, loss, max_grad_norm: float) -> torch.Tensor:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def grpo_update(runner, net, optimizer, denoise, step, tables, batch, config) -> torch.Tensor:
    """PPO-clip on one stored step per sample: re-score x_j -> x_{j+1} under the current weights."""
    t, clip_range = config.train, config.grpo.clip_range
    index = batch["step_index"]
    rows = torch.arange(index.shape[0], device=index.device)
    x, x_next = batch["latents"][rows, index], batch["latents"][rows, index + 1]
    _, log_prob = step(denoise(runner, x, tables["model_t"][index]), x, tables, index, next_sample=x_next)
    advantages = batch["advantages"].clamp(-t.adv_clip_max, t.adv_clip_max)
    ratio = torch.exp(log_prob - batch["log_probs"][rows, index])
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    return _optimizer_step(net, optimizer, loss, t.max_grad_norm)


def _x0_loss(x0_prediction, x0):
    """(B,) squared error over its own detached mean absolute error (DiffusionNFT's adaptive weight)."""
    dims = tuple(range(1, x0.ndim))
    weight = (x0_prediction - x0).abs().mean(dim=dims).clamp(min=1e-5).detach()
    return ((x0_prediction - x0) ** 2).mean(dim=dims) / weight


def nft_update(runner, old_runner, net, optimizer, denoise, tables, batch, config) -> torch.Tensor:
    """DiffusionNFT: re-noise the clean sample at a rollout sigma; pull v+ toward it where the advantage is
    high and v- where it is low."""
    t, beta = config.train, config.nft.beta
    x0 = batch["latents"][:, -1]
    sigma_flat = tables["sigma"][batch["step_index"]]
    sigma = sigma_flat.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - sigma) * x0 + sigma * torch.randn_like(x0)
    with torch.no_grad():
        v_old = denoise(old_runner, x_t, sigma_flat)
    v = denoise(runner, x_t, sigma_flat)
    v_plus, v_minus = beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v
    r = (batch["advantages"].clamp(-t.adv_clip_max, t.adv_clip_max) / t.adv_clip_max / 2 + 0.5).clamp(0, 1)
    per_sample = r * _x0_loss(x_t - sigma * v_plus, x0) + (1 - r) * _x0_loss(x_t - sigma * v_minus, x0)
    loss = (t.adv_clip_max * per_sample / beta).mean()
    return _optimizer_step(net, optimizer, loss, t.max_grad_norm)


def make_optimizer(net, train_config) -> torch.optim.Optimizer:
    """AdamW over what trains (every weight, or the LoRA adapters when `add_lora` froze the rest)."""
    t = train_config
    trained = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(trained, lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2),
                             weight_decay=t.weight_decay, eps=1e-8)


# the attention projections our default LoRA pattern matches (algorithms/trainable.py), in diffusers' names
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def add_lora(net: torch.nn.Module, train_config) -> torch.nn.Module:
    """peft LoRA of the config's rank and alpha on the attention projections; the base weights frozen."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0"
             for name, _ in net.named_modules()}
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=train_config.lora_rank, lora_alpha=train_config.lora_alpha,
                               target_modules=[target for target in LORA_TARGETS if target in names]))
    return net


# --- measuring ----------------------------------------------------------------------------------------------

def _sync(device):
    def sync(out):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return sync


def guarded(phase, device):
    """Run a phase; out of memory becomes the phase's result instead of ending the run."""
    try:
        return phase()
    except torch.OutOfMemoryError as error:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(error).splitlines()[0][:300]}"}


def peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)),
                "source": "torch.cuda.max_memory_allocated (this variant)"}
    return measure.process_peak_rss()


def run_variant(net, compiled: bool, model: Model, configs: dict, inputs: dict, args, device) -> dict:
    """Rollout, then one update per method, for eager or torch.compile'd calls of the same module."""
    label = "torch compiled" if compiled else "torch eager"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rollout_config = configs["grpo"]
    s = rollout_config.sample
    side = FAMILIES[model.name]
    x_init, cond = side.inputs(inputs, TORCH_DTYPES[args.dtype], device, s.guidance_scale)
    schedule = model.family.schedule(s.num_steps, inputs["x_init"].shape[1:])
    tables = coefficient_tables(schedule, device)
    if s.sampler not in STEPS:
        raise ValueError(f"sample.sampler={s.sampler!r}: the torch reference implements {sorted(STEPS)}")
    step = functools.partial(STEPS[s.sampler], noise_level=s.noise_level)
    # (net, x, t) -> output: the guided call samples and GRPO re-scores; NFT trains the unguided one, as ours does
    denoise = functools.partial(side.guided, cond=cond, scale=s.guidance_scale)
    unguided = functools.partial(side.unguided, cond=cond)
    runner = torch.compile(net) if compiled else net
    sync, results, trajectory = _sync(device), {}, None

    def rollout_phase():
        nonlocal trajectory
        timings, trajectory = measure.timed_runs(
            lambda: rollout(denoise, runner, x_init, tables, step, s.num_steps), sync, args.repeats,
            f"{label} rollout")
        return {**timings, "images_per_s": x_init.shape[0] / timings["median_s"]}

    def update_phase(method, config):
        latents, log_probs = trajectory
        batch = {"latents": latents, "log_probs": log_probs,
                 "advantages": _to_torch(inputs["advantages"], device),
                 "step_index": torch.randint(0, s.num_steps, (x_init.shape[0],), device=device)}
        optimizer = make_optimizer(net, config.train)
        if method == "grpo":
            update = functools.partial(grpo_update, runner, net, optimizer, denoise, step, tables, batch, config)
        else:
            old = copy.deepcopy(net).requires_grad_(False)
            old_runner = torch.compile(old) if compiled else old
            update = functools.partial(nft_update, runner, old_runner, net, optimizer, unguided, tables, batch,
                                       config)
        timings, _ = measure.timed_runs(update, sync, args.repeats, f"{label} {method} update")
        return timings

    results["rollout"] = guarded(rollout_phase, device)
    for method, config in configs.items():
        results[f"update_{method}"] = (guarded(functools.partial(update_phase, method, config), device)
                                       if trajectory is not None else {"error": "no rollout to train on"})
        net.zero_grad(set_to_none=True)  # a phase that ran out of memory may leave gradients behind
        gc.collect()
    results["memory"] = peak_memory(device)
    return results


def run(model: Model, configs: dict, inputs: dict, args, device_type: str) -> dict:
    """Eager, then (unless --no-torch-compile) torch.compile'd, on one module; freed afterwards so that our
    side gets the device memory back."""
    device = torch.device(device_type)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 float32 matmuls, as XLA's default precision on GPU
    net = build_denoiser(model, TORCH_DTYPES[args.dtype], device, args.seed, configs["grpo"].model.remat)
    params = sum(p.numel() for p in net.parameters())
    if configs["grpo"].train.trainable == "lora":
        net = add_lora(net, configs["grpo"].train)
    results = {"params": params, "trained": sum(p.numel() for p in net.parameters() if p.requires_grad),
               "eager": run_variant(net, False, model, configs, inputs, args, device),
               "compiled": run_variant(net, True, model, configs, inputs, args, device) if args.torch_compile
               else None}
    del net
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results
