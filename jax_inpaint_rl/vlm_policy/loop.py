"""The VLM policy kind (seed 002): GRPO on Qwen-Image-Edit's Qwen2.5-VL, the DiT frozen.

Per epoch, one batch of edit examples (image + instruction), each repeated k times (a group):
1. sample: k completions per prompt from the LoRA-merged VLM (sampling.py, KV cache);
2. condition: the completion's hidden states for the DiT (condition.py; the policy's or the base's, config
   policy.condition_from), the negative prompt " " through the same VLM, the image's reference latents;
3. render: the frozen DiT, true CFG, deterministic (ODE) sampler, the same initial noise for a group's k samples
   drawn from (seed, example index), so a group's images differ by their completions alone;
4. reward: `reward(images, sources, instructions, completions)` (judge.py's rubric judge by default); failed
   judgements are dropped from their groups with the reason logged;
5. update: group-normalised advantages (algorithms/advantages.py; zero-signal groups dropped), one token-level
   GRPO step on the LoRA tree (update.py).
Metrics go to output_dir/metrics.jsonl, the LoRA tree and optimizer state to output_dir/checkpoints (orbax).
"""
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_inpaint_rl import programs
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.algorithms.advantages import group_advantages
from jax_inpaint_rl.checkpoint.manager import Checkpointer
from jax_inpaint_rl.data.loader import loaders_from_config
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models.qwen_image import family as qwen
from jax_inpaint_rl.registry import resolve
from jax_inpaint_rl.vlm_policy import condition, sampling, update

CONDITION_FROM = ("policy", "base")
# LoRA targets: every attention and MLP projection of the language model's (scanned) layers
LORA_PATTERN = r"language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel$"


@dataclasses.dataclass
class Runner:
    """What `fit` leaves: the trained LoRA tree, the optimizer state, every epoch's metrics."""
    trainable: Any
    opt_state: Any
    history: list


def build_model(config):
    """(family, modules, params with the VLM's lm_head, decode_texts: (B, T) ids + mask -> list of str, the id of
    <|im_end|>)."""
    name, dtype = config.model.family, config.model.param_dtype
    if config.model.path:  # converted with --lm-head: the policy needs the VLM's logits
        family, modules, params = qwen.load_modules(config.model.path, name, config.model.compute_dtype,
                                                    lm_head=True)
        from transformers import AutoTokenizer  # host-side detokenisation only (the library never imports torch)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(config.model.path, "tokenizer"))
        decode = lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True)  # noqa: E731
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    else:
        family, params = qwen.tiny(name, config.seed, config.model.compute_dtype, lm_head=True)
        modules = qwen.tiny_modules(name, config.model.compute_dtype)
        decode = lambda rows: [" ".join(f"t{i}" for i in row) for row in rows]  # noqa: E731
        end = qwen.TINY_IDS["<|im_end|>"]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)

    def decode_texts(tokens, mask):
        return decode([list(row[m.astype(bool)]) for row, m in zip(np.asarray(tokens), np.asarray(mask))])

    return family, modules, params, decode_texts, end


def make_render(family, config) -> Callable:
    """(params, cond, x_init) -> images in [-1, 1]: the frozen DiT with true CFG and the ODE sampler, decoded."""
    sampler = Sampler("ode", 0.0)
    decode = programs.make_decode(family)

    @jax.jit
    def render(params, cond, x_init, inputs):
        schedule = family.schedule(config.sample.num_steps, x_init.shape[1:])
        policy = programs.make_policy(family, schedule, sampler, config.sample.guidance_scale)
        trajectory = rollout_lib.rollout(policy.guided, params[family.denoiser_key], cond, x_init, schedule,
                                         sampler, jax.random.key(0), window=jnp.zeros(len(schedule["sigma"])))
        return decode(params, trajectory.latents[:, -1], inputs)

    return render


def group_noise(seed: int, example_index, group_size: int, latent_shape):
    """The same initial noise for a group's samples, drawn from (seed, the example's index)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(example_index[::group_size]))
    noise = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys)
    return jnp.repeat(noise, group_size, axis=0)


def to_uint8(images) -> np.ndarray:
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def fit(config) -> Runner:
    """Train the VLM policy for config.train.num_epochs epochs (module docstring)."""
    p = config.policy
    if p.condition_from not in CONDITION_FROM:
        raise ValueError(f"config: policy.condition_from={p.condition_from!r}: expected one of {CONDITION_FROM}")
    os.makedirs(config.output_dir, exist_ok=True)
    family, modules, params, decode_texts, end = build_model(config)
    vlm = modules.vlm.clone(with_lm_head=True)
    drop, k = modules.dropped, p.group_size
    spec = trainable_lib.from_config(config.train)
    merge = lambda base, trainable: trainable_lib.merge(spec, base, trainable)  # noqa: E731
    base = params["text_encoder"]
    trainable = trainable_lib.init(spec, base, jax.random.key(config.seed))
    optimizer = programs.make_optimizer(config.train)
    opt_state = optimizer.init(trainable)

    sample = sampling.make_sampler(vlm, merge, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                   top_p=p.top_p, end_id=end, cache_dtype=jnp.dtype(config.model.compute_dtype))
    step = update.make_step(update.make_objective(
        vlm, merge, temperature=p.temperature, end_id=end, eps_low=p.eps_low, eps_high=p.eps_high, beta=p.beta,
        aggregation=p.aggregation, max_new_tokens=p.max_new_tokens), optimizer)
    render = make_render(family, config)
    features = jax.jit(lambda params, pixels, grid: sampling.vision_features(vlm, params, pixels, grid),
                       static_argnums=2)

    @jax.jit
    def conditioning(base, trainable, prompts, tokens, mask, negative_tokens, inputs, family_params):
        vlm_params = merge(base, trainable) if p.condition_from == "policy" else base
        image = family.prepare_condition(family_params, inputs)
        positive = condition.condition(vlm, vlm_params, prompts, tokens, mask, end_id=end, drop=drop)
        negative = family.encode_prompt({"text_encoder": vlm_params}, negative_tokens, inputs, {})
        return {"positive": {**positive, **image}, "negative": {**negative, **image}}

    reward = resolve(config.reward.factory, {}, "reward.factory")(**config.reward.config.to_dict())
    train, _, _ = loaders_from_config(config.data, prompts_per_batch=p.prompts_per_batch, seed=config.seed)
    checkpointer = Checkpointer(os.path.join(config.output_dir, "checkpoints"), keep=config.checkpoint.keep)
    frozen = {name: tree for name, tree in params.items() if name != "text_encoder"}
    history = []
    try:
        with open(os.path.join(config.output_dir, "metrics.jsonl"), "a") as log:
            for epoch in tqdm(range(config.train.num_epochs), desc="VLM GRPO epochs", unit="epoch"):
                batch = next(train)
                instructions = [text for text in batch["prompt"] for _ in range(k)]
                images = np.repeat(batch["image"], k, axis=0)
                inputs = {"image": jnp.asarray(images)}
                height, width = images.shape[1:3]
                grid = (qwen.vision_grid(modules, height, width),) * len(images)
                tokens = family.tokenize(instructions, inputs)
                prompts = sampling.Prompts(jnp.asarray(tokens["ids"]), jnp.asarray(tokens["mask"]),
                                           jnp.moveaxis(jnp.asarray(tokens["positions"]), -1, 0),
                                           features(base, jnp.asarray(tokens["pixels"]), grid))
                out = sample(base, trainable, prompts, jax.random.fold_in(jax.random.key(config.seed), epoch))
                negative_tokens = family.tokenize([family.negative_prompt] * len(images), inputs)
                cond = conditioning(base, trainable, prompts, out.tokens, out.mask, negative_tokens, inputs,
                                    {**frozen, "text_encoder": base})
                x_init = group_noise(config.seed, np.repeat(batch["example_index"], k), k,
                                     family.latent_shape(height, width))
                edited = to_uint8(render(frozen, cond, x_init, inputs))
                completions = decode_texts(out.tokens, out.mask)
                scores, valid, reasons = reward(edited, to_uint8(images), instructions, completions)
                groups = np.repeat(np.arange(len(batch["prompt"])), k)
                advantages = group_advantages(jnp.asarray(scores), jnp.asarray(groups), len(batch["prompt"]),
                                              std=config.advantage.std, clip=config.advantage.clip,
                                              valid=jnp.asarray(valid))
                trainable, opt_state, metrics = step(trainable, opt_state, base, update.UpdateBatch(
                    prompts, out.tokens, out.mask, out.log_probs, advantages.advantages, advantages.keep))
                record = {"epoch": epoch, **{key: float(value) for key, value in metrics.items()},
                          "reward_mean": float(np.mean(scores[valid])) if valid.any() else float("nan"),
                          "judged": int(valid.sum()), "failed": [r for r in reasons if r],
                          "kept": int(np.asarray(advantages.keep).sum()),
                          "completion_tokens": float(np.asarray(out.mask).sum(1).mean()),
                          "completions": completions[:k]}
                log.write(json.dumps(record) + "\n")
                log.flush()
                history.append(record)
                if config.checkpoint.interval and (epoch + 1) % config.checkpoint.interval == 0:
                    checkpointer.save(epoch + 1, {"trainable": trainable, "opt_state": opt_state},
                                      {"epoch": epoch + 1})
    finally:
        checkpointer.close()
        train.close()
    return Runner(trainable, opt_state, history)


def main(config) -> Runner:
    """`python -m jax_inpaint_rl.train --config=...` with policy_kind='vlm' (train.POLICY_KINDS): train, then
    print the last epoch's record."""
    runner = fit(config)
    print(json.dumps(runner.history[-1] if runner.history else {}, indent=2))
    return runner
