"""VLM judge against a local stub chat-completions server (127.0.0.1 only, bounded waits)."""
import http.server
import json
import threading
import time

import numpy as np
import pytest

from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.base import RewardError
from jax_inpaint_rl.rewards.vlm import ScoreParseError, parse_score

FAST = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01}


class Stub:
    """Chat-completions stub: `respond(request, n) -> (status, answer_text)` decides every reply;
    'sleep:<s>' as the text sleeps that long before answering (to trigger client timeouts)."""

    def __init__(self, respond):
        self.respond, self.requests, self.inflight, self.max_inflight = respond, [], 0, 0
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"body": body, "auth": self.headers.get("Authorization"), "path": self.path})
                    n = len(stub.requests)
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                try:
                    status, text = stub.respond(body, n)
                    if text.startswith("sleep:"):
                        time.sleep(float(text.split(":")[1]))
                        status, text = 200, '{"score": 5}'
                    reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                finally:  # done before the reply leaves: the client may start its next request at once
                    with stub.lock:
                        stub.inflight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory():
    stubs = []

    def make(respond):
        stubs.append(Stub(respond))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.stop()


def inputs(batch=2):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, 16, 16, 3), dtype=np.uint8)
    return images, [f"add a sign {i}" for i in range(batch)], {"source": np.zeros_like(images)}


def judge(url, **config):
    return get_reward("vlm", base_url=url, model="stub-vl", **{**FAST, **config})


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('{"score": 7, "reason": "ok"}', 0.7),
        ("Sure! ```json\n{\"score\": \"8.5\"}\n```", 0.85),
        ("Score: 7/10. The sign is legible.", 0.7),
        ("**Rating**: 9", 0.9),
        ("I would give it 3/5", 0.6),
        ("A solid 8 out of 10.", 0.8),
        ("6", 0.6),
        ("<think>score: 1 at first, but</think>final score = 10", 1.0),
    ],
)
def test_parse_score_accepts_common_answer_shapes(answer, expected):
    assert parse_score(answer) == pytest.approx(expected)


@pytest.mark.parametrize("answer", ["Looks great!", "", "score: 14", '{"reason": "no score"}', "-3"])
def test_parse_score_rejects_malformed_answers(answer):
    with pytest.raises(ScoreParseError):
        parse_score(answer)


def test_good_answers_give_per_template_scores(stub_factory, monkeypatch):
    monkeypatch.setenv("VLM_TEST_KEY", "secret-123")

    def respond(body, n):
        user_text = body["messages"][1]["content"][0]["text"]
        return 200, '{"score": 8}' if "Instruction:" in user_text else "Quality: 6/10"

    stub = stub_factory(respond)
    images, prompts, meta = inputs()
    scores = judge(stub.url, api_key_env="VLM_TEST_KEY")(images, prompts, meta)
    np.testing.assert_allclose(scores["alignment"], 0.8)
    np.testing.assert_allclose(scores["quality"], 0.6)
    np.testing.assert_allclose(scores["score"], 0.7)
    assert len(stub.requests) == 4
    assert all(r["auth"] == "Bearer secret-123" and r["path"] == "/v1/chat/completions" for r in stub.requests)
    assert all(r["body"]["model"] == "stub-vl" for r in stub.requests)
    n_images = sorted(sum(c["type"] == "image_url" for c in r["body"]["messages"][1]["content"]) for r in stub.requests)
    assert n_images == [1, 1, 2, 2]  # alignment also sees the source image


def test_malformed_answer_is_retried_then_raises(stub_factory):
    stub = stub_factory(lambda body, n: (200, "I cannot rate images." if n == 1 else '{"score": 10}'))
    images, prompts, meta = inputs(1)
    scores = judge(stub.url, templates=("quality",))(images, prompts, meta)
    assert scores["score"][0] == pytest.approx(1.0) and len(stub.requests) == 2

    stub = stub_factory(lambda body, n: (200, "no idea"))
    with pytest.raises(RewardError, match="3 attempts.*no score found"):
        judge(stub.url, templates=("quality",))(images, prompts, meta)
    assert len(stub.requests) == 3


def test_server_errors_retry_but_client_errors_do_not(stub_factory):
    images, prompts, meta = inputs(1)
    stub = stub_factory(lambda body, n: (503, "") if n < 3 else (200, '{"score": 4}'))
    assert judge(stub.url, templates=("quality",))(images, prompts, meta)["score"][0] == pytest.approx(0.4)

    stub = stub_factory(lambda body, n: (400, "bad model name"))
    with pytest.raises(RewardError, match="HTTP 400"):
        judge(stub.url, templates=("quality",))(images, prompts, meta)
    assert len(stub.requests) == 1


def test_timeouts_raise_after_retries(stub_factory):
    stub = stub_factory(lambda body, n: (200, "sleep:1.5"))
    images, prompts, meta = inputs(1)
    start = time.monotonic()
    with pytest.raises(RewardError, match="2 attempts.*(timed out|TimeoutError)"):
        judge(stub.url, templates=("quality",), timeout_s=0.2, max_retries=1)(images, prompts, meta)
    assert time.monotonic() - start < 3.0


def test_server_dying_mid_run_raises_clear_error(stub_factory):
    stub = stub_factory(lambda body, n: (200, '{"score": 5}'))
    reward = judge(stub.url, templates=("quality",))
    images, prompts, meta = inputs(2)
    np.testing.assert_allclose(reward(images, prompts, meta)["score"], 0.5)
    stub.stop()
    with pytest.raises(RewardError, match=r"127\.0\.0\.1.*failed after 3 attempts.*(refused|URLError)"):
        reward(images, prompts, meta)


def test_concurrency_is_limited(stub_factory):
    stub = stub_factory(lambda body, n: (200, "sleep:0.1"))
    images, prompts, meta = inputs(6)
    judge(stub.url, templates=("quality",), max_concurrency=2)(images, prompts, meta)
    assert len(stub.requests) == 6 and stub.max_inflight == 2


def test_unknown_template_is_rejected():
    with pytest.raises(ValueError, match="unknown templates"):
        judge("http://127.0.0.1:9/v1", templates=("beauty",))
