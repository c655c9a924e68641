"""The trainer end to end on the toy family: every algorithm runs, learns, checkpoints and resumes."""
import dataclasses
import json
import os
import re
import signal
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from jax_inpaint_rl import algorithms, programs, report, rewards, setup, train
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.rewards import serve
from jax_inpaint_rl.trainer import checkpoints, update
from jax_inpaint_rl.trainer.run import build
from tests import toy_family

RES = 16


class ListLoader:
    """In-memory stand-in with the data Loader's interface (iterator, state / restore, batch_at, fields)."""

    def __init__(self, examples, batch_size, seed=0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.steps_per_epoch = -(-len(examples) // batch_size)
        self.position = 0
        self.name = "list"
        self.fields = frozenset(examples[0])

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        for _ in range(self.batch_size):
            epoch, index = divmod(self.position, len(self.examples))
            rows.append(self.examples[np.random.default_rng(self.seed + epoch).permutation(len(self.examples))[index]])
            self.position += 1
        return _stack(rows)

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]

    def batch_at(self, epoch, index):
        return _stack(self.examples[index * self.batch_size:(index + 1) * self.batch_size])


def _stack(rows):
    return {k: ([r[k] for r in rows] if isinstance(rows[0][k], str) else np.stack([r[k] for r in rows]))
            for k in rows[0]}


COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def make_examples(count, seed):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        name = list(COLOURS)[i % 3]
        image = rng.uniform(-1, 1, (RES, RES, 3)).astype(np.float32) * 0.2
        mask = np.zeros((RES, RES, 1), np.float32)
        y, x = rng.integers(0, RES // 2, 2)
        mask[y:y + RES // 2, x:x + RES // 2] = 1
        target = np.where(mask > 0, np.asarray(COLOURS[name], np.float32), image)
        examples.append({"prompt": f"fill with {name}", "image": image, "mask": mask, "target": target,
                         "target_text": name})
    return examples


def colour_reward(images, prompts, meta):
    """Closeness of the masked region to the prompt's colour (pixels in uint8)."""
    scores = []
    for image, prompt, mask in zip(images, prompts, meta["mask"]):
        want = (np.asarray(COLOURS[prompt.split()[-1]]) + 1) * 127.5
        inside = image.astype(np.float32)[mask[..., 0] > 0.5]
        scores.append(1.0 - np.abs(inside - want).mean() / 255.0)
    return {"score": np.asarray(scores, np.float32)}


def make_config(tmp_path, method="grpo", **overrides):
    """The base recipe cut to the toy size; overrides as section__field=value."""
    c = base.get_config()
    c.output_dir = str(tmp_path / method)
    c.data.resolution = RES
    c.sample.num_steps = 4
    c.sample.eval_num_steps = 4
    c.sample.images_per_prompt = 4
    c.sample.prompts_per_batch = 2
    c.sample.guidance_scale = 1.0
    c.train.method = method
    c.train.num_epochs = 2
    c.train.minibatch_size = 8
    c.train.learning_rate = 3e-3
    c.mesh.data = 1
    c.eval.interval = 1
    c.checkpoint.interval = 1
    c.data.resolution = RES
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def loaders_for(config, eval_examples=6, drop=()):
    """Train, held-out and SFT loaders over the toy examples, without the fields in `drop`."""
    def examples(count, seed):
        return [{k: v for k, v in e.items() if k not in drop} for e in make_examples(count, seed)]

    return {"train": ListLoader(examples(12, 0), config.sample.prompts_per_batch),
            "eval": ListLoader(examples(eval_examples, 1), eval_examples),
            "sft": ListLoader(examples(12, 0), config.train.minibatch_size, seed=1)}


def run(config, prediction="velocity", seed=0, eval_examples=6, drop=(), reward_fn=colour_reward):
    family, params = toy_family.tiny(seed=seed, resolution=RES, prediction=prediction)
    finished = train.fit(config, family=family, params=params, loaders=loaders_for(config, eval_examples, drop),
                         reward_fn=reward_fn)
    return finished, finished.summary


@pytest.mark.parametrize("method,prediction,sampler", [
    ("grpo", "velocity", "flow_grpo"), ("grpo_one_step", "velocity", "flow_grpo"), ("nft", "velocity", "flow_grpo"),
    ("dpo", "velocity", "flow_grpo"), ("sft", "velocity", "flow_grpo"), ("grpo", "epsilon", "ddim"),
    ("nft", "epsilon", "ddim"),
])
def test_every_method_runs_and_logs(tmp_path, method, prediction, sampler):
    config = make_config(tmp_path, method, sample__sampler=sampler, train__warmup_steps=1,
                         train__minibatch_size=2 if method == "dpo" else 8, grpo__kl_beta=0.01, nft__kl_beta=0.01)
    runner, summary = run(config, prediction)
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    assert any("eval_reward" in line for line in lines)
    assert np.isfinite(summary["eval_reward_final"])
    assert os.path.exists(os.path.join(config.output_dir, "reward_curve.png"))
    assert os.path.exists(os.path.join(config.output_dir, "eval_after_warmup.png"))
    assert int(runner.state["skipped"]) == 0
    assert int(runner.state["step"]) >= 3  # the warm-up step and at least one update per epoch
    if method in ("grpo", "grpo_one_step"):
        first = [line for line in lines if "first_ratio_deviation" in line][0]
        # on-policy before any update: rollout and update are two compiled programs, so the
        # log-probs may differ by float rounding only (the core test checks exact equality)
        assert first["first_ratio_deviation"] < 1e-6


def test_bad_config_values_fail_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="train.method='ppo'"):
        algorithms.from_config(make_config(tmp_path, "ppo"))
    # every field with a known range or set, in one table: each bad value named, all at once
    config = make_config(tmp_path, "grpo", sample__images_per_prompt=1, eval__interval=0, checkpoint__interval=0,
                         train__max_nonfinite_steps=0, data__format="bogus", mesh__fsdp=0, model__attention="flash",
                         sample__strength=0.0)
    with pytest.raises(ValueError) as error:
        setup.validate(config, algorithms.from_config(config))
    for expected in ("sample.images_per_prompt=1: expected >= 2", "eval.interval=0: expected >= 1",
                     "checkpoint.interval=0: expected >= 1", "train.max_nonfinite_steps=0: expected >= 1",
                     "data.format='bogus': expected one of", "mesh.fsdp=0: expected -1",
                     "model.attention='flash': expected one of", "sample.strength=0.0: expected in (0, 1]"):
        assert expected in str(error.value)
    config = make_config(tmp_path, "grpo", sample__strength=0.5)
    with pytest.raises(ValueError, match="sample.strength=0.5 starts from the noised source, which model.family="):
        setup.check_family(config, toy_family.tiny(seed=0, resolution=RES)[0], algorithms.from_config(config))
    config = make_config(tmp_path, "grpo", model__compute_dtype="float16")
    with pytest.raises(ValueError, match="float16 overflows .* use 'bfloat16'"):
        setup.validate(config, algorithms.from_config(config))
    for method, field, value in (("nft", "nft__decay_type", "3"), ("grpo", "grpo__kl_mode", "anchor"),
                                 ("dpo", "dpo__beta", 0.0)):
        with pytest.raises(ValueError, match=field.replace("__", ".")):
            algorithms.from_config(make_config(tmp_path, method, **{field: value}))
    with pytest.raises(ValueError, match="model.family='flux_schnell'"):
        setup.build_family(make_config(tmp_path, "grpo", model__family="flux_schnell"))
    with pytest.raises(ValueError, match="model.path is empty"):
        setup.build_family(make_config(tmp_path, "grpo", model__family="flux_fill"))
    with pytest.raises(FileNotFoundError, match="model.path=/no/such/dir"):
        setup.build_family(make_config(tmp_path, "grpo", model__family="flux_fill", model__path="/no/such/dir"))
    family, _ = toy_family.tiny(prediction="epsilon")
    config = make_config(tmp_path, "grpo")
    with pytest.raises(ValueError, match="sample.sampler='flow_grpo' steps velocity predictions; .* predicts epsilon"):
        setup.check_family(config, family, algorithms.from_config(config))
    config = make_config(tmp_path, "grpo", sample__sampler="ddim", grpo__kl_beta=0.1, grpo__kl_mode="flow_grpo")
    with pytest.raises(ValueError, match="kl_mode='flow_grpo' divides by the flow SDE"):
        setup.check_family(config, family, algorithms.from_config(config))


def test_data_without_targets_trains_rl_and_refuses_sft(tmp_path):
    """Seed 001's JSONL has no target: RL and evaluation run (the grid has no target column); SFT, the warm-up
    and one-step GRPO stop before anything compiles, naming the missing field."""
    runner, summary = run(make_config(tmp_path, "grpo"), drop=("target",), reward_fn=colour_reward)
    assert np.isfinite(summary["eval_reward_final"])
    from PIL import Image

    grid = Image.open(os.path.join(tmp_path / "grpo", "eval_after_warmup.png"))
    columns, cell = 2, report.CELL // RES * RES  # source with the mask outlined | result (report.save_grid)
    assert grid.size[0] == columns * (cell + report.PAD) + report.PAD
    for method, overrides, who in [("sft", {}, "train.method='sft' needs it"),
                                   ("grpo", {"train__warmup_steps": 2}, "SFT warm-up"),
                                   ("grpo_one_step", {}, "train.method='grpo_one_step' needs it")]:
        with pytest.raises(ValueError, match=f"no 'target' in every example .*{who}"):
            run(make_config(tmp_path / method, method, **overrides), drop=("target",))


def test_data_is_checked_before_any_weight_is_loaded(tmp_path, monkeypatch):
    """An edit set (no masks) for an inpainting family fails naming the field, before the weights are read."""
    config = make_config(tmp_path, "grpo", model__family="sd15_inpaint", model__tiny=True, sample__sampler="ddim")
    loading = []
    real_build_family = setup.build_family
    monkeypatch.setattr(setup, "build_family", lambda config, embeddings=frozenset(), weights=True: (
        loading.append(weights) or real_build_family(config, embeddings, weights)))
    loaders = loaders_for(config, drop=("mask",))
    with pytest.raises(ValueError, match="no 'mask' in every example .*model.family='sd15_inpaint' reads it"):
        build(config, loaders=loaders, reward_fn=colour_reward)
    assert loading == [False]  # only the configs were read


def test_one_step_grpo_collects_without_a_rollout(tmp_path):
    """Seed 000's one-step GRPO: its collection program holds no scan, two denoiser calls per sample, and each
    group shares x_j and step j while the k stochastic steps differ."""
    config = make_config(tmp_path, "grpo_one_step")
    family, params = toy_family.tiny(seed=0, resolution=RES)
    calls = []
    counted = dataclasses.replace(family, denoise=lambda *a: calls.append(1) or family.denoise(*a))
    algorithm = algorithms.from_config(config)
    policy = programs.make_policy(counted, counted.schedule(4, (4, 4, 3)), Sampler("flow_grpo", 0.7), 1.0)
    program = algorithm.sampler(policy, programs.FULL)
    k, groups = config.sample.images_per_prompt, 2
    cond = {"positive": {"text": jnp.ones((k * groups, 8)), "masked": jnp.zeros((k * groups, 4, 4, 3)),
                         "mask": jnp.zeros((k * groups, 4, 4, 1))}}
    cond["negative"] = cond["positive"]
    x0 = jnp.repeat(jax.random.normal(jax.random.key(0), (groups, 4, 4, 3)), k, axis=0)
    args = ({}, params["denoiser"], cond, {"x0": x0}, jax.random.key(1), jnp.asarray([0.0, 1.0, 1.0, 1.0]))
    jaxpr = jax.make_jaxpr(program)(*args)
    assert "scan" not in str(jaxpr) and "while" not in str(jaxpr)
    assert len(calls) == 2
    transition, estimate = program(*args)
    step = np.asarray(transition["step_index"]).reshape(groups, k)
    assert (step == step[:, :1]).all() and set(step.ravel()) <= {1, 2, 3}
    x = np.asarray(transition["x"]).reshape(groups, k, -1)
    np.testing.assert_array_equal(x, np.broadcast_to(x[:, :1], x.shape))
    assert np.all(np.std(np.asarray(transition["x_next"]).reshape(groups, k, -1), axis=1) > 0)
    assert estimate.shape == x0.shape and np.all(np.isfinite(np.asarray(transition["log_prob"])))


@pytest.mark.parametrize("decay_type", ["0", "copy"])
def test_nft_old_params_follow_the_decay_type(tmp_path, decay_type):
    """Seed 004's type 0 keeps the old model fixed; 'copy' (DiffusionNFT's code) makes it the learner's."""
    runner, _ = run(make_config(tmp_path, "nft", nft__decay_type=decay_type, train__num_epochs=2))
    initial = toy_family.tiny(seed=0, resolution=RES)[1]["denoiser"]
    chex.assert_trees_all_equal(runner.state["old"], initial if decay_type == "0" else runner.state["params"])


def test_an_algorithm_of_your_own_plugs_in_by_name(tmp_path):
    """train.method='module:make' runs an algorithm defined outside the library, with no other change."""
    runner, summary = run(make_config(tmp_path, "tests.custom_algorithm:make"))
    assert np.isfinite(summary["eval_reward_final"]) and int(runner.state["step"]) == 2
    lines = [json.loads(line) for line in open(os.path.join(runner.config.output_dir, "metrics.jsonl"))]
    assert all("reward_weighted_sft" in line for line in lines if "reward_mean" in line)


def test_max_train_steps_and_step_based_checkpoints(tmp_path):
    """The seeds count in optimizer steps: the run stops at the end of the epoch that reaches max_train_steps and
    saves every checkpoint.interval steps."""
    config = make_config(tmp_path, "grpo", train__num_epochs=20, train__minibatch_size=4, train__max_train_steps=5,
                         checkpoint__interval=4, checkpoint__keep=5)
    runner, _ = run(config)
    assert int(runner.state["step"]) == 6 and runner.epoch == 3  # 2 steps per epoch
    saved = sorted(int(d) for d in os.listdir(os.path.join(config.output_dir, "checkpoints")) if d.isdigit())
    assert saved == [4, 6]


def test_non_finite_updates_stop_the_run_and_point_at_the_last_good_checkpoint(tmp_path):
    """Non-finite losses are skipped (params untouched) and, at train.max_nonfinite_steps in a row, stop the run;
    the state that produces them is not saved: the latest checkpoint is the last good state."""
    config = make_config(tmp_path, "tests.custom_algorithm:make_diverging", train__max_nonfinite_steps=2,
                         train__warmup_steps=2, checkpoint__interval=1)
    with pytest.raises(update.NonFiniteUpdates, match=r"2 non-finite updates in a row \(train.max_nonfinite_steps=2\) "
                                                      r"in rl step 1; checkpoint 2 in .* is the last good state"):
        run(config)
    assert sorted(int(d) for d in os.listdir(os.path.join(config.output_dir, "checkpoints")) if d.isdigit()) == [1, 2]


LORA_W12 = {("w1", "lora_a"), ("w1", "lora_b"), ("w2", "lora_a"), ("w2", "lora_b")}


@pytest.mark.parametrize("mode,patterns,trained", [
    ("lora", {"lora_pattern": "/w[12]$"}, LORA_W12),
    ("subset", {"trainable_pattern": "/(w3|b3)$"}, {("w3",), ("b3",)}),
    ("subset+lora", {"trainable_pattern": "/(w3|b3)$", "lora_pattern": "/w[12]$"}, LORA_W12 | {("w3",), ("b3",)}),
])
def test_lora_and_subset_train_only_their_parameters(tmp_path, mode, patterns, trained):
    from flax import traverse_util

    from jax_inpaint_rl.checkpoint.export import read_denoiser

    config = make_config(tmp_path / mode, "grpo", train__trainable=mode,
                         **{f"train__{name}": pattern for name, pattern in patterns.items()}, train__lora_rank=4, train__lora_alpha=8.0, grpo__kl_beta=0.01, ema__enabled=True,
                         ema__decay=0.5)
    runner, _ = run(config)
    state, initial = runner.state, toy_family.tiny(seed=0, resolution=RES)[1]["denoiser"]
    assert set(traverse_util.flatten_dict(state["params"])) == trained
    trained_size = sum(leaf.size for leaf in jax.tree.leaves(state["params"]))
    moments = [leaf for leaf in jax.tree.leaves(state["opt_state"]) if leaf.ndim]
    assert sum(leaf.size for leaf in moments) == 2 * trained_size  # Adam state for the trainable part only
    for got, want in zip(jax.tree.leaves(runner.denoiser_base), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(got, want)  # the base never moves
    if "lora" in mode:  # the reference is the base: adapters with B = 0
        for name in ("w1", "w2"):
            assert not np.any(np.asarray(state["ref"][name]["lora_b"]))
            assert np.any(np.asarray(state["params"][name]["lora_b"]))
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    assert [line for line in lines if "first_ratio_deviation" in line][0]["first_ratio_deviation"] < 1e-6
    exported = read_denoiser(os.path.join(config.output_dir, "export"), initial, use_ema=True)
    merged = runner.merge(runner.denoiser_base, state["ema"])
    for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(merged)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _final_params(runner):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(runner.state["params"])]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """A run killed with SIGKILL after its second checkpoint resumes to the same params as an unbroken run."""
    import signal
    import subprocess
    import sys
    import time

    straight, _ = run(make_config(tmp_path / "straight", "grpo", train__num_epochs=4))
    config = make_config(tmp_path / "killed", "grpo", train__num_epochs=40)
    script = (
        "import sys, json; sys.path.insert(0, '.')\n"
        "import ml_collections\n"
        "from tests import test_train as T\n"
        f"c = ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n"
        "T.run(c)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = os.path.join(config.output_dir, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [d for d in os.listdir(checkpoints)] if os.path.isdir(checkpoints) else []
        if sum(d.isdigit() for d in done) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    config.train.num_epochs = 4
    resumed, _ = run(config)
    assert resumed.resumed_from is not None and resumed.epoch == 4
    for a, b in zip(_final_params(straight), _final_params(resumed)):
        np.testing.assert_array_equal(a, b)


class SignalAfter(ListLoader):
    """A loader that sends this process SIGTERM as it hands out its `calls`-th batch."""

    def __init__(self, loader, calls):
        super().__init__(loader.examples, loader.batch_size, loader.seed)
        self.calls = calls

    def __next__(self):
        self.calls -= 1
        if self.calls == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


PHASED = dict(train__autoencoder_steps=3, train__warmup_steps=3, train__num_epochs=2)


@pytest.mark.parametrize("phase,loader,calls", [("autoencoder", "train", 2), ("warmup", "sft", 2),
                                                ("rl", "train", 4)])
def test_sigterm_in_every_phase_saves_stops_and_resumes_bit_identically(tmp_path, phase, loader, calls):
    """SIGTERM stops at the next step boundary of the phase it hits (autoencoder fit, warm-up, RL), saves, exits
    without final artefacts; the same command continues there and ends where an unbroken run ends."""
    straight, _ = run(make_config(tmp_path / "straight", "grpo", **PHASED))
    config = make_config(tmp_path / "stopped", "grpo", **PHASED)
    family, params = toy_family.tiny(seed=0, resolution=RES)
    loaders = loaders_for(config)
    loaders[loader] = SignalAfter(loaders[loader], calls)
    with pytest.raises(checkpoints.Stopped, match=f"SIGTERM: saved {phase} step"):
        train.fit(config, family=family, params=params, loaders=loaders, reward_fn=colour_reward)
    assert not os.path.exists(os.path.join(config.output_dir, "export"))
    assert not os.path.exists(os.path.join(config.output_dir, "summary.json"))
    assert [d for d in os.listdir(os.path.join(config.output_dir, "checkpoints")) if d.isdigit()]
    resumed, summary = run(config)
    assert resumed.resumed_from is not None and "eval_reward_after_warmup" in summary
    chex.assert_trees_all_equal(resumed.state["params"], straight.state["params"])
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    rl_steps = [line["step"] for line in lines if line["phase"] == "rl"]
    assert rl_steps == sorted(set(rl_steps)) and len(rl_steps) == 2  # nothing logged twice


def test_the_stopped_exit_status_is_distinct(tmp_path, monkeypatch):
    """`python -m jax_inpaint_rl.train` ends a stopped run with 143 (128 + SIGTERM), not 0."""
    monkeypatch.setattr(train, "_CONFIG", types.SimpleNamespace(value=make_config(tmp_path, "grpo")))
    monkeypatch.setattr(train, "fit", lambda config: (_ for _ in ()).throw(checkpoints.Stopped("SIGTERM: saved")))
    with pytest.raises(SystemExit) as exit_info:
        train.main([])
    assert exit_info.value.code == checkpoints.STOPPED_EXIT_STATUS == 143


def test_resume_refuses_a_config_it_cannot_continue_and_keeps_every_config(tmp_path):
    config = make_config(tmp_path, "grpo", train__num_epochs=1)
    run(config)
    before = open(os.path.join(config.output_dir, "config.json")).read()
    for changes, named in (({"train__method": "nft"}, "train.method: 'grpo' -> 'nft'"),
                           ({"data__resolution": 32}, "data.resolution: 16 -> 32"),
                           ({"train__lora_rank": 4, "train__trainable": "lora"}, "train.trainable: 'full' -> 'lora'")):
        changed = make_config(tmp_path, "grpo", train__num_epochs=1, **changes)
        with pytest.raises(ValueError, match=f"(?s)cannot resume with these changes:\n.*{re.escape(named)}"):
            run(changed)
        assert open(os.path.join(config.output_dir, "config.json")).read() == before  # nothing written
    longer, _ = run(make_config(tmp_path, "grpo", train__num_epochs=2, eval__interval=2))  # allowed changes
    assert longer.resumed_from is not None and longer.epoch == 2
    assert sorted(os.listdir(os.path.join(config.output_dir, "configs"))) == ["000.json", "001.json"]


def test_one_run_at_a_time_in_an_output_folder(tmp_path):
    config = make_config(tmp_path, "grpo")
    family, params = toy_family.tiny(seed=0, resolution=RES)
    first = build(config, family=family, params=params, loaders=loaders_for(config), reward_fn=colour_reward)
    try:
        with pytest.raises(RuntimeError, match=f"{re.escape(config.output_dir)} is in use by process {os.getpid()}"):
            build(config, family=family, params=params, loaders=loaders_for(config), reward_fn=colour_reward)
    finally:
        first.close()
    build(config, family=family, params=params, loaders=loaders_for(config), reward_fn=colour_reward).close()


def test_metric_lines_are_json_with_a_phase(tmp_path):
    log = report.MetricLog(str(tmp_path))
    log.write(3, {"loss": float("nan"), "reward": 0.5}, phase="warmup")
    log.close()
    line = json.loads(open(tmp_path / "metrics.jsonl").read(), parse_constant=lambda token: pytest.fail(token))
    assert line == {"step": 3, "phase": "warmup", "loss": None, "reward": 0.5}


def test_a_remote_reward_trains_and_evaluates_through_a_whole_run(tmp_path):
    """The remote reward on a localhost server, grouped by images_per_prompt in rollouts and one image per group
    in evaluation (meta['group'])."""
    server = serve.make_server(rewards.get_reward("reference_similarity"), "similarity", "127.0.0.1", 0).start()
    try:
        config = make_config(tmp_path, "grpo", train__num_epochs=1)
        config.reward.specs = {"remote": {"reward": "remote", "weight": 1.0,
                                          "config": {"url": server.url, "group_size": 4}}}
        family, params = toy_family.tiny(seed=0, resolution=RES)
        finished = train.fit(config, family=family, params=params, loaders=loaders_for(config))
    finally:
        server.stop()
    assert np.isfinite(finished.summary["eval_reward_final"]) and int(finished.state["step"]) >= 1


def test_eight_devices_give_the_single_device_run(tmp_path):
    """Same config and seed on 1 device, an 8-device data mesh and a 2x2x2 data x fsdp x tensor mesh: same
    metrics and params (fp32 tolerance), with the parameters really split."""
    meshes = {"one": dict(mesh__data=1), "data8": dict(mesh__data=8),
              "data2_fsdp2_tensor2": dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)}
    results = {}
    for name, mesh in meshes.items():
        config = make_config(tmp_path / name, "grpo", grpo__kl_beta=0.01, train__num_epochs=1, **mesh)
        runner, _ = run(config, eval_examples=8)
        lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
        results[name] = (runner, lines)
    one, one_lines = results.pop("one")
    assert len(results["data8"][0].state["params"]["w1"].sharding.device_set) == 8
    split = results["data2_fsdp2_tensor2"][0].state
    assert split["params"]["w1"].sharding.spec == P("fsdp", "tensor")  # toy rule: w1 splits its outputs
    assert split["params"]["w2"].sharding.spec == P("tensor", "fsdp")  # w2 its inputs
    assert split["opt_state"][1][0].mu["w2"].sharding.spec == P("tensor", "fsdp")
    for name, (runner, lines) in results.items():
        for a, b in zip(one_lines, lines):
            assert a.keys() == b.keys()
            for key in a:
                if key == "phase":
                    assert a[key] == b[key]
                elif not key.endswith("_s"):  # wall-clock timings differ run to run
                    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=f"{name}: {key}")
        # the updates agree as a whole; one entry alone may not: Adam divides each gradient entry by its own
        # magnitude, so an entry whose gradient is ~1e-8 turns reduction-order rounding into a visible step
        initial = jax.tree.leaves(toy_family.tiny(seed=0, resolution=RES)[1]["denoiser"])
        for start, a, b in zip(initial, _final_params(one), _final_params(runner)):
            update_one, update_other = a - np.asarray(start), b - np.asarray(start)
            assert np.linalg.norm(update_other - update_one) <= 1e-3 * np.linalg.norm(update_one), name
            assert np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-6)) > 0.99, name


def test_offloaded_text_encoders_stay_on_the_host_and_train_the_same(tmp_path):
    """model.offload_text_encoders keeps the encoders as host arrays (sent with each encode call): the same run."""
    offloaded, _ = run(make_config(tmp_path / "host", "grpo", model__offload_text_encoders=True, train__num_epochs=1))
    resident, _ = run(make_config(tmp_path / "device", "grpo", train__num_epochs=1))
    assert type(offloaded.frozen["text"]["table"]) is np.ndarray
    assert isinstance(resident.frozen["text"]["table"], jax.Array)
    chex.assert_trees_all_close(offloaded.state["params"], resident.state["params"], rtol=1e-6, atol=1e-7)


def test_param_dtype_is_applied_to_the_loaded_weights(tmp_path):
    config = make_config(tmp_path, "grpo", model__family="flux_fill", model__tiny=True, model__param_dtype="bfloat16")
    _, params = setup.build_family(config)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_a_subset_trains_in_fp32_over_a_bf16_base(tmp_path):
    """model.param_dtype='bfloat16' casts the frozen base; the trained subset, its Adam moments and EMA stay fp32,
    and the run moves it (bf16 copies would round lr-sized steps away)."""
    config = make_config(tmp_path, "grpo", model__param_dtype="bfloat16", train__trainable="subset",
                         train__trainable_pattern="/(w3|b3)$", ema__enabled=True, train__num_epochs=1)
    family, params = toy_family.tiny(seed=0, resolution=RES)
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)  # as setup.build_family casts
    runner = train.fit(config, family=family, params=params, loaders=loaders_for(config, 6, ()),
                       reward_fn=colour_reward)
    state = runner.state
    assert {leaf.dtype for leaf in jax.tree.leaves(runner.denoiser_base)} == {jnp.dtype(jnp.bfloat16)}
    for slot in ("params", "ema", "opt_state"):
        assert {leaf.dtype for leaf in jax.tree.leaves(state[slot]) if leaf.ndim} == {jnp.dtype(jnp.float32)}, slot
    initial = runner.denoiser_base["w3"].astype(jnp.float32)
    assert np.any(np.asarray(state["params"]["w3"]) != np.asarray(initial))


def test_scanned_trained_steps_train_like_one_call_per_step(tmp_path):
    """train.scan_trained_steps runs a minibatch's steps in one lax.scan program: the same update."""
    scanned, _ = run(make_config(tmp_path / "scan", "grpo", train__scan_trained_steps=True, train__num_epochs=1))
    stepped, _ = run(make_config(tmp_path / "step", "grpo", train__num_epochs=1))
    chex.assert_trees_all_close(scanned.state["params"], stepped.state["params"], rtol=1e-5, atol=1e-6)
