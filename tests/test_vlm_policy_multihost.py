"""The VLM policy across two processes on localhost (jax.distributed, 2 CPU devices each): each host samples,
renders and rewards its own prompts, and the run gives what one process with 4 devices gives for the same global
batch: the same metrics lines (rewards, losses, ratios, kept rows, the evaluation) and the same trained LoRA tree."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_inpaint_rl.vlm_policy import loop
from tests import vlm_policy_multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5  # fp32: the programs are compiled for 2 hosts vs 1, reductions may round differently

pytestmark = pytest.mark.slow  # two processes compiling the whole pipeline: CI's second stage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path):
    port, two_dir = _free_port(), tmp_path / "two"
    two_dir.mkdir()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.vlm_policy_multihost_worker", str(i), str(port),
                               str(two_dir)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i in range(worker.HOSTS)]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]

    one = loop.fit(worker.config_for(tmp_path / "one", hosts=1))
    one_lines, two_lines = _metrics(tmp_path / "one"), _metrics(two_dir)
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
