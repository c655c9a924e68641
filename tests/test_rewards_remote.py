"""Reward server and remote client: round trip under concurrent requests, batching, failures."""
import concurrent.futures
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.remote import BadRequest, RemoteRewardError, decode_request, encode_request
from jax_inpaint_rl.rewards.serve import make_server

FAST = {"timeout_s": 5.0, "max_retries": 1, "backoff_s": 0.01}


def brightness(images, prompts, meta):
    """Per-sample mean brightness, plus a sub-score from meta: lets the test check every sample's routing."""
    if any(p == "fail" for p in prompts):
        raise RuntimeError("reward model crashed")
    if "offset" not in meta:
        raise KeyError("meta['offset'] is required")
    return {"score": images.mean(axis=(1, 2, 3)) / 255.0, "offset": np.asarray(meta["offset"], np.float32)}


@pytest.fixture
def server():
    srv, scorer = make_server(brightness, "brightness", "127.0.0.1", 0, max_batch=64, max_wait_ms=20)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", scorer, srv
    srv.shutdown()
    srv.server_close()


def batch(values, prompts=None):
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in values])
    meta = {"offset": np.asarray(values, np.float32) + 0.5, "target_text": [f"t{v}" for v in values]}
    return images, prompts or [f"p{v}" for v in values], meta


def test_wire_format_round_trip():
    images, prompts, meta = batch([1, 2, 3])
    meta["mask"] = np.ones((3, 8, 8, 1), np.uint8)
    images2, prompts2, meta2 = decode_request(encode_request(images, prompts, meta))
    np.testing.assert_array_equal(images2, images)
    assert prompts2 == prompts and meta2["target_text"] == meta["target_text"]
    np.testing.assert_array_equal(meta2["mask"], meta["mask"])


def test_concurrent_clients_get_their_own_scores_and_requests_are_batched(server):
    url, scorer, _ = server
    reward = get_reward("remote", url=url, group_size=2, groups_per_request=1, max_concurrency=4, **FAST)

    def call(k):
        values = [4 * k + i for i in range(4)]
        return values, reward(*batch(values))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    for values, scores in results:
        np.testing.assert_allclose(scores["score"], np.asarray(values) / 255.0, rtol=1e-6)
        np.testing.assert_allclose(scores["offset"], np.asarray(values) + 0.5)
        np.testing.assert_allclose(scores["valid"], 1.0)
    assert scorer.stats["requests"] == 32 and scorer.stats["images"] == 64
    assert scorer.stats["batches"] < scorer.stats["requests"]  # concurrent requests were merged


def test_failed_groups_raise_or_are_dropped_and_logged(server, caplog):
    url, _, _ = server
    prompts = ["a", "a", "fail", "fail", "b", "b"]
    args = batch([10, 20, 30, 40, 50, 60], prompts)
    with pytest.raises(RemoteRewardError, match="2 attempts.*reward model crashed"):
        get_reward("remote", url=url, group_size=2, groups_per_request=1, **FAST)(*args)

    dropping = get_reward("remote", url=url, group_size=2, groups_per_request=1, on_failure="drop", **FAST)
    with caplog.at_level(logging.WARNING):
        scores = dropping(*args)
    np.testing.assert_allclose(scores["valid"], [1, 1, 0, 0, 1, 1])
    assert np.isnan(scores["score"][2:4]).all()
    np.testing.assert_allclose(scores["score"][[0, 1, 4, 5]], np.array([10, 20, 50, 60]) / 255.0, rtol=1e-6)
    assert "dropping groups [1]" in caplog.text and "reward model crashed" in caplog.text


def test_bad_input_is_not_retried_and_names_the_field(server):
    url, _, _ = server
    images, prompts, meta = batch([1, 2])
    with pytest.raises(BadRequest, match="offset"):
        get_reward("remote", url=url, **FAST)(images, prompts, {"target_text": meta["target_text"]})
    with pytest.raises(ValueError, match="whole number of groups"):
        get_reward("remote", url=url, group_size=4, **FAST)(images, prompts, meta)


def test_dead_server_raises_even_in_drop_mode(server):
    url, _, srv = server
    reward = get_reward("remote", url=url, on_failure="drop", **FAST)
    np.testing.assert_allclose(reward(*batch([255]))["score"], 1.0)
    srv.shutdown()
    srv.server_close()
    with pytest.raises(RemoteRewardError, match="every request failed.*(refused|ConnectionRefusedError)"):
        reward(*batch([255]))


def test_cli_serves_a_registered_reward():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jax_inpaint_rl.rewards.serve", "--reward", "preservation", "--port", "0"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()  # "serving reward 'preservation' on http://127.0.0.1:PORT"
        assert "serving reward 'preservation'" in line, line
        source = np.full((2, 16, 16, 3), 100, np.uint8)
        mask = np.zeros((2, 16, 16, 1), np.uint8)
        mask[:, 4:8, 4:8] = 1
        images = source.copy()
        images[1] = 151
        reward = get_reward("remote", url=line.split(" on ")[1].strip(), **FAST)
        scores = reward(images, ["p", "p"], {"mask": mask, "source": source})
        np.testing.assert_allclose(scores["score"], [1.0, 0.8], atol=1e-6)
        assert "psnr" in scores
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_slow_server_times_out_with_clear_error():
    release = threading.Event()

    def stuck(images, prompts, meta):
        release.wait(5)
        return {"score": np.zeros(len(images))}

    srv, _ = make_server(stuck, "stuck", "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        reward = get_reward("remote", url=f"http://127.0.0.1:{srv.server_address[1]}", timeout_s=0.2, max_retries=1,
                            backoff_s=0.01)
        with pytest.raises(RemoteRewardError, match="2 attempts.*(timed out|TimeoutError)"):
            reward(*batch([1]))
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()
