"""The VLM policy's recipe (configs/qwen_edit_vlm_grpo.py) end to end on CPU: the tiny Qwen-Image-Edit Plus family
(with a tiny Qwen2.5-VL given an lm_head), 4 epochs, a stub OpenAI-compatible judge on 127.0.0.1 that rates by the
image and fails some requests: failed judgements are dropped with their reason logged, never scored; the LoRA
trains; metrics, orbax checkpoints, greedy evaluations on the held-out set (reward in metrics.jsonl and
summary.json, a PNG grid) and an inference export (the LoRA-merged VLM as the text encoder) are written. A run of
2 epochs resumed to 4 gives exactly the straight run's numbers and LoRA tree."""
import contextlib
import io
import json
import re
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs import qwen_edit_vlm_grpo
from jax_inpaint_rl import setup, train
from jax_inpaint_rl.algorithms import trainable as trainable_lib
from jax_inpaint_rl.inpaint import Inpainter
from jax_inpaint_rl.registry import resolve
from jax_inpaint_rl.vlm_policy import loop
from tests.test_rewards_vlm import Stub

pytestmark = pytest.mark.slow  # compile-bound (sampling / update programs): CI's second stage

EPOCHS = 4
ROWS = 6  # 2 prompts x 3 completions per epoch; an evaluation batch holds as many prompts


def tiny_config(output_dir, url, epochs=EPOCHS):
    c = qwen_edit_vlm_grpo.get_config()
    c.output_dir = str(output_dir)
    c.model.tiny = True
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.data.format, c.data.resolution, c.data.num_examples, c.data.num_eval_examples = "synthetic", 32, 4, 4
    c.policy.group_size, c.policy.prompts_per_batch, c.policy.max_new_tokens = 3, 2, 4
    c.sample.num_steps = c.sample.eval_num_steps = 2
    c.train.num_epochs = epochs
    c.train.lora_rank, c.train.lora_alpha = 4, 8.0
    c.train.learning_rate = 1e-2
    c.checkpoint.interval = 2
    c.eval.interval, c.eval.num_grid = 2, 3
    c.mesh.data = 1  # the mesh test splits batches; here one device
    c.reward.config = {"base_url": url, "model": "stub", "max_retries": 0, "backoff_s": 0.0, "max_concurrency": 4}
    return c


def rate(body, n):
    """A score from the last image's bytes (so a group's edits differ); images whose bytes hash to 0 mod 5 fail
    (by content, not by arrival order: a resumed run meets the same failures)."""
    del n
    url = body["messages"][1]["content"][-1]["image_url"]["url"]
    crc = zlib.crc32(url.encode())
    return (500, "overloaded") if crc % 5 == 0 else (200, json.dumps({"score": crc % 11, "reason": "stub"}))


def port_free(records: list) -> list:
    """The records with the stub's port (each run starts its own stub) left out of the failure reasons."""
    return json.loads(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", json.dumps(records)))


def run(config):
    """Through train.py's policy kinds, as `python -m jax_inpaint_rl.train --config=...` runs the recipe: (runner,
    printed text, the judge's requests)."""
    stub = Stub(rate)
    config.reward.config.base_url = stub.url
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runner = resolve(config.policy_kind, train.POLICY_KINDS, "policy_kind")(config)
    finally:
        stub.stop()
    return runner, printed.getvalue(), stub.requests


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm_policy") / "run"
    config = tiny_config(folder, "")
    runner, printed, requests = run(config)
    return config, folder, runner, printed, requests


def test_four_tiny_epochs_with_a_stub_judge(straight):
    config, folder, runner, printed, requests = straight
    assert json.loads(printed[printed.rindex("\n{") + 1 if "\n{" in printed else printed.index("{"):]) \
        == runner.history[-1]
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(EPOCHS)) and lines == runner.history
    evaluations = EPOCHS // config.eval.interval
    assert len(requests) == 2 * ROWS * (EPOCHS + evaluations)  # 2 aspects per image, training and evaluation
    failed = [reason for r in lines for reason in r["failed"]]
    assert failed and all("HTTP 500" in reason for reason in failed)
    assert sum(r["judged"] for r in lines) == EPOCHS * ROWS - len(failed)
    for r in lines:
        assert np.isfinite([r["loss"], r["grad_norm"], r["reward_mean"]]).all() and r["skipped"] == 0
        assert r["updates"] == 1 and r["ratio_mean"] == 1.0 and r["sampler_logp_gap"] <= 1e-5
    trained = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(runner.trainable)[0]
               if "lora_b" in jax.tree_util.keystr(path)]
    assert trained and any(np.abs(np.asarray(b)).max() > 0 for b in trained)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_evaluations_write_rewards_and_grids(straight):
    config, folder, runner, _, _ = straight
    evaluated = [r for r in runner.history if "eval" in r]
    assert [r["epoch"] + 1 for r in evaluated] == [2, 4]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["eval_reward_final"] == evaluated[-1]["eval_reward"] == summary["evaluations"][-1]["reward"]
    for r in evaluated:
        assert 0 < r["eval"]["examples"] <= config.data.num_eval_examples and 0 <= r["eval_reward"] <= 1
        grid = Image.open(folder / r["eval"]["grid"])
        assert grid.width > 2 * 32 and grid.height > config.eval.num_grid * 32
    assert summary["resumed_from"] is None and summary["epochs"] == EPOCHS


def test_export_holds_the_merged_vlm_and_inference_reads_it(straight):
    config, folder, runner, _, _ = straight
    _, params, exported_config = setup.read_export(str(folder / "export"))
    _, _, built, _, _ = loop.build_model(config)
    spec = trainable_lib.from_config(config.train)
    merged = jax.jit(lambda base, lora: trainable_lib.merge(spec, base, lora))(built["text_encoder"],
                                                                              runner.trainable)
    expected = loop.export_tree(merged)
    assert jax.tree_util.tree_structure(params["text_encoder"]) == jax.tree_util.tree_structure(expected)
    for got, want in zip(jax.tree_util.tree_leaves(params["text_encoder"]), jax.tree_util.tree_leaves(expected)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(expected["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]),
                              np.asarray(built["text_encoder"]["language_model"]["layers"]["self_attn"]["q_proj"]
                                         ["kernel"]))  # the adapter moved the weights
    for name in ("transformer", "vae"):  # the frozen parts rebuilt as the run had them
        for got, want in zip(jax.tree_util.tree_leaves(params[name]), jax.tree_util.tree_leaves(built[name])):
            assert np.array_equal(np.asarray(got), np.asarray(want))
    assert exported_config.policy_kind == "vlm"

    inpainter = Inpainter(str(folder / "export"), steps=None, guidance=None, use_ema=False)
    image = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
    edited = inpainter([{"image": image, "prompt": "make it red"}], seed=0)
    assert edited.shape == (1, 32, 32, 3) and edited.dtype == np.uint8


def test_a_resumed_run_equals_the_straight_one(straight, tmp_path):
    _, _, reference, _, _ = straight
    folder = tmp_path / "run"
    first, _, _ = run(tiny_config(folder, "", epochs=2))
    assert [r["epoch"] for r in first.history] == [0, 1]
    resumed, _, requests = run(tiny_config(folder, "", epochs=EPOCHS))
    assert resumed.summary["resumed_from"] == 2
    assert len(requests) == 2 * ROWS * 3  # epochs 3 and 4 and the evaluation after 4: nothing redone
    assert port_free(resumed.history) == port_free(reference.history)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert port_free(lines) == port_free(reference.history)
    for got, want in zip(jax.tree_util.tree_leaves(resumed.trainable), jax.tree_util.tree_leaves(reference.trainable)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree_util.tree_leaves(resumed.opt_state), jax.tree_util.tree_leaves(reference.opt_state)):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_bad_policy_settings_are_named(tmp_path):
    c = tiny_config(tmp_path / "run", "http://127.0.0.1:9/v1")
    c.policy.condition_from = "judge"
    with pytest.raises(ValueError, match="condition_from"):
        loop.fit(c)
    c = tiny_config(tmp_path / "run", "http://127.0.0.1:9/v1")
    c.policy.minibatches = 4  # 6 rows do not split into 4 slices
    with pytest.raises(ValueError, match="policy.minibatches=4"):
        loop.fit(c)
