"""The VLM policy kind (seed 002): GRPO on Qwen-Image-Edit's Qwen2.5-VL, the DiT frozen.

Per epoch, one batch of edit examples (image + instruction), each repeated k times (a group):
1. sample: k completions per prompt from the LoRA-merged VLM (sampling.py, KV cache);
2. condition: the completion's hidden states for the DiT (condition.py; the policy's or the base's, config
   policy.condition_from), the negative prompt " " through the same VLM, the image's reference latents;
3. render: the frozen DiT, true CFG, deterministic sampler, the same initial noise for a group's k samples
   drawn from (seed, example index), so a group's images differ by their completions alone;
4. reward: `reward(images, sources, instructions, completions)` (judge.py's rubric judge by default); failed
   judgements are dropped from their groups with the reason logged;
5. update: group-normalised advantages (algorithms/advantages.py; zero-signal groups dropped), then
   policy.num_iterations passes over the batch in policy.minibatches token-level GRPO steps each (update.py).

Mesh (config.mesh, parallel/mesh.py). A batch's rows are split over the data-parallel axes: each host tokenizes
and judges its own rows (the loader gives each host its prompts) and they enter the programs as one global
array; the parameters are placed by parallel/partition.py (replicated, or fsdp-split), and every program keeps
the rows split, so the update's gradient is the global batch's.

Output (output_dir): metrics.jsonl (a line per epoch, with the evaluation's results on evaluation epochs),
checkpoints/ (orbax: LoRA tree, optimizer state; the epoch and the loader position in the side-car),
eval_epochNNNN.png (after epoch NNNN: source | edit, the instruction and the completion's first words under each
row; every eval.interval epochs and at the end), summary.json, and export/: the
LoRA-merged VLM as the text encoder of an inference export (`python -m jax_inpaint_rl.inpaint --checkpoint
<output_dir>/export`). A run restarts from the latest checkpoint (checkpoint.resume): the data order and the
sampling keys are functions of the epoch, so a resumed run gives the numbers an uninterrupted one gives.
"""
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_inpaint_rl import programs, report, setup
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.algorithms.advantages import group_advantages
from jax_inpaint_rl.checkpoint.export import write_export
from jax_inpaint_rl.checkpoint.manager import Checkpointer
from jax_inpaint_rl.data.loader import Loader, loaders_from_config
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models.layers import attention
from jax_inpaint_rl.models.qwen_image import family as qwen
from jax_inpaint_rl.models.random_init import random_params
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.parallel import partition
from jax_inpaint_rl.registry import resolve
from jax_inpaint_rl.trainer import output
from jax_inpaint_rl.vlm_policy import condition, sampling, update

CONDITION_FROM = ("policy", "base")
# LoRA targets: every attention and MLP projection of the language model's (scanned) layers
LORA_PATTERN = r"language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel$"
CAPTION_WORDS = 12  # words of a completion under its row of an evaluation grid


@dataclasses.dataclass
class Runner:
    """What `fit` leaves: the trained LoRA tree, the optimizer state, every epoch's metrics, the summary."""
    trainable: Any
    opt_state: Any
    history: list
    summary: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Pipeline:
    """A run's pieces built once: the model placed on the mesh and the jitted programs."""
    config: Any
    family: Any
    modules: Any
    mesh: Any
    frozen: dict  # the DiT and the VAE
    base: Any  # the VLM as loaded (with its lm_head)
    merge: Callable  # (base, trainable) -> the VLM's parameters
    decode_texts: Callable  # (B, T) ids + mask -> list of str
    features: Callable  # (VLM params, pixels, grid) -> image features
    sample: Callable  # policy.temperature / top_p: training's completions
    sample_greedy: Callable  # evaluation's
    conditioning: Callable
    render: Callable  # sample.num_steps: training's edits
    render_eval: Callable  # sample.eval_num_steps
    reward: Callable


def build_model(config):
    """(family, modules, params with the VLM's lm_head, decode_texts: (B, T) ids + mask -> list of str, the id of
    <|im_end|>). A tiny model's components are the family's tiny build (what an export is rebuilt from), its
    lm_head drawn apart."""
    name, dtype, remat = config.model.family, config.model.compute_dtype, config.model.remat
    if config.model.tiny:
        family, params = setup.build_family(config)
        modules = qwen.tiny_modules(name, dtype, remat)
        head = qwen.vl_lib.param_shapes(modules.vlm.config, lm_head=True)["language_model"].get("lm_head")
        if head is not None:  # an untied head: the family's text encoder has none
            language = {**params["text_encoder"]["language_model"], "lm_head": random_params(head, config.seed + 1)}
            params = {**params, "text_encoder": {**params["text_encoder"], "language_model": language}}
        decode = lambda rows: [" ".join(f"t{i}" for i in row) for row in rows]  # noqa: E731
        end = qwen.TINY_IDS["<|im_end|>"]
    else:
        if not config.model.path:
            raise ValueError("config: model.path is empty and model.tiny is False: convert Qwen-Image-Edit with "
                             "`python -m tools.convert_weights qwen-image-edit --lm-head` and pass "
                             "--config.model.path=DIR (or --config.model.tiny=True)")
        attention.use(config.model.attention)
        family, modules, params = qwen.load_modules(config.model.path, name, dtype, remat, lm_head=True)
        from transformers import AutoTokenizer  # host-side detokenisation only (the library never imports torch)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(config.model.path, "tokenizer"))
        decode = lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True)  # noqa: E731
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, config.model.param_dtype), params)

    def decode_texts(tokens, mask):
        return decode([list(row[m.astype(bool)]) for row, m in zip(np.asarray(tokens), np.asarray(mask))])

    return family, modules, params, decode_texts, end


def make_render(family, config, num_steps: int, mesh) -> Callable:
    """(params, cond, x_init, inputs) -> images in [-1, 1], rows split over the mesh: the frozen DiT with true CFG
    and the deterministic sampler (sample.sampler without noise) over `num_steps`, decoded."""
    sampler = Sampler(config.sample.sampler, 0.0)
    decode = programs.make_decode(family)

    @jax.jit
    def render(params, cond, x_init, inputs):
        schedule = family.schedule(num_steps, x_init.shape[1:])
        policy = programs.make_policy(family, schedule, sampler, config.sample.guidance_scale)
        trajectory = rollout_lib.rollout(policy.guided, params[family.denoiser_key], cond, x_init, schedule,
                                         sampler, jax.random.key(0), window=jnp.zeros(len(schedule["sigma"])))
        return sampling.split_rows(decode(params, trajectory.latents[:, -1], inputs), mesh)

    return render


def group_noise(seed: int, example_index, group_size: int, latent_shape):
    """The same initial noise for a group's samples, drawn from (seed, the example's index)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(example_index[::group_size]))
    noise = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys)
    return jnp.repeat(noise, group_size, axis=0)


def check_config(config, data_parallel: int) -> None:
    """Refuse, before anything is built, settings the loop cannot run, naming the key."""
    p = config.policy
    if p.condition_from not in CONDITION_FROM:
        raise ValueError(f"config: policy.condition_from={p.condition_from!r}: expected one of {CONDITION_FROM}")
    for name in ("num_iterations", "minibatches"):
        if p[name] < 1:
            raise ValueError(f"config: policy.{name}={p[name]}: expected >= 1")
    rows = p.prompts_per_batch * jax.process_count() * p.group_size
    if rows % (p.minibatches * data_parallel):
        raise ValueError(f"config: policy.minibatches={p.minibatches}: the batch's {rows} rows (policy."
                         f"prompts_per_batch x hosts x policy.group_size) must split into that many slices, each "
                         f"over the {data_parallel} data-parallel devices of config.mesh")


def fit(config) -> Runner:
    """Train the VLM policy for config.train.num_epochs epochs (module docstring), continuing the latest
    checkpoint in output_dir when there is one (checkpoint.resume)."""
    mesh = mesh_lib.make_mesh({"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor})
    check_config(config, mesh_lib.data_parallel_size(mesh))
    os.makedirs(config.output_dir, exist_ok=True)
    lock = output.FolderLock(config.output_dir) if jax.process_index() == 0 else None
    checkpointer = Checkpointer(os.path.join(config.output_dir, "checkpoints"), keep=config.checkpoint.keep)
    train = held_out = None
    try:
        output.check_resumable(config, checkpointer)
        pipe, trainable, opt_state, step = build(config, mesh)
        hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
        train, eval_source, _ = loaders_from_config(config.data, prompts_per_batch=config.policy.prompts_per_batch,
                                                    seed=config.seed, **hosts)
        if config.eval.interval:
            if eval_source is None:
                raise ValueError("config: data.eval_path is empty: evaluation (eval.interval="
                                 f"{config.eval.interval}) needs a held-out set; eval.interval=0 turns it off")
            # as many prompts as a training batch has rows: evaluation batches split over the mesh as training's
            held_out = Loader(eval_source.source, prompts_per_batch=config.policy.prompts_per_batch *
                              config.policy.group_size, resolution=config.data.resolution, shuffle=False,
                              validate=False, prefetch=0, **hosts)
        output.write_config(config)
        return train_loop(pipe, step, trainable, opt_state, train, held_out, checkpointer)
    finally:
        checkpointer.close()
        for loader in (train, held_out):
            if loader is not None:
                loader.close()
        if lock is not None:
            lock.release()


def build(config, mesh) -> tuple[Pipeline, Any, Any, Callable]:
    """(pipeline, initial LoRA tree, optimizer state, the update step), placed on the mesh."""
    p = config.policy
    family, modules, params, decode_texts, end = build_model(config)
    vlm = modules.vlm.clone(with_lm_head=True)
    spec = trainable_lib.from_config(config.train)
    merge = lambda base, trainable: trainable_lib.merge(spec, base, trainable)  # noqa: E731

    def place(tree):
        return jax.device_put(tree, partition.tree_shardings(tree, mesh, family.tensor_rules))

    base = place(params["text_encoder"])
    trainable = place(trainable_lib.init(spec, params["text_encoder"], jax.random.key(config.seed)))
    optimizer = programs.make_optimizer(config.train)
    opt_state = place(optimizer.init(trainable))
    several = p.num_iterations > 1 or p.minibatches > 1
    step = update.make_step(update.make_objective(
        vlm, merge, temperature=p.temperature, end_id=end, eps_low=p.eps_low, eps_high=p.eps_high, beta=p.beta,
        aggregation=p.aggregation, max_new_tokens=p.max_new_tokens, old_from_sampler=several), optimizer,
        p.minibatches, jax.tree_util.tree_map(lambda a: a.sharding, (trainable, opt_state)))
    features = jax.jit(lambda params, pixels, grid: sampling.vision_features(vlm, params, pixels, grid),
                       static_argnums=2)

    @jax.jit
    def conditioning(base, trainable, prompts, tokens, mask, negative_tokens, inputs, family_params):
        vlm_params = merge(base, trainable) if p.condition_from == "policy" else base
        image = family.prepare_condition(family_params, inputs)
        positive = condition.condition(vlm, vlm_params, prompts, tokens, mask, end_id=end, drop=modules.dropped)
        negative = family.encode_prompt({"text_encoder": vlm_params}, negative_tokens, inputs, {})
        return sampling.split_rows({"positive": {**positive, **image}, "negative": {**negative, **image}}, mesh)

    sampler = dict(max_new_tokens=p.max_new_tokens, temperature=p.temperature, end_id=end, mesh=mesh,
                   cache_dtype=jnp.dtype(config.model.compute_dtype))
    renders = {steps: make_render(family, config, steps, mesh)  # one program per step count
               for steps in {config.sample.num_steps, config.sample.eval_num_steps}}
    pipe = Pipeline(
        config=config, family=family, modules=modules, mesh=mesh,
        frozen=place({name: tree for name, tree in params.items() if name != "text_encoder"}), base=base,
        merge=merge, decode_texts=decode_texts, features=features,
        sample=sampling.make_sampler(vlm, merge, top_p=p.top_p, **sampler),
        sample_greedy=sampling.make_sampler(vlm, merge, greedy=True, **sampler), conditioning=conditioning,
        render=renders[config.sample.num_steps], render_eval=renders[config.sample.eval_num_steps],
        reward=resolve(config.reward.factory, {}, "reward.factory")(**config.reward.config.to_dict()))
    return pipe, trainable, opt_state, step


def edit(pipe: Pipeline, trainable, batch: dict, group_size: int, key, *, greedy: bool = False) -> dict:
    """Sample, condition and render one host batch, its prompts repeated group_size times: the global prompts
    and completions ('prompts', 'out') and this host's rows ('instructions', 'sources', 'edited' uint8,
    'completions' str)."""
    family, mesh = pipe.family, pipe.mesh
    instructions = [text for text in batch["prompt"] for _ in range(group_size)]
    images = np.repeat(batch["image"], group_size, axis=0)
    host_inputs = {"image": images}
    height, width = images.shape[1:3]
    grid = (qwen.vision_grid(pipe.modules, height, width),) * (len(images) * jax.process_count())
    to_global = lambda a: mesh_lib.from_host_rows(mesh, a)  # noqa: E731
    tokens = jax.tree_util.tree_map(to_global, family.tokenize(instructions, host_inputs))
    negative = jax.tree_util.tree_map(to_global,
                                      family.tokenize([family.negative_prompt] * len(images), host_inputs))
    inputs = {"image": mesh_lib.from_host_rows(mesh, images)}
    prompts = sampling.Prompts(tokens["ids"], tokens["mask"], jnp.moveaxis(tokens["positions"], -1, 0),
                               pipe.features(pipe.base, tokens["pixels"], grid))
    out = (pipe.sample_greedy if greedy else pipe.sample)(pipe.base, trainable, prompts, key)
    cond = pipe.conditioning(pipe.base, trainable, prompts, out.tokens, out.mask, negative, inputs,
                             {**pipe.frozen, "text_encoder": pipe.base})
    noise = group_noise(pipe.config.seed, np.repeat(batch["example_index"], group_size), group_size,
                        family.latent_shape(height, width))
    render = pipe.render_eval if greedy else pipe.render
    edited = render(pipe.frozen, cond, mesh_lib.from_host_rows(mesh, noise), inputs)
    return {"prompts": prompts, "out": out, "instructions": instructions, "sources": report.to_uint8(images),
            "edited": report.to_uint8(mesh_lib.host_rows(edited)),
            "completions": pipe.decode_texts(mesh_lib.host_rows(out.tokens), mesh_lib.host_rows(out.mask))}


def train_epoch(pipe: Pipeline, step, trainable, opt_state, batch: dict, epoch: int):
    """One sampled batch and its updates: (trainable, opt_state, the epoch's record)."""
    config, mesh = pipe.config, pipe.mesh
    p = config.policy
    k = p.group_size
    made = edit(pipe, trainable, batch, k, jax.random.fold_in(jax.random.key(config.seed), epoch))
    scores, valid, reasons = pipe.reward(made["edited"], made["sources"], made["instructions"], made["completions"])
    every_score, every_valid = mesh_lib.all_hosts(scores), mesh_lib.all_hosts(valid)
    groups = len(every_score) // k
    advantages = group_advantages(jnp.asarray(every_score), jnp.asarray(np.repeat(np.arange(groups), k)), groups,
                                  std=config.advantage.std, clip=config.advantage.clip,
                                  valid=jnp.asarray(every_valid))
    out = made["out"]
    batch_for_update = update.UpdateBatch(
        made["prompts"], out.tokens, out.mask, out.log_probs,
        mesh_lib.from_host_rows(mesh, mesh_lib.host_share(np.asarray(advantages.advantages))),
        mesh_lib.from_host_rows(mesh, mesh_lib.host_share(np.asarray(advantages.keep))))
    steps = []
    for _ in range(p.num_iterations):
        for index in range(p.minibatches):
            trainable, opt_state, metrics = step(trainable, opt_state, pipe.base, batch_for_update, index)
            steps.append(metrics)
    judged = every_valid.astype(bool)
    record = {"epoch": epoch, **{key: float(np.mean([float(m[key]) for m in steps])) for key in steps[0]},
              "updates": len(steps), "first_ratio_mean": float(steps[0]["ratio_mean"]),
              "reward_mean": float(np.mean(every_score[judged])) if judged.any() else float("nan"),
              "judged": int(judged.sum()), "failed": [r for r in reasons if r],
              "kept": int(np.asarray(advantages.keep).sum()),
              "completion_tokens": float(mesh_lib.all_hosts(mesh_lib.host_rows(out.mask).sum(1)).mean()),
              "completions": made["completions"][:k]}
    return trainable, opt_state, record


def evaluate(pipe: Pipeline, trainable, held_out: Loader, tag: str) -> dict:
    """Greedy completions for the held-out set, rendered over sample.eval_num_steps and judged: the mean reward
    of the judged examples ('reward', 'examples') and eval_<tag>.png (source | edit, the instruction
    and the completion's first words under each row, the reward under the edit)."""
    config = pipe.config
    scores, judged, rows, captions, notes = [], [], [], [], []
    for index in range(held_out.steps_per_epoch):
        batch = held_out.batch_at(0, index)
        made = edit(pipe, trainable, batch, 1, jax.random.key(0), greedy=True)
        score, valid, _ = pipe.reward(made["edited"], made["sources"], made["instructions"], made["completions"])
        valid = valid & batch["valid"]  # top-up rows of a last partial batch are not examples
        scores.append(mesh_lib.all_hosts(score))
        judged.append(mesh_lib.all_hosts(valid))
        for i in np.flatnonzero(batch["valid"])[:max(0, config.eval.num_grid - len(rows))]:
            rows.append([made["sources"][i], made["edited"][i]])
            words = " ".join(made["completions"][i].split()[:CAPTION_WORDS])
            captions.append(f"{made['instructions'][i]} | {words}")
            notes.append(["", f"reward {score[i]:.2f}" if valid[i] else "not judged"])
    scores, judged = np.concatenate(scores), np.concatenate(judged).astype(bool)
    result = {"reward": float(scores[judged].mean()) if judged.any() else float("nan"),
              "examples": int(judged.sum()), "grid": f"eval_{tag}.png"}
    if jax.process_index() == 0 and rows:
        report.save_grid(os.path.join(config.output_dir, result["grid"]), rows, ["source", "edit"], captions, notes)
    return result


def restored(checkpointer: Checkpointer, config, trainable, opt_state, train: Loader):
    """(trainable, opt_state, first epoch, resumed checkpoint or None) from the checkpoint a resume starts from
    (trainer/output.chosen_step), the train loader moved to where it was; the state as given without one."""
    number = output.chosen_step(config, checkpointer)
    if number is None:
        return trainable, opt_state, 0, None
    state, meta = checkpointer.restore(number, {"trainable": trainable, "opt_state": opt_state})
    train.restore(meta["loader"])
    return state["trainable"], state["opt_state"], int(meta["epoch"]), number


def earlier_records(path: str, epoch: int) -> list:
    """The metrics lines of epochs before `epoch`, the file cut to them (a resumed run logs again what it does
    again)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["epoch"] < epoch]
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.writelines(kept)
    return [json.loads(line) for line in kept]


def train_loop(pipe: Pipeline, step, trainable, opt_state, train: Loader, held_out: Loader | None,
               checkpointer: Checkpointer) -> Runner:
    """Epochs from the resumed one to train.num_epochs; evaluate, log and save on schedule; export at the end."""
    config = pipe.config
    trainable, opt_state, start, resumed_from = restored(checkpointer, config, trainable, opt_state, train)
    metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
    history = earlier_records(metrics_path, start)
    epochs = config.train.num_epochs
    for epoch in tqdm(range(start, epochs), desc="VLM GRPO epochs", unit="epoch", initial=start, total=epochs):
        trainable, opt_state, record = train_epoch(pipe, step, trainable, opt_state, next(train), epoch)
        last = epoch + 1 == epochs
        if held_out is not None and ((epoch + 1) % config.eval.interval == 0 or last):
            record["eval"] = evaluate(pipe, trainable, held_out, f"epoch{epoch + 1:04d}")
            record["eval_reward"] = record["eval"]["reward"]
        history.append(record)
        if jax.process_index() == 0:
            with open(metrics_path, "a") as log:
                log.write(json.dumps(record) + "\n")
        interval = config.checkpoint.interval
        if interval and ((epoch + 1) % interval == 0 or last):
            checkpointer.save(epoch + 1, {"trainable": trainable, "opt_state": opt_state},
                              {"epoch": epoch + 1, "loader": train.state(), "config": config.to_json_best_effort()})
    summary = finish(pipe, trainable, history, resumed_from)
    return Runner(trainable, opt_state, history, summary)


def export_tree(merged) -> dict:
    """The LoRA-merged VLM as the family's text encoder: without the lm_head (the DiT reads hidden states)."""
    language = {name: tree for name, tree in merged["language_model"].items() if name != "lm_head"}
    return {**merged, "language_model": language}


def finish(pipe: Pipeline, trainable, history: list, resumed_from) -> dict:
    """The inference export (the merged VLM as the text encoder; the DiT and VAE are rebuilt from the config)
    and summary.json."""
    config = pipe.config
    merged = jax.jit(pipe.merge)(pipe.base, trainable)
    write_export(os.path.join(config.output_dir, "export"), config, base_params={"text_encoder": export_tree(merged)})
    evaluations = [{"epoch": r["epoch"] + 1, **r["eval"]} for r in history if "eval" in r]
    summary = {"epochs": len(history), "resumed_from": resumed_from, "export": "export", "evaluations": evaluations,
               "eval_reward_final": evaluations[-1]["reward"] if evaluations else None,
               "reward_mean_last": history[-1]["reward_mean"] if history else None}
    if jax.process_index() == 0:
        with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(config) -> Runner:
    """`python -m jax_inpaint_rl.train --config=...` with policy_kind='vlm' (train.POLICY_KINDS): join the
    multi-host run (config.distributed), train, then print the last epoch's record."""
    mesh_lib.initialize_distributed(config.distributed)
    runner = fit(config)
    print(json.dumps(runner.history[-1] if runner.history else {}, indent=2))
    return runner
