"""Reward server and remote client: round trip under concurrent requests, batching, failures,
reply checks, per-request validation before merging, and groups from meta['group']."""
import concurrent.futures
import http.client
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.base import meta_mask
from jax_inpaint_rl.rewards.remote import BadReply, BadRequest, RemoteRewardError, decode_request, encode_request
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
    srv = make_server(brightness, "brightness", "127.0.0.1", 0, max_batch=64, max_wait_ms=20).start()
    yield srv.url, srv.scorer, srv
    srv.stop()


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
    with pytest.raises(ValueError, match="whole number of groups of 4; pass meta\\['group'\\]"):
        get_reward("remote", url=url, group_size=4, **FAST)(images, prompts, meta)


def test_dead_server_raises_even_in_drop_mode(server):
    url, _, srv = server
    reward = get_reward("remote", url=url, on_failure="drop", **FAST)
    np.testing.assert_allclose(reward(*batch([255]))["score"], 1.0)
    srv.stop()
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

    srv = make_server(stuck, "stuck", "127.0.0.1", 0).start()
    try:
        reward = get_reward("remote", url=srv.url, timeout_s=0.2, max_retries=1, backoff_s=0.01)
        with pytest.raises(RemoteRewardError, match="2 attempts.*(timed out|TimeoutError)"):
            reward(*batch([1]))
    finally:
        release.set()
        srv.stop()


# --- the client checks every reply ---------------------------------------------------------------

@pytest.fixture
def canned_server():
    """A stub server answering from the first prompt of each request: 'one' -> 1 score, 'half' -> B/2,
    'text' -> strings, 'nan' -> NaN at row 1, 'own_valid' -> that NaN marked invalid by the reply's own
    'valid' (as a drop-mode reward behind the server would), anything else -> B correct scores."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            images, prompts, _ = decode_request(self.rfile.read(int(self.headers["Content-Length"])))
            good = (images.mean(axis=(1, 2, 3)) / 255.0).tolist()
            nan = [good[0], float("nan"), *good[2:]]
            scores = {"one": {"score": good[:1]}, "half": {"score": good[: len(good) // 2]},
                      "text": {"score": ["high"] * len(good)}, "nan": {"score": nan},
                      "own_valid": {"score": nan, "valid": [1, 0, *[1] * (len(good) - 2)]}}.get(prompts[0])
            body = json.dumps({"scores": scores or {"score": good}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{stub.server_address[1]}"
    stub.shutdown()
    stub.server_close()


@pytest.mark.parametrize("mode, problem", [
    ("one", r"'score' is a list of 1, expected a list of 4 numbers \(one per image\)"),
    ("half", r"'score' is a list of 2, expected a list of 4 numbers"),
    ("text", r"'score' holds \['high', 'high', 'high'\], expected numbers"),
    ("nan", r"'score' is not finite at rows \[5\], expected finite numbers"),
])
def test_a_bad_reply_raises_naming_server_and_rows_or_drops_its_groups(canned_server, caplog, mode, problem):
    images, _, meta = batch(list(range(10, 90, 10)))
    prompts = ["ok"] * 4 + [mode] * 4  # rows 4:8 are the second request
    reward = get_reward("remote", url=canned_server, group_size=4, groups_per_request=1, **FAST)
    with pytest.raises(BadReply, match=f"{canned_server}/score: bad reply for rows 4:8: {problem}"):
        reward(images, prompts, meta)

    dropping = get_reward("remote", url=canned_server, group_size=4, groups_per_request=1, on_failure="drop", **FAST)
    with caplog.at_level(logging.WARNING):
        scores = dropping(images, prompts, meta)
    np.testing.assert_allclose(scores["valid"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(scores["score"][:4], np.arange(10, 50, 10) / 255.0, rtol=1e-6)
    assert np.isnan(scores["score"][4:]).all()
    assert "dropping groups [1] (rows 4:8)" in caplog.text and "bad reply for rows 4:8" in caplog.text


def test_a_reply_may_mark_its_own_rows_invalid(canned_server):
    images, _, meta = batch(list(range(10, 90, 10)))
    reward = get_reward("remote", url=canned_server, group_size=4, groups_per_request=1, **FAST)
    scores = reward(images, ["ok"] * 4 + ["own_valid"] * 4, meta)
    np.testing.assert_allclose(scores["valid"], [1, 1, 1, 1, 1, 0, 1, 1])
    assert np.isnan(scores["score"][5]) and np.isfinite(np.delete(scores["score"], 5)).all()


# --- the server checks every request before merging it ----------------------------------------------

def post_raw(url, body):
    """(HTTP status, JSON reply) of one POST /score."""
    parts = url.split("//")[1]
    connection = http.client.HTTPConnection(*parts.split(":"), timeout=10)
    try:
        connection.request("POST", "/score", body=body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_each_request_is_validated_alone_and_merged_meta_stays_aligned():
    """X (1 image, 2 masks) and Y (2 images, 1 mask) queued around G1 would add up to a batch whose rows
    line up in count but not in place; they must get their own 400 and G1, G2 their own masks' scores."""
    entered, release = threading.Event(), threading.Event()

    def inside_brightness(images, prompts, meta):
        if prompts[0] == "block":
            entered.set()
            assert release.wait(10)
        inside = meta_mask(meta, images, "inside_brightness")
        return {"score": (images.mean(-1) * inside).sum((1, 2)) / inside.sum((1, 2)) / 255.0}

    def request(values, masks):
        images = np.stack([np.arange(64, dtype=np.uint8).reshape(8, 8)[..., None].repeat(3, -1) + v for v in values])
        mask = np.zeros((len(masks), 8, 8, 1), np.uint8)
        for row, (top, left) in enumerate(masks):
            mask[row, top : top + 2, left : left + 2] = 1
        return encode_request(images, [f"p{v}" for v in values], {"mask": mask}), images, mask

    srv = make_server(inside_brightness, "inside", "127.0.0.1", 0, max_wait_ms=0).start()
    results, threads = {}, []
    try:
        blocker = threading.Thread(target=lambda: post_raw(srv.url, encode_request(
            np.zeros((1, 8, 8, 3), np.uint8), ["block"], {"mask": np.ones((1, 8, 8, 1), np.uint8)})))
        blocker.start()
        assert entered.wait(10)
        sends = {"X": request([0], [(0, 0), (6, 6)]), "G1": request([10, 20], [(2, 2), (4, 0)]),
                 "Y": request([30, 40], [(0, 6)]), "G2": request([50, 60], [(6, 0), (0, 4)])}
        queued = 0
        for name, (body, _, _) in sends.items():
            thread = threading.Thread(target=lambda n=name, b=body: results.__setitem__(n, post_raw(srv.url, b)))
            thread.start()
            threads.append(thread)
            queued += name.startswith("G")
            deadline = time.monotonic() + 5  # until answered (rejected) or waiting behind the blocker
            while thread.is_alive() and srv.scorer.jobs.qsize() < queued and time.monotonic() < deadline:
                time.sleep(0.005)
        release.set()
        for thread in [blocker, *threads]:
            thread.join(10)
    finally:
        release.set()
        srv.stop()
    for name in "XY":
        assert results[name][0] == 400, results[name]
        assert "meta['mask'] has shape" in results[name][1]["error"] and "one per image" in results[name][1]["error"]
    for name in ("G1", "G2"):
        _, images, mask = sends[name]
        expected = inside_brightness(images, ["p"], {"mask": mask})["score"]
        assert results[name][0] == 200, results[name]
        np.testing.assert_allclose(results[name][1]["scores"]["score"], expected, rtol=1e-6)
    assert srv.scorer.stats == {"requests": 3, "batches": 2, "images": 5}  # blocker alone, then G1 + G2 merged


# --- groups from meta['group'] ---------------------------------------------------------------------

def echo_groups(images, prompts, meta):
    """Brightness, the size of the request each row came in, and meta['group'] if it was sent (else -1)."""
    if any(p == "fail" for p in prompts):
        raise RuntimeError("reward model crashed")
    group = np.asarray(meta["group"], np.float32) if "group" in meta else np.full(len(images), -1, np.float32)
    return {"score": images.mean(axis=(1, 2, 3)) / 255.0, "request_size": np.full(len(images), len(images)),
            "group": group}


@pytest.fixture
def group_server():
    srv = make_server(echo_groups, "echo_groups", "127.0.0.1", 0, max_wait_ms=0).start()
    yield srv.url
    srv.stop()


def test_meta_group_decides_the_requests_and_is_not_sent(group_server, caplog):
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])  # uneven groups: 3, 2, 4 rows
    images, prompts, meta = batch(list(range(9)))
    config = {"url": group_server, "group_size": 4, "groups_per_request": 1, "max_concurrency": 1, **FAST}
    scores = get_reward("remote", **config)(images, prompts, {**meta, "group": ids})
    np.testing.assert_allclose(scores["request_size"], [3, 3, 3, 2, 2, 4, 4, 4, 4])  # one group per request
    np.testing.assert_allclose(scores["group"], -1)  # meta['group'] stayed on the trainer side
    np.testing.assert_allclose(scores["score"], np.arange(9) / 255.0, rtol=1e-6)

    sent = get_reward("remote", send_group=True, **config)(images, prompts, {**meta, "group": ids})
    np.testing.assert_allclose(sent["group"], ids)

    evaluation = get_reward("remote", **config)(images[:2], prompts[:2], {**_rows(meta, 2), "group": np.arange(2)})
    np.testing.assert_allclose(evaluation["request_size"], [1, 1])  # group_size=4 does not apply

    failing = ["a"] * 3 + ["fail"] * 2 + ["b"] * 4
    with caplog.at_level(logging.WARNING):
        dropped = get_reward("remote", on_failure="drop", **config)(images, failing, {**meta, "group": ids + 7})
    np.testing.assert_allclose(dropped["valid"], [1, 1, 1, 0, 0, 1, 1, 1, 1])
    assert "dropping groups [8] (rows 3:5)" in caplog.text


def _rows(meta, n):
    return {field: value[:n] for field, value in meta.items()}


def test_meta_group_must_be_integer_ids_with_each_group_together(group_server):
    images, prompts, meta = batch([1, 2, 3, 4])
    reward = get_reward("remote", url=group_server, **FAST)
    with pytest.raises(ValueError, match=r"keep each group's rows together.*\[0, 1, 0, 1\]"):
        reward(images, prompts, {**meta, "group": np.array([0, 1, 0, 1])})
    with pytest.raises(ValueError, match=r"meta\['group'\] must be a \(4,\) integer array.*float"):
        reward(images, prompts, {**meta, "group": np.zeros(4)})
