"""Reward server under a burst of concurrent clients and at its limits: body size, stalled bodies,
non-npz bodies, bearer tokens, keep-alive."""
import concurrent.futures
import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.remote import TOKEN_ENV, BadRequest, _post, encode_request
from jax_inpaint_rl.rewards.serve import make_server

FAST = {"timeout_s": 10.0, "max_retries": 0, "backoff_s": 0.01}


def cheap(images, prompts, meta):
    return {"score": images.mean(axis=(1, 2, 3)) / 255.0, "offset": np.asarray(meta["offset"], np.float32)}


def request(k: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Request k: two 8x8 images of its own brightness and its own meta, so a mixed-up reply shows."""
    values = np.array([k % 256, (7 * k + 3) % 256])
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in values])
    offset = np.array([k, -k], np.float32)
    return encode_request(images, ["p", "p"], {"offset": offset}), values / 255.0, offset


@pytest.fixture
def server():
    srv = make_server(cheap, "cheap", "127.0.0.1", 0, max_body_mb=1, read_timeout_s=1.0).start()
    yield srv
    srv.stop()


def raw_exchange(srv, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send `data` on a fresh socket, then read until the server closes or `timeout_s` passes."""
    with socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])), timeout=timeout_s) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except TimeoutError:
            pass
        return reply


@pytest.mark.timeout(60)
def test_a_burst_of_200_concurrent_requests_all_succeed_with_their_own_scores(server):
    n = 200
    start = threading.Barrier(n)

    def one(k):
        body, _, _ = request(k)
        start.wait(30)
        try:
            return _post(server.url + "/score", body, 30.0, None)
        except Exception as err:  # counted below: a reset or refused connection is a failure
            return err

    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(one, range(n)))
    wall_s = time.perf_counter() - began
    failures = {k: repr(r) for k, r in enumerate(replies) if isinstance(r, Exception)}
    print(f"burst: {n} requests, {len(failures)} failures, {wall_s:.2f} s, {server.scorer.stats}")
    assert not failures
    for k, reply in enumerate(replies):
        _, score, offset = request(k)
        np.testing.assert_allclose(reply["score"], score, rtol=1e-6, err_msg=f"request {k}")
        np.testing.assert_allclose(reply["offset"], offset, err_msg=f"request {k}")
    assert server.scorer.stats["requests"] == n and server.scorer.stats["batches"] < n


def test_a_body_over_the_limit_gets_413_before_it_is_sent(server):
    # headers announce 2 MiB and no body follows: the answer cannot have waited for it
    reply = raw_exchange(server, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n", timeout_s=3)
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert b"over this server's limit of 1048576 bytes" in reply

    chunked = b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"".join(b"10000\r\n" + b"x" * 65536 + b"\r\n" for _ in range(17))  # 17 x 64 KiB > 1 MiB
    reply = raw_exchange(server, chunked, timeout_s=5)
    assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply, reply

    images = np.zeros((8, 256, 256, 3), np.uint8)  # 1.5 MiB in one group: the client gets the 413, not a reset
    reward = get_reward("remote", url=server.url, **FAST)
    with pytest.raises(BadRequest, match=r"refused the body as too large \(HTTP 413\).*groups_per_request"):
        reward(images, ["p"] * 8, {"offset": np.zeros(8, np.float32), "group": np.zeros(8, int)})
    scores = reward(images, ["p"] * 8, {"offset": np.zeros(8, np.float32), "group": np.arange(8)})  # 4 per request
    np.testing.assert_allclose(scores["score"], 0.0)


def test_a_body_shorter_than_its_content_length_times_out(server):
    began = time.monotonic()
    reply = raw_exchange(server, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
    assert time.monotonic() - began < 5  # read_timeout_s=1: the server answered and closed, we did not time out
    assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply, reply
    assert b"received 10 bytes (1000 declared), then nothing for 1.0 s" in reply


def test_a_body_that_is_not_npz_gets_400(server):
    for body in (b'{"images": []}', b"\x93NUMPY not an archive"):
        reply = raw_exchange(server, b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert reply.startswith(b"HTTP/1.1 400"), reply
        assert b"body is not an .npz archive" in reply


def test_keep_alive_serves_several_requests_on_one_connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    try:
        sockets = []
        for k in range(3):
            body, score, _ = request(k)
            connection.request("POST", "/score", body=body)
            reply = json.loads(connection.getresponse().read())
            np.testing.assert_allclose(reply["scores"]["score"], score, rtol=1e-6)
            sockets.append(connection.sock)
        assert sockets[0] is not None and sockets.count(sockets[0]) == 3
    finally:
        connection.close()


def test_a_token_is_required_when_set(monkeypatch):
    srv = make_server(cheap, "cheap", "127.0.0.1", 0, token="s3cret").start()
    try:
        for auth in (b"", b"Authorization: Bearer wrong\r\n"):
            reply = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n")
            assert reply.startswith(b"HTTP/1.1 401") and b"www-authenticate: Bearer" in reply, reply
        reply = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"Authorization: Bearer s3cret\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and b'"reward": "cheap"' in reply, reply

        body_args = (np.zeros((1, 8, 8, 3), np.uint8), ["p"], {"offset": np.zeros(1, np.float32)})
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        with pytest.raises(BadRequest, match=r"refused the token .*\(HTTP 401\)"):
            get_reward("remote", url=srv.url, **FAST)(*body_args)
        assert get_reward("remote", url=srv.url, token="s3cret", **FAST)(*body_args)["valid"] == 1
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        assert get_reward("remote", url=srv.url, **FAST)(*body_args)["valid"] == 1
    finally:
        srv.stop()
