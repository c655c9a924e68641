"""The VLM policy's recipe (configs/qwen_edit_vlm_grpo.py) end to end on CPU: the tiny Qwen-Image-Edit Plus family
(with a tiny Qwen2.5-VL given an lm_head), 2 epochs, a stub OpenAI-compatible judge on 127.0.0.1 that rates by the
image and fails some requests: failed judgements are dropped with their reason logged, never scored; the LoRA
trains; metrics and an orbax checkpoint are written."""
import json
import zlib

import jax
import numpy as np
import pytest

from configs import qwen_edit_vlm_grpo
from jax_inpaint_rl import train
from jax_inpaint_rl.registry import resolve
from jax_inpaint_rl.vlm_policy import loop
from tests.test_rewards_vlm import Stub

pytestmark = pytest.mark.slow  # compile-bound (sampling / update programs): CI's second stage


def tiny_config(tmp_path, url):
    c = qwen_edit_vlm_grpo.get_config()
    c.output_dir = str(tmp_path / "run")
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.data.format, c.data.resolution, c.data.num_examples = "synthetic", 32, 4
    c.policy.group_size, c.policy.prompts_per_batch, c.policy.max_new_tokens = 3, 2, 4
    c.sample.num_steps = 2
    c.train.num_epochs = 2
    c.train.lora_rank, c.train.lora_alpha = 4, 8.0
    c.train.learning_rate = 1e-2
    c.checkpoint.interval = 2
    c.reward.config = {"base_url": url, "model": "stub", "max_retries": 0, "backoff_s": 0.0, "max_concurrency": 4}
    return c


def rate(body, n):
    """A score from the last image's bytes (so a group's edits differ); every 7th request fails."""
    if n % 7 == 0:
        return 500, "overloaded"
    url = body["messages"][1]["content"][-1]["image_url"]["url"]
    return 200, json.dumps({"score": zlib.crc32(url.encode()) % 11, "reason": "stub"})


def test_two_tiny_epochs_with_a_stub_judge(tmp_path, capsys):
    """Through train.py's policy kinds, as `python -m jax_inpaint_rl.train --config=...` runs the recipe."""
    stub = Stub(rate)
    config = tiny_config(tmp_path, stub.url)
    try:
        runner = resolve(config.policy_kind, train.POLICY_KINDS, "policy_kind")(config)
    finally:
        stub.stop()
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex("\n{") + 1 if "\n{" in out else out.index("{"):]) == runner.history[-1]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and lines == runner.history
    assert len(stub.requests) == 2 * 2 * 6  # 2 epochs x 2 aspects x 6 images
    failed = [reason for r in lines for reason in r["failed"]]
    assert failed and all("HTTP 500" in reason for reason in failed)
    assert sum(r["judged"] for r in lines) == 12 - len(failed)
    for r in lines:
        assert np.isfinite([r["loss"], r["grad_norm"], r["reward_mean"]]).all() and r["skipped"] == 0
        assert r["ratio_mean"] == 1.0 and r["sampler_logp_gap"] <= 1e-5
    trained = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(runner.trainable)[0]
               if "lora_b" in jax.tree_util.keystr(path)]
    assert trained and any(np.abs(np.asarray(b)).max() > 0 for b in trained)
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_unknown_condition_source_is_named(tmp_path):
    c = tiny_config(tmp_path, "http://127.0.0.1:9/v1")
    c.policy.condition_from = "judge"
    with pytest.raises(ValueError, match="condition_from"):
        loop.fit(c)
