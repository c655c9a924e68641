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


def metrics_lines(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_processes(module: str, hosts: int, output_dir, timeout: int = 600) -> None:
    """`python -m module PROCESS_ID PORT OUTPUT_DIR` for every process of a localhost jax.distributed run (2 CPU
    devices each), waited for; a failed process fails the test with its output's end."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", module, str(i), str(port), str(output_dir)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(hosts)]
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]


def test_two_processes_match_one(tmp_path):
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    run_processes("tests.multihost_worker", worker.HOSTS, two_dir)

    one_config = worker.config_for(tmp_path / "one", hosts=1)
    one, _ = worker.run(one_config)
    two_config = worker.config_for(two_dir, hosts=worker.HOSTS)
    one_lines, two_lines = metrics_lines(one_config.output_dir), metrics_lines(two_config.output_dir)
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
