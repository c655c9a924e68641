"""The VLM policy across two processes on localhost (jax.distributed, 2 CPU devices each): each host samples,
renders and rewards its own prompts, and the run gives what one process with 4 devices gives for the same global
batch: the same metrics lines (rewards, losses, ratios, kept rows, the evaluation) and the same trained LoRA tree."""
import jax
import numpy as np
import pytest

from jax_inpaint_rl.vlm_policy import loop
from tests import vlm_policy_multihost_worker as worker
from tests.test_multihost import metrics_lines, run_processes

TOLERANCE = 1e-5  # fp32: the programs are compiled for 2 hosts vs 1, reductions may round differently

pytestmark = pytest.mark.slow  # two processes compiling the whole pipeline: CI's second stage


def test_two_processes_match_one(tmp_path):
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    run_processes("tests.vlm_policy_multihost_worker", worker.HOSTS, two_dir, timeout=900)

    one = loop.fit(worker.config_for(tmp_path / "one", hosts=1))
    one_lines, two_lines = metrics_lines(tmp_path / "one"), metrics_lines(two_dir)
    assert len(one_lines) == len(two_lines) == 2 and "eval" in two_lines[-1]
    for a, b in zip(one_lines, two_lines):
        assert a.keys() == b.keys()
        assert a["completions"] == b["completions"]  # host 0's first group: the same tokens
        assert (a["judged"], a["kept"], a["updates"]) == (b["judged"], b["kept"], b["updates"]) == (8, a["kept"], 2)
        for key in ("reward_mean", "loss", "ratio_mean", "grad_norm", "completion_tokens", "eval_reward"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=TOLERANCE, atol=TOLERANCE, err_msg=key)
    final = np.load(two_dir / "final_lora.npz")
    leaves = jax.tree_util.tree_flatten_with_path(one.trainable)[0]
    assert sorted(final.files) == sorted(jax.tree_util.keystr(path) for path, _ in leaves)
    assert any(np.abs(np.asarray(leaf)).max() > 0 for path, leaf in leaves if "lora_b" in jax.tree_util.keystr(path))
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(final[name], np.asarray(leaf), rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)
