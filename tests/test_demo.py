"""The demo's pieces: the shape_fill reward reads the generated pixels, the mask and the prompt and nothing else;
the SFT control arm starts from the warm-up's end, runs RL's number of optimizer steps, leaves RL's params for
the export and writes its summary keys; grids outline the mask and write the prompt."""
import json
import os

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from jax_inpaint_rl import report, rewards, train
from jax_inpaint_rl.data import synthetic
from jax_inpaint_rl.rewards import shape_fill
from jax_inpaint_rl.trainer import checkpoints, collect
from tests import test_train as T
from tests import toy_family

RES = 32


def shape_examples(count, seed=3):
    examples = [synthetic.synthetic_example(seed, i, RES, ("gradient_shape", "shape")) for i in range(count)]
    stacked = {name: np.stack([e[name] for e in examples]) for name in ("image", "mask", "target")}
    return [e["prompt"] for e in examples], stacked


class Watched(dict):
    """A meta dict that records which fields a reward looks at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def test_shape_fill_reads_the_pixels_the_mask_and_the_prompt_only():
    """The trainer hands rewards the source and the ground truth too (collect.reward_meta); shape_fill looks at
    meta['mask'] alone, so replacing or dropping the others changes nothing."""
    prompts, data = shape_examples(12)
    batch = {"prompt": prompts, "image": data["image"] / 127.5 - 1, "mask": data["mask"],
             "target": data["target"] / 127.5 - 1, "target_text": [None] * len(prompts)}
    given = collect.reward_meta(batch, group_size=1)
    assert {"source", "reference", "mask"} <= set(given)
    swapped = dict(given, reference=np.zeros_like(given["reference"]), source=given["reference"])
    reward = rewards.get_reward("shape_fill")
    generated = np.where(data["mask"] > 0, np.random.default_rng(0).integers(0, 256, data["target"].shape),
                         data["target"]).astype(np.uint8)
    blended = ((generated.astype(np.float32) + data["target"]) / 2).astype(np.uint8)
    for images in (data["target"], generated, blended):
        meta = Watched(given)
        scores = reward(images, prompts, meta)
        assert meta.read == {"mask"}
        for other in (swapped, {"mask": given["mask"]}):
            chex.assert_trees_all_equal(reward(images, prompts, other), scores)
    with pytest.raises(ValueError, match=r"prompt 'text \"AB\"': expected 'a <colour> <shape>'"):
        reward(data["target"][:1], ['text "AB"'], {"mask": data["mask"][:1]})


def test_shape_fill_scores_colour_shape_and_background_apart():
    """The ground truth scores 1 with every accuracy; an empty box scores 0 on colour and shape; a wrong colour
    or a wrong shape is caught by its own part and accuracy; a flat fill leaves the gradient's seam."""
    prompts, data = shape_examples(12)
    reward = rewards.get_reward("shape_fill")

    def scores(images, prompt_list=prompts):
        return {k: v.mean() for k, v in reward(images, prompt_list, {"mask": data["mask"]}).items()}

    truth = scores(data["target"])
    assert truth == pytest.approx({"score": 1.0, "colour": 1.0, "shape": 1.0, "background": 1.0,
                                   "colour_right": 1.0, "shape_right": 1.0, "fill_right": 1.0}, abs=1e-3)
    empty = scores(data["image"])
    assert empty["colour"] < 1e-3 and empty["shape"] < 1e-3 and empty["colour_right"] == empty["shape_right"] == 0
    assert empty["background"] == pytest.approx(1.0, abs=1e-3)
    colours, shapes = list(synthetic.COLOURS), synthetic.SHAPES
    parsed = [synthetic.parse_shape_prompt(p) for p in prompts]
    other_colour = [synthetic.shape_prompt(colours[(colours.index(c) + 1) % 4], s) for c, s in parsed]
    wrong = scores(data["target"], other_colour)
    assert wrong["colour"] < 0.01 and wrong["colour_right"] == 0 and wrong["shape_right"] == 1
    other_shape = [synthetic.shape_prompt(c, shapes[(shapes.index(s) + 1) % 3]) for c, s in parsed]
    wrong = scores(data["target"], other_shape)
    assert wrong["shape"] < 0.9 and wrong["shape_right"] == 0 and wrong["fill_right"] == 0
    flat = data["target"].copy()
    inside = (data["mask"][..., 0] > 0) & (data["target"] == data["image"]).all(-1)
    for i in range(len(flat)):
        flat[i][inside[i]] = data["image"][i][inside[i]].mean(0)
    gradients = [i for i, p in enumerate(prompts) if np.ptp(data["image"][i].reshape(-1, 3), axis=0).max() > 20]
    assert gradients and all(reward(flat, prompts, {"mask": data["mask"]})["background"][gradients] < 0.999)


def test_background_planes_fit_a_linear_gradient_exactly():
    y, x = np.mgrid[:RES, :RES]
    image = np.stack([100 + 3 * x, 50 + 2 * y, 200 - x - y], -1).astype(np.uint8)[None]
    mask = np.zeros((1, RES, RES), bool)
    mask[0, 8:24, 4:20] = True
    np.testing.assert_allclose(shape_fill.background_planes(image, mask)[0], image[0], atol=1e-3)


def test_outline_grid_and_comparison(tmp_path):
    """The mask's edge is drawn black inside and white outside, the rest of the source untouched; a grid has
    a column per arm at CELL px, the prompt under each row; arms that evaluated other examples are refused."""
    image = np.full((RES, RES, 3), 128, np.uint8)
    mask = np.zeros((RES, RES, 1), np.uint8)
    mask[8:24, 8:24] = 255
    drawn = report.outlined(image, mask)
    scale = report.CELL // RES
    assert drawn.shape == (report.CELL, report.CELL, 3)
    assert (drawn[8 * scale, 16 * scale] == 0).all() and (drawn[8 * scale - 1, 16 * scale] == 255).all()
    assert (drawn[16 * scale, 16 * scale] == 128).all() and (drawn[2, 2] == 128).all()
    rows = [{"prompt": f"a red circle {i}", "image": image, "mask": mask, "target": image, "result": image,
             "score": 0.5} for i in range(3)]
    arms = {title: str(tmp_path / f"{title}.npz") for title in ("before", "after")}
    for path in arms.values():
        report.save_results(path, rows)
    report.save_comparison(str(tmp_path / "comparison.png"), arms)
    grid = np.asarray(Image.open(tmp_path / "comparison.png"))
    columns = 4  # source with the mask outlined | before | after | target
    assert grid.shape[1] == columns * (report.CELL + report.PAD) + report.PAD
    caption = grid[-report.TEXT:, :report.CELL]
    assert (caption < 100).any()  # the prompt is written
    report.save_results(arms["after"], [dict(row, prompt="a blue square") for row in rows])
    with pytest.raises(ValueError, match="arm 'after' evaluated other examples"):
        report.save_comparison(str(tmp_path / "refused.png"), arms)


# the demo's shape: DPO (pairs of 2 groups, one optimizer step an epoch) after an SFT warm-up at its own rate
CONTROL = dict(train__warmup_steps=2, train__num_epochs=3, train__sft_control=True, train__minibatch_size=2,
               train__warmup_learning_rate=1e-2)


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    """A toy run with the control arm; the train state seen at every evaluation and where the control starts."""
    seen = {}
    real_evaluate, real_sft_steps = train.evaluate, train.sft_steps

    def capturing(run, tag):
        seen[tag] = jax.device_get({name: run.state[name] for name in ("params", "opt_state", "ref")})
        return real_evaluate(run, tag)

    def starting(run, steps, prefix, **kwargs):
        if prefix == "control":
            seen["control_start"] = jax.device_get({name: run.state[name] for name in ("params", "opt_state")})
        return real_sft_steps(run, steps, prefix, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "evaluate", capturing)
        patch.setattr(train, "sft_steps", starting)
        config = T.make_config(tmp_path_factory.mktemp("control"), "dpo", **CONTROL)
        runner, _ = T.run(config)
    return config, runner, seen


def test_the_control_arm_starts_from_the_warm_up_and_leaves_rl_for_the_export(control_run):
    """The control trains RL's number of SFT steps from the warm-up's params and optimizer state (as the
    warm-up's evaluation saw them), RL's params go back into the state for the export, and summary.json holds
    every arm's reward, parts and wall time."""
    config, runner, seen = control_run
    summary = runner.summary
    warmed_up = seen["after_warmup"]
    chex.assert_trees_all_equal(seen["control_start"], {k: warmed_up[k] for k in ("params", "opt_state")})
    chex.assert_trees_all_equal(warmed_up["ref"], warmed_up["params"])  # DPO's reference is where RL starts
    assert set(runner.programs.updates) == {("sft", 1e-2), ("dpo", 3e-3)}  # warm-up and control, RL
    chex.assert_trees_all_equal(jax.device_get(runner.state["params"]), seen["after_rl"]["params"])
    assert not np.array_equal(*(jax.tree.leaves(seen[tag]["params"])[0] for tag in ("after_rl", "after_control")))
    rl_steps = summary["rl_optimizer_steps"]
    assert rl_steps == int(runner.state["step"]) // 2 - 1 > 0  # warm-up 2, RL n, control n
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    control_steps = [line["step"] for line in lines if line["phase"] == "control"]
    assert control_steps[-1] == summary["warmup_end_step"] + 2 * rl_steps
    written = json.load(open(os.path.join(config.output_dir, "summary.json")))
    for arm in ("after_warmup", "after_rl", "after_control"):
        assert written[f"eval_{arm}"]["examples"] == 6 and "custom/score" in written[f"eval_{arm}"]
        assert os.path.exists(os.path.join(config.output_dir, written[f"eval_{arm}"]["grid"]))
    assert written["eval_reward_final"] == written["eval_after_rl"]["reward"]
    assert set(written["wall_time_s"]) == {"autoencoder", "warmup", "rl", "control"}
    control_evals = [h["arm_step"] for h in runner.history if h["phase"] == "control"]
    assert control_evals == [h["arm_step"] for h in runner.history if h["phase"] == "rl" and "eval_reward" in h]
    assert os.path.exists(os.path.join(config.output_dir, "comparison.png"))


def test_sigterm_in_the_control_arm_resumes_bit_identically(control_run, tmp_path):
    _, straight, _ = control_run
    config = T.make_config(tmp_path, "dpo", **CONTROL)
    family, params = toy_family.tiny(seed=0, resolution=T.RES)
    loaders = T.loaders_for(config)
    loaders["sft"] = T.SignalAfter(loaders["sft"], 4)  # 2 warm-up batches, then the control's second
    with pytest.raises(checkpoints.Stopped, match="SIGTERM: saved control step 2"):
        train.fit(config, family=family, params=params, loaders=loaders, reward_fn=T.colour_reward)
    resumed, summary = T.run(config)
    assert resumed.resumed_from is not None
    chex.assert_trees_all_equal(resumed.state["params"], straight.state["params"])
    assert summary["eval_after_control"] == straight.summary["eval_after_control"]


def test_gradient_shapes_sit_on_a_linear_background_inside_the_box():
    """The source is one linear gradient (the plane shape_fill reads it by), the target differs from it exactly
    on the prompt's shape, in the prompt's colour."""
    spread = []
    for index in range(6):
        example = synthetic.synthetic_example(2, index, RES, ("gradient_shape",))
        mask = example["mask"][..., 0] > 0
        plane = shape_fill.background_planes(example["image"][None], mask[None])[0]
        assert np.abs(plane - example["image"]).max() <= 1.0  # rounding to uint8
        spread.append(np.ptp(example["image"].reshape(-1, 3), axis=0).max())
        colour, shape = synthetic.parse_shape_prompt(example["prompt"])
        rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        outline = synthetic.shape_mask(shape, (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1), RES, RES)
        np.testing.assert_array_equal((example["image"] != example["target"]).any(-1), outline)
        assert (example["target"][outline] == synthetic.COLOURS[colour]).all()
    assert min(spread) > 20  # a gradient, not a plain background


def test_arms_table_lists_each_arm_and_part():
    """train.main prints the summary's evaluations as a table: one row per arm present, every part's mean."""
    def scores(reward, right):
        return {"reward": reward, "shape_fill/colour": 0.25, "shape_fill/colour_right": right, "examples": 32,
                "grid": "eval_x.png", "results": "eval_x.npz"}

    summary = {"eval_after_warmup": scores(0.4731, 0.5), "eval_after_rl": scores(0.5912, 0.8125),
               "eval_reward_final": 0.5912}
    assert report.arms_table(summary).splitlines() == [
        "| held-out (32 examples) | reward | shape_fill/colour | shape_fill/colour_right |",
        "| --- | --- | --- | --- |",
        "| after warm-up | 0.473 | 0.250 | 0.500 |",
        "| after RL | 0.591 | 0.250 | 0.812 |"]
    assert report.arms_table({"eval_reward_final": 0.5}) == ""
