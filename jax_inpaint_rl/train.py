"""python -m jax_inpaint_rl.train --config=configs/<recipe>.py [--config.a.b=value ...]

The loop composes family x algorithm x reward x data: roll out with log-probs,
score on the host, compute group advantages, then run the algorithm's jitted
update over shuffled minibatches. GRPO, NFT, DPO and SFT share the update program;
only the objective differs.
"""
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from jax_inpaint_rl import programs, report
from jax_inpaint_rl.algorithms import advantages as adv_lib
from jax_inpaint_rl.algorithms import dpo, grpo, nft, objectives
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.algorithms.ema import ema_update
from jax_inpaint_rl.checkpoint.export import read_denoiser, write_export
from jax_inpaint_rl.checkpoint.manager import Checkpointer
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion.steps import STEP_FUNCTIONS, Sampler
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.parallel import partition
from jax_inpaint_rl.rewards.calculator import RewardCalculator
from jax_inpaint_rl.setup import build_family, build_loaders, build_reward

METHODS = ("grpo", "nft", "dpo", "sft")
RATIO_WARNING = 1e-3  # |ratio - 1| above this before any update means rollout and training disagree


def validate(config) -> None:
    """Reject bad values before anything is loaded or compiled."""
    checks = [
        (config.train.method in METHODS, f"train.method={config.train.method!r}: expected one of {METHODS}"),
        (config.sample.sampler in STEP_FUNCTIONS,
         f"sample.sampler={config.sample.sampler!r}: expected one of {sorted(STEP_FUNCTIONS)}"),
        (config.sample.images_per_prompt >= 1, "sample.images_per_prompt must be >= 1"),
        (config.train.minibatch_size >= 1, "train.minibatch_size must be >= 1"),
        (0 < config.train.timestep_fraction <= 1, "train.timestep_fraction must be in (0, 1]"),
        (config.train.nft_adv_mode in nft.ADV_MODES, f"train.nft_adv_mode: expected one of {nft.ADV_MODES}"),
        (config.advantage.std in ("batch", "group", "none"), "advantage.std: expected batch, group or none"),
    ]
    rl = config.train.use_rl and config.train.method != "sft"
    if rl:
        batch = (config.sample.prompts_per_batch * jax.process_count() * config.sample.images_per_prompt
                 * config.sample.batches_per_epoch)
        checks.append((config.sample.images_per_prompt >= 2,
                       "sample.images_per_prompt must be >= 2 for group-relative RL"))
        checks.append((batch % config.train.minibatch_size == 0 or config.train.method == "dpo",
                       f"train.minibatch_size={config.train.minibatch_size} must divide the rollout batch {batch}"))
    for ok, message in checks:
        if not ok:
            raise ValueError(f"config: {message}")
    trainable_lib.from_config(config.train)


def initial_state(trainable, optimizer, config, key) -> dict[str, Any]:
    """Everything a resume needs, as one pytree (the frozen base is rebuilt from the config)."""
    method, rl = config.train.method, config.train.use_rl and config.train.method != "sft"
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    state = {"params": trainable, "opt_state": optimizer.init(trainable),
             "grad_sum": jax.tree.map(jnp.zeros_like, trainable), "grad_count": jnp.zeros((), jnp.int32),
             "step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jnp.array(jax.random.key_data(key))}  # own buffer: donated
    if config.ema.enabled:
        state["ema"] = copy(trainable)
    if rl and method == "nft":
        state["old"] = copy(trainable)
    if rl and (method == "dpo" or config.train.kl_beta > 0):
        state["ref"] = copy(trainable)
    return state


def _split(state, count: int = 2):
    keys = jax.random.split(jax.random.wrap_key_data(state["rng"]), count + 1)
    return {**state, "rng": jax.random.key_data(keys[0])}, keys[1:]


def _repeat(batch: dict, times: int) -> dict:
    """Each prompt's example `times` times in a row (group-major), lists and nested dicts included."""
    def repeat(value):
        if isinstance(value, dict):
            return {k: repeat(v) for k, v in value.items()}
        if isinstance(value, list):
            return [v for v in value for _ in range(times)]
        return np.repeat(value, times, axis=0)

    return {name: repeat(value) for name, value in batch.items()}


def _global_rows(leaf) -> int:
    """Rows of the global batch: device arrays are global, host arrays one host's share."""
    rows = np.shape(leaf)[0]
    return rows if isinstance(leaf, jax.Array) else rows * jax.process_count()


def _take(tree, index):
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0), tree)


def _concat(trees):
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *trees)


class Run:
    """Holds the built pieces of one training run; `fit()` runs it."""

    def __init__(self, config, family=None, params=None, train_loader=None, eval_loader=None,
                 reward_fn: Callable | None = None):
        validate(config)
        self.config = config
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        if family is None:
            family, params = build_family(config)
        if config.checkpoint.init_from:  # start from a previous run's export (the seeds' initial adapter path)
            params = {**params, family.denoiser_key: read_denoiser(config.checkpoint.init_from,
                                                                   params[family.denoiser_key])}
        if train_loader is None:
            train_loader, eval_loader = build_loaders(config)
        self.family, self.train_loader, self.eval_loader = family, train_loader, eval_loader
        self.rewards = build_reward(config) if reward_fn is None else RewardCalculator({"custom": reward_fn},
                                                                                          {"custom": 1.0})
        self.reward_wait_s = self.reward_compute_s = 0.0  # scoring time waited for / spent (overlap saves the rest)
        self.mesh = mesh_lib.make_mesh({"data": config.mesh.data, "fsdp": config.mesh.fsdp,
                                        "tensor": config.mesh.tensor})
        self.replicated, self.sharded = mesh_lib.replicated(self.mesh), mesh_lib.batch_sharding(self.mesh)
        self._base_params = self._place({k: v for k, v in params.items() if k != family.denoiser_key})
        self.merge, denoiser_base, trainable = trainable_lib.build(
            config.train, params[family.denoiser_key], jax.random.fold_in(jax.random.key(config.seed), 1))
        self.denoiser_base = self._place(denoiser_base)
        _check_divisible(config, mesh_lib.data_parallel_size(self.mesh))
        resolution = config.data.resolution
        self.latent_shape = family.latent_shape(resolution, resolution)
        self.window_total = config.sample.num_steps
        rl_sampler = Sampler(config.sample.sampler, config.sample.noise_level)
        self.schedule = programs.make_schedule(family, config, config.sample.num_steps, self.latent_shape)
        self.policy = programs.make_policy(family, config, self.schedule, rl_sampler, config.sample.guidance_scale)
        self.encode = programs.make_encode(family)
        self.encode_image = programs.make_encode_image(family)
        self.decode = programs.make_decode(family)
        self.sample = programs.make_sample(self.policy, self.merge)
        self.sample_eval = self.sample  # the same program: evaluation only turns the SDE window off
        if config.sample.eval_num_steps != config.sample.num_steps:
            eval_schedule = programs.make_schedule(family, config, config.sample.eval_num_steps, self.latent_shape)
            self.sample_eval = programs.make_sample(programs.make_policy(
                family, config, eval_schedule, rl_sampler, config.sample.guidance_scale), self.merge)
        self.optimizer = programs.make_optimizer(config.train.learning_rate, config)
        self.accumulators, self.apply_step = {}, None
        state = initial_state(trainable, self.optimizer, config, jax.random.key(config.seed))
        if config.train.autoencoder_steps > 0:  # a fitted autoencoder is part of what a resume needs
            state["base"] = self._base_params
        self.state = self._place(state)
        self.history: list[dict] = []
        self.epoch = 0
        self.log = report.MetricLog(config.output_dir, enabled=jax.process_index() == 0)
        self.checkpointer = Checkpointer(os.path.join(config.output_dir, "checkpoints"), keep=config.checkpoint.keep)
        self._stop_requested = False
        self.resumed_from: int | None = None

    @property
    def frozen_params(self):
        """The non-trained components (VAE, text encoders), or their fitted copy in the state."""
        return self.state["base"] if "base" in self.state else self._base_params

    # ---------- programs ----------

    def accumulate_for(self, method: str):
        """The jitted gradient accumulation of `method`'s objective (built once per method)."""
        if method not in self.accumulators:
            self.accumulators[method] = programs.make_accumulate(
                self.policy, objectives.from_config(method, self.config.train), self.merge, self._state_sharding())
        return self.accumulators[method]

    def _state_sharding(self):
        return jax.tree.map(lambda a: a.sharding, self.state)

    def _micro_step(self, method: str, batch, apply: bool = True) -> dict:
        """Accumulate one micro-batch's gradient; step the optimizer when `apply` (end of an accumulation
        window) and the window added a finite gradient."""
        self.state, (key,) = _split(self.state, 1)
        self.state, metrics = self.accumulate_for(method)(self.state, self.denoiser_base, self._shard(batch), key)
        metrics = jax.device_get(metrics)
        if int(self.state["nonfinite"]) >= self.config.train.max_nonfinite_steps:
            self.save()
            raise FloatingPointError(
                f"{int(self.state['nonfinite'])} non-finite updates in a row (train.max_nonfinite_steps); "
                f"the last good state is saved in {self.checkpointer.directory}")
        if apply and int(self.state["grad_count"]) > 0:
            if self.apply_step is None:
                self.apply_step = programs.make_apply(self.optimizer, self.config.ema, self._state_sharding())
            self.state = self.apply_step(self.state)
        return metrics

    def _place(self, tree):
        """Parameters and train state on the mesh: fsdp / tensor splits by parameter path (parallel/partition.py)."""
        return jax.device_put(tree, partition.tree_shardings(tree, self.mesh, self.family.tensor_rules))

    def _shard(self, tree):
        """Per-sample arrays split over the data axes, anything else (e.g. the (T,) window) replicated.

        Host (NumPy) arrays are this host's rows of the global batch (each host
        reads its own shard); device arrays are already global. A batch that the
        data-parallel size does not divide (an eval set may be any size) is
        replicated on a single host; training sizes are checked at start-up."""
        leaves = jax.tree.leaves(tree)
        batch = max(_global_rows(leaf) for leaf in leaves if np.ndim(leaf))
        divides = batch % mesh_lib.data_parallel_size(self.mesh) == 0
        if not divides and jax.process_count() > 1:
            raise ValueError(f"a batch of {batch} rows does not split over {mesh_lib.data_parallel_size(self.mesh)} "
                             "data-parallel devices; with several hosts every batch (eval included) must")
        per_sample = self.sharded if divides else self.replicated

        def place(a):
            if not (np.ndim(a) and _global_rows(a) == batch):
                return jax.device_put(a, self.replicated)
            if isinstance(a, jax.Array):
                return jax.device_put(a, per_sample)
            return jax.make_array_from_process_local_data(per_sample, np.asarray(a))

        return jax.tree.map(place, tree)

    # ---------- data -> conditioning ----------

    def _condition(self, batch):
        family = self.family
        tokens = family.tokenize(batch["prompt"])
        negative = family.tokenize([""] * len(batch["prompt"]))
        tokens, negative, image, mask = self._shard((tokens, negative, np.asarray(batch["image"], np.float32),
                                                     np.asarray(batch["mask"], np.float32)))
        return self.encode(self.frozen_params, tokens, negative, image, mask), image, mask

    def _images(self, trajectory, image, mask) -> np.ndarray:
        """This host's composited results of a rollout, as uint8 (what rewards and grids see)."""
        decoded = self.decode(self.frozen_params, trajectory.latents[:, -1], image, mask)
        return report.to_uint8(mesh_lib.host_rows(decoded))

    # ---------- phases ----------

    def sft_step(self) -> dict:
        """One optimizer step of SFT: gradient_accumulation_steps micro-batches from the loader."""
        accumulate = self.config.train.gradient_accumulation_steps
        metrics = [self._sft_micro_step(apply=i == accumulate - 1) for i in range(accumulate)]
        return _mean_metrics(metrics)

    def _sft_micro_step(self, apply: bool) -> dict:
        batch = next(self.train_loader)
        cond, _, _ = self._condition(batch)
        x0 = self.encode_image(self.frozen_params, self._shard(np.asarray(batch["target"], np.float32)))
        train_batch = {"x0": x0, "cond": cond}
        image_cond = cond["positive"] if "positive" in cond else cond
        if "mask" in image_cond and jnp.ndim(image_cond["mask"]) == x0.ndim:
            train_batch["latent_mask"] = image_cond["mask"]
        return self._micro_step("sft", train_batch, apply)

    def _window(self, key) -> np.ndarray:
        s = self.config.sample
        if self.config.train.method in ("nft",):
            return np.zeros(self.window_total, np.float32)  # NFT samples with the deterministic solver
        if s.window_size <= 0:
            return rollout_lib.sde_window(self.window_total)
        start = int(jax.random.randint(key, (), 0, s.window_max_start + 1))
        return rollout_lib.sde_window(self.window_total, start, s.window_size)

    def collect(self) -> tuple[dict, dict]:
        """Roll out batches_per_epoch batches of k images per prompt; score them on the host."""
        s, family = self.config.sample, self.family
        sampling_params = self.state["old"] if self.config.train.method == "nft" else self.state["params"]
        pieces, pending, loader_valid = [], [], []
        self.rewards.take_busy_seconds()  # count this epoch's scoring only
        self.state, (window_key,) = _split(self.state, 1)
        window = self._window(window_key)
        for _ in tqdm(range(s.batches_per_epoch), desc=f"epoch {self.epoch} rollout", leave=False,
                      disable=s.batches_per_epoch < 2):
            batch = _repeat(next(self.train_loader), s.images_per_prompt)
            cond, image, mask = self._condition(batch)
            self.state, (noise_key, sde_key) = _split(self.state)
            x_init = rollout_lib.initial_noise(noise_key, s.prompts_per_batch * jax.process_count(),
                                               s.images_per_prompt, self.latent_shape, s.same_noise_per_group)
            trajectory = self.sample(self.denoiser_base, sampling_params, cond, self._shard(x_init), sde_key, window)
            images = self._images(trajectory, image, mask)
            # scored in a worker thread while the next batch is rolled out
            pending.append(self.rewards.submit(images, batch["prompt"], _reward_meta(batch)))
            pieces.append({"trajectory": trajectory, "cond": cond})
            loader_valid.append(np.asarray(batch.get("valid", np.ones(len(images), bool))))
        wait_start = time.time()
        scores = [future.result() for future in pending]
        self.reward_wait_s = time.time() - wait_start
        self.reward_compute_s = self.rewards.take_busy_seconds()
        parts = {name: np.concatenate([mesh_lib.all_hosts(score[name]) for score in scores])
                 for name in scores[0]}
        valid = np.concatenate([mesh_lib.all_hosts(v) for v in loader_valid]) & (parts.pop("valid") > 0)
        rewards = np.where(valid, parts.pop("score"), 0.0).astype(np.float32)
        return _concat(pieces), {"rewards": rewards, "valid": valid, "parts": parts, "window": window}

    def rl_epoch(self) -> dict:
        s, t, a = self.config.sample, self.config.train, self.config.advantage
        collected, scored = self.collect()
        trajectory, cond = collected["trajectory"], collected["cond"]
        num_groups = s.prompts_per_batch * jax.process_count() * s.batches_per_epoch
        group_ids = adv_lib.group_ids_for(num_groups, s.images_per_prompt)
        adv = adv_lib.group_advantages(jnp.asarray(scored["rewards"]), group_ids, num_groups,
                                       baseline="group" if a.per_prompt_stat_tracking else "batch", std=a.std,
                                       clip=t.adv_clip_max, valid=jnp.asarray(scored["valid"]),
                                       drop_zero_signal=a.drop_zero_signal)
        kept_rewards = scored["rewards"][scored["valid"]]
        record = {"reward_mean": kept_rewards.mean(), "reward_std": kept_rewards.std(),
                  "reward_wait_s": self.reward_wait_s, "reward_compute_s": self.reward_compute_s,
                  "invalid_samples": int((~scored["valid"]).sum()),
                  "advantage_abs_mean": float(jnp.abs(adv.advantages).mean()),
                  "kept_fraction": float(adv.keep.mean())}
        for name, values in scored["parts"].items():
            values = values[scored["valid"]]
            record[f"reward/{name}_mean"], record[f"reward/{name}_std"] = values.mean(), values.std()
        if t.method == "dpo":
            metrics = self._dpo_updates(trajectory, cond, scored["rewards"], num_groups)
        else:
            metrics = self._policy_updates(trajectory, cond, adv, scored["window"])
        record.update(metrics)
        if t.method == "nft":
            decay = nft.old_params_decay(self.epoch, t.nft_decay_type)
            self.state = {**self.state, "old": jax.jit(ema_update)(self.state["old"], self.state["params"], decay)}
        return record

    def _policy_updates(self, trajectory, cond, adv, window) -> dict:
        t = self.config.train
        batch_size = adv.advantages.shape[0]
        train_window = np.ones(self.window_total, np.float32) if t.method == "nft" else window
        per_update = []
        for inner in range(t.inner_epochs):
            self.state, (perm_key, step_key) = _split(self.state)
            perm = np.asarray(jax.random.permutation(perm_key, batch_size))
            step_index = grpo.train_step_indices(step_key, batch_size, train_window, t.timestep_fraction,
                                                 t.timestep_mode)
            starts = range(0, batch_size, t.minibatch_size)
            for number, start in enumerate(tqdm(starts, desc=f"epoch {self.epoch} update", leave=False)):
                idx = perm[start:start + t.minibatch_size]
                batch = {"latents": trajectory.latents[idx], "log_probs": trajectory.log_probs[idx],
                         "window": trajectory.window, "cond": _take(cond, idx),
                         "advantages": adv.advantages[idx], "weight": adv.keep[idx].astype(jnp.float32)}
                window_end = (number + 1) % t.gradient_accumulation_steps == 0 or number == len(starts) - 1
                columns = step_index.shape[1]
                for column in range(columns):  # gradients of every trained step are accumulated
                    metrics = self._micro_step(t.method, {**batch, "step_index": step_index[idx, column]},
                                                 apply=window_end and column == columns - 1)
                    if inner == 0 and start == 0 and t.method == "grpo":  # no update has happened yet
                        deviation = max(abs(metrics["ratio_max"] - 1), abs(metrics["ratio_min"] - 1))
                        metrics["first_ratio_deviation"] = deviation
                        if deviation > RATIO_WARNING:
                            logging.warning("ratio before any update deviates from 1 by %.2e: rollout and "
                                            "training log-probs disagree", deviation)
                    per_update.append(metrics)
        return _mean_metrics(per_update)

    def _dpo_updates(self, trajectory, cond, rewards, num_groups) -> dict:
        t, s = self.config.train, self.config.sample
        winner, loser, has = dpo.winner_loser(jnp.asarray(rewards), num_groups, s.images_per_prompt)
        clean = trajectory.latents[:, -1]
        per_update = []
        for _ in range(t.inner_epochs):
            self.state, (perm_key,) = _split(self.state, 1)
            perm = np.asarray(jax.random.permutation(perm_key, num_groups))
            starts = range(0, num_groups, t.minibatch_size)
            for number, start in enumerate(starts):
                pairs = perm[start:start + t.minibatch_size]
                batch = {"winner": clean[winner[pairs]], "loser": clean[loser[pairs]],
                         "cond": _take(cond, winner[pairs]), "weight": has[pairs].astype(jnp.float32)}
                window_end = (number + 1) % t.gradient_accumulation_steps == 0 or number == len(starts) - 1
                per_update.append(self._micro_step("dpo", batch, apply=window_end))
                if t.dpo_ref_update_interval > 0:
                    self.state = {**self.state, "ref": jax.jit(dpo.refresh_reference, static_argnums=3)(
                        self.state["ref"], self.state["params"], self.state["step"], t.dpo_ref_update_interval)}
        return _mean_metrics(per_update)

    # ---------- evaluation, checkpoints ----------

    def evaluate(self, tag: str) -> float:
        """Deterministic sampling on the held-out set; writes a PNG grid; returns the mean reward."""
        params = self.state["ema"] if "ema" in self.state else self.state["params"]
        window = np.zeros(self.config.sample.eval_num_steps, np.float32)
        scores, grid_rows = [], []
        for index in range(self.eval_loader.steps_per_epoch):
            batch = self.eval_loader.batch_at(0, index)
            cond, image, mask = self._condition(batch)
            x_init = jax.random.normal(jax.random.key(self.config.seed + 7919),
                                       (len(batch["prompt"]) * jax.process_count(), *self.latent_shape))
            trajectory = self.sample_eval(self.denoiser_base, params, cond, self._shard(x_init), jax.random.key(0),
                                          window)
            images = self._images(trajectory, image, mask)
            result = self.rewards(images, batch["prompt"], _reward_meta(batch))
            valid = np.asarray(batch.get("valid", np.ones(len(images), bool))) & (result["valid"] > 0)
            scores.append(mesh_lib.all_hosts(result["score"])[mesh_lib.all_hosts(valid)])
            for i in range(len(images)):
                if len(grid_rows) < self.config.eval.num_grid:
                    grid_rows.append([report.to_uint8(batch["image"][i]), report.to_uint8(batch["mask"][i] * 2 - 1),
                                      images[i], report.to_uint8(batch["target"][i])])
        if jax.process_index() == 0 and grid_rows:
            report.save_grid(os.path.join(self.config.output_dir, f"eval_{tag}.png"), grid_rows,
                             ["source", "mask", "result", "target"])
        return float(np.concatenate(scores).mean())

    def save(self) -> None:
        """Checkpoint at the update-step count; a state already saved at that count is not saved again
        (non-finite updates leave params and optimizer unchanged, so it is the same good state)."""
        step = int(self.state["step"])
        if self.checkpointer.latest_step() == step:
            return
        meta = {"epoch": self.epoch, "train_loader": self.train_loader.state(), "history": self.history}
        self.checkpointer.save(step, self.state, meta)
        self.checkpointer.wait()

    def maybe_resume(self) -> bool:
        step = self.checkpointer.latest_step() if self.config.checkpoint.resume else None
        if step is None:
            return False
        self.state, meta = self.checkpointer.restore(step, self.state)
        self.resumed_from = step
        self.epoch, self.history = meta["epoch"], meta["history"]
        self.train_loader.restore(meta["train_loader"])
        logging.warning("resumed from %s step %d (epoch %d)", self.checkpointer.directory, step, self.epoch)
        return True

    # ---------- the loop ----------

    def fit(self) -> dict:
        c = self.config
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        try:
            resumed = self.maybe_resume()
            summary = {}
            if not resumed:
                self._fit_autoencoder()
                self._warmup()
                summary["eval_reward_after_warmup"] = self.evaluate("after_warmup")
                self.history.append({"step": int(self.state["step"]), "eval_reward": summary["eval_reward_after_warmup"]})
            rl = c.train.use_rl and c.train.method != "sft"
            for epoch in tqdm(range(self.epoch, c.train.num_epochs), desc="epochs", initial=self.epoch,
                              total=c.train.num_epochs):
                self.epoch = epoch
                start = time.time()
                record = self.rl_epoch() if rl else _mean_metrics([self.sft_step()
                                                                   for _ in range(c.sample.batches_per_epoch)])
                record["epoch_time_s"] = time.time() - start
                if rl:
                    images = c.sample.prompts_per_batch * jax.process_count() * c.sample.images_per_prompt
                    record["images_per_s"] = images * c.sample.batches_per_epoch / record["epoch_time_s"]
                record["learning_rate"] = c.train.learning_rate
                record["skipped_updates"] = int(self.state["skipped"])
                self.epoch = epoch + 1
                if self.epoch % c.eval.interval == 0 or self.epoch == c.train.num_epochs:
                    record["eval_reward"] = self.evaluate(f"epoch{self.epoch:04d}")
                step = int(self.state["step"])
                self.history.append({"step": step, **{k: float(v) for k, v in record.items()
                                                      if k in ("reward_mean", "eval_reward")}})
                self.log.write(step, record)
                if self.epoch % c.checkpoint.interval == 0 or self.epoch == c.train.num_epochs or self._stop_requested:
                    self.save()
                if self._stop_requested:
                    logging.warning("SIGTERM: saved step %d and stopping", step)
                    break
            summary["eval_reward_final"] = next((h["eval_reward"] for h in reversed(self.history)
                                                 if "eval_reward" in h), float("nan"))
            merge = jax.jit(self.merge)
            merged = {name: merge(self.denoiser_base, self.state[name]) for name in ("params", "ema")
                      if name in self.state}
            write_export(os.path.join(c.output_dir, "export"), c, merged["params"], merged.get("ema"),
                         self.state.get("base"))
            if jax.process_index() == 0:
                report.save_reward_curve(os.path.join(c.output_dir, "reward_curve.png"), self.history)
                with open(os.path.join(c.output_dir, "summary.json"), "w") as f:
                    json.dump(summary, f, indent=2)
            return summary
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            self.checkpointer.close()
            self.rewards.close()
            self.log.close()

    def _fit_autoencoder(self) -> None:
        """Tiny models start from random weights, VAE included: fit it as an autoencoder on the training
        images first (latents kept near unit scale), so rewards computed on decoded pixels mean something."""
        steps = self.config.train.autoencoder_steps
        if steps <= 0:
            return
        optimizer = optax.adam(self.config.train.autoencoder_learning_rate)
        family = self.family

        def loss_fn(frozen, images):
            latents = family.encode_image(frozen, images)
            reconstruction = jnp.mean((family.decode(frozen, latents) - images) ** 2)
            return reconstruction + 0.1 * (jnp.std(latents) - 1.0) ** 2, reconstruction

        @jax.jit
        def fit_step(frozen, opt_state, images):
            (_, reconstruction), grads = jax.value_and_grad(loss_fn, has_aux=True)(frozen, images)
            updates, opt_state = optimizer.update(grads, opt_state, frozen)
            return optax.apply_updates(frozen, updates), opt_state, reconstruction

        frozen, opt_state = self.state["base"], optimizer.init(self.state["base"])
        for step in tqdm(range(steps), desc="autoencoder fit"):
            batch = next(self.train_loader)
            images = self._shard(np.concatenate([batch["image"], batch["target"]]).astype(np.float32))
            frozen, opt_state, reconstruction = fit_step(frozen, opt_state, images)
            if step % 50 == 0 or step == steps - 1:
                self.log.write(step, {"autoencoder/reconstruction_mse": float(reconstruction)})
        self.state = {**self.state, "base": frozen}

    def _warmup(self) -> None:
        steps = self.config.train.warmup_steps
        for _ in tqdm(range(steps), desc="SFT warm-up", disable=steps == 0):
            metrics = self.sft_step()
            self.log.write(int(self.state["step"]), {f"warmup/{k}": v for k, v in metrics.items()})

    def _request_stop(self, signum, frame) -> None:
        del signum, frame
        self._stop_requested = True


def _check_divisible(config, data_parallel: int) -> None:
    """Every sharded batch must split evenly over the data-parallel devices (prompts_per_batch is per host)."""
    s = config.sample
    sizes = {"train.minibatch_size": config.train.minibatch_size,
             "sample.prompts_per_batch * hosts * sample.images_per_prompt":
                 s.prompts_per_batch * jax.process_count() * s.images_per_prompt}
    for name, size in sizes.items():
        if size % data_parallel:
            raise ValueError(f"config: {name}={size} must be a multiple of the {data_parallel} data-parallel devices")


def _reward_meta(batch: dict) -> dict:
    """The loader's fields under the names rewards read (images as uint8)."""
    meta = {"mask": batch["mask"], "source": report.to_uint8(batch["image"])}
    if "target" in batch:
        meta["reference"] = report.to_uint8(batch["target"])
    if "target_text" in batch:
        meta["target_text"] = batch["target_text"]
    return meta


def _mean_metrics(records: list[dict]) -> dict:
    if not records:
        return {}
    merged = {k: float(np.mean([r[k] for r in records if k in r])) for k in set().union(*records)}
    for extreme, fn in (("ratio_min", min), ("ratio_max", max)):
        if extreme in merged:
            merged[extreme] = float(fn(r[extreme] for r in records))
    return merged


_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py", lock_config=True)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # progress is tqdm; orbax logs every save at INFO
    mesh_lib.initialize_distributed(_CONFIG.value.distributed)
    summary = Run(_CONFIG.value).fit()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
