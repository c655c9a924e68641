"""Two processes on localhost (jax.distributed, 2 CPU devices each) train exactly like one process with 4."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # two processes: CI's second stage (README, Tests)


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
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), str(port), str(two_dir)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(worker.HOSTS)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]

    one_config = worker.config_for(tmp_path / "one", hosts=1)
    one, _ = worker.run(one_config)
    two_config = worker.config_for(two_dir, hosts=worker.HOSTS)
    one_lines, two_lines = _metrics(one_config.output_dir), _metrics(two_config.output_dir)
    assert len(one_lines) == len(two_lines) > 0
    for a, b in zip(one_lines, two_lines):
        assert a.keys() == b.keys()
        for key in a:
            if key == "phase":
                assert a[key] == b[key]
            elif not key.endswith("_s"):  # wall-clock timings
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    final = np.load(two_dir / "final_params.npz")
    for name, value in one.state["params"].items():
        np.testing.assert_allclose(final[name], np.asarray(value), rtol=1e-4, atol=1e-6, err_msg=name)
