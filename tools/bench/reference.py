"""The PyTorch reference, written the way Flow-GRPO (DDPO for SD1.5) runs it.

Rollout: a Python loop over the steps, each a diffusers denoiser call with guidance (CFG by batch
concatenation for SD1.5, the embedded guidance input for Flux Fill) and an SDE step with the log-prob of
its transition: DDIM with eta for SD1.5, Flow-GRPO's SDE for Flux, in fp32. Update: the loss on one stored
step per sample (PPO-clip for GRPO, DiffusionNFT's implicit-negative loss against a frozen copy), backward,
grad-norm clip and an AdamW step. Eager, or with torch.compile on the denoiser.

The per-step coefficient tables are the library's host-computed schedule (tests/test_diffusion.py proves it
equal to diffusers' schedulers); everything that runs per step is written here.
"""
import copy
import functools
import gc
import math

import numpy as np
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from jax_inpaint_rl.models.flux import family as flux
from tools.bench import measure
from tools.bench.models import Model

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DENOISERS = {"sd15_inpaint": UNet2DConditionModel, "flux_fill": FluxTransformer2DModel}


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


def build_denoiser(model: Model, dtype: torch.dtype, device: torch.device, seed: int, remat: bool) -> torch.nn.Module:
    """Built on the meta device, materialised on `device` in `dtype`: a 12B model never exists in fp32 or on
    the host."""
    with torch.device("meta"):
        net = DENOISERS[model.name](**model.denoiser_config)
    net = net.to(dtype=dtype).to_empty(device=device)
    randomize_(net, seed)
    if remat:
        net.enable_gradient_checkpointing()
    return net


# --- inputs and guided denoiser calls, per family ----------------------------------------------------------

def _to_torch(array, device) -> torch.Tensor:
    """A host array (numpy, or a jax array read back) as a tensor on `device`; np.array copies it writable."""
    return torch.from_numpy(np.array(array)).to(device)


def sd15_inputs(inputs: dict, dtype, device, guidance_scale: float):
    """NCHW latents; the CFG batch [negative, positive] concatenated once, as the pipelines do."""
    del guidance_scale  # applied per step
    nchw = lambda a: _to_torch(a.transpose(0, 3, 1, 2), device)  # noqa: E731
    positive, negative = inputs["cond"]["positive"], inputs["cond"]["negative"]
    image = torch.cat([nchw(positive["mask"]), nchw(positive["masked_latents"])], dim=1).to(dtype)
    text = torch.cat([_to_torch(negative["text"], device), _to_torch(positive["text"], device)]).to(dtype)
    return nchw(inputs["x_init"]), {"text": text, "image": torch.cat([image, image])}


def sd15_guided(net, x, t, cond, scale: float):
    """eps_uncond + scale (eps_text - eps_uncond) from one UNet call on [latents 4, mask 1, masked latents 4]."""
    doubled = torch.cat([x, x]).to(cond["image"].dtype)
    eps = net(torch.cat([doubled, cond["image"]], dim=1), torch.cat([t, t]), encoder_hidden_states=cond["text"],
              return_dict=False)[0].float()
    uncond, text = eps.chunk(2)
    return uncond + scale * (text - uncond)


def flux_inputs(inputs: dict, dtype, device, guidance_scale: float):
    """Packed (B, L, 64) latent tokens; Fill's masked-image + mask tokens concatenated per step on channels."""
    x_init, cond = inputs["x_init"], inputs["cond"]
    batch, height, width, _ = x_init.shape
    tokens = lambda a: _to_torch(a.reshape(batch, height * width, -1), device)  # noqa: E731
    return tokens(x_init), {
        "text": _to_torch(cond["text"], device).to(dtype), "pooled": _to_torch(cond["pooled"], device).to(dtype),
        "fill": tokens(cond["fill"]).to(dtype), "img_ids": _to_torch(flux.image_ids(height, width), device),
        "txt_ids": _to_torch(flux.text_ids(cond["text"].shape[1]), device),
        "guidance": torch.full((batch,), guidance_scale, device=device)}


def flux_guided(net, x, t, cond, scale: float):
    """Velocity; the guidance scale is the model input cond['guidance'] (Flux is guidance-distilled)."""
    del scale
    hidden = torch.cat([x.to(cond["fill"].dtype), cond["fill"]], dim=-1)
    return net(hidden_states=hidden, timestep=t, guidance=cond["guidance"], pooled_projections=cond["pooled"],
               encoder_hidden_states=cond["text"], txt_ids=cond["txt_ids"], img_ids=cond["img_ids"],
               return_dict=False)[0].float()


INPUTS = {"sd15_inpaint": sd15_inputs, "flux_fill": flux_inputs}
GUIDED = {"sd15_inpaint": sd15_guided, "flux_fill": flux_guided}


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
    x_init, cond = INPUTS[model.name](inputs, TORCH_DTYPES[args.dtype], device, s.guidance_scale)
    schedule = model.family.schedule(s.num_steps, inputs["x_init"].shape[1:])
    tables = coefficient_tables(schedule, device)
    if s.sampler not in STEPS:
        raise ValueError(f"sample.sampler={s.sampler!r}: the torch reference implements {sorted(STEPS)}")
    step = functools.partial(STEPS[s.sampler], noise_level=s.noise_level)
    # (net, x, t) -> output; NFT's unguided call is this one too, since only Flux (guidance as an input) has NFT
    denoise = functools.partial(GUIDED[model.name], cond=cond, scale=s.guidance_scale)
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
            update = functools.partial(nft_update, runner, old_runner, net, optimizer, denoise, tables, batch,
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
