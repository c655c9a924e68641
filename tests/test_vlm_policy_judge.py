"""The VLM policy's judge (vlm_policy/judge.py) against a stub OpenAI-compatible server: the seed's rubric weights
(0.6 instruction following from the source and the result, 0.4 quality from the result), a failed judgement
dropped with its reason (never scored), and the optional identity-preservation term mixed in by weight."""
import json

import numpy as np
import pytest

from jax_inpaint_rl.vlm_policy import judge as judge_lib
from tests.test_rewards_vlm import Stub


def answer(body, n):
    """Instruction following 8, quality 3 (told apart by the system prompt); the instruction 'fail' gets a 500."""
    text = body["messages"][1]["content"][0]["text"]
    if "Edit instruction: fail" in text or "edit: fail" in text:
        return 500, "overloaded"
    following = body["messages"][0]["content"].startswith("You are a strict judge of image edits")
    return 200, json.dumps({"score": 8 if following else 3, "reason": "stub"})


@pytest.fixture
def stub():
    server = Stub(answer)
    yield server
    server.stop()


def images(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), np.uint8)


def test_rubric_weights_and_dropped_failures(stub):
    judge = judge_lib.make_judge(stub.url, "stub", max_retries=0, backoff_s=0.0)
    scores, valid, reasons = judge(images(0), images(1), ["make it red", "fail", "add a hat"], ["a", "b", "c"])
    np.testing.assert_allclose(scores[[0, 2]], 0.6 * 0.8 + 0.4 * 0.3, rtol=1e-6)
    assert valid.tolist() == [True, False, True] and scores[1] == 0.0
    assert reasons[0] == reasons[2] == "" and "HTTP 500" in reasons[1]
    following = [r for r in stub.requests if "Edit instruction" in r["body"]["messages"][1]["content"][0]["text"]]
    assert len(following) == 3 and all(len(r["body"]["messages"][1]["content"]) == 3 for r in following)  # 2 images


def test_identity_term_is_mixed_in_by_weight(stub):
    edited, source = images(0), images(1)
    judge = judge_lib.make_judge(stub.url, "stub", identity_weight=0.25, max_retries=0, backoff_s=0.0)
    scores, valid, _ = judge(edited, source, ["make it red"] * 3, ["a"] * 3)
    identity = 1.0 - np.abs(edited.astype(np.float64) - source).mean(axis=(1, 2, 3)) / 255.0
    np.testing.assert_allclose(scores, 0.75 * (0.6 * 0.8 + 0.4 * 0.3) + 0.25 * identity, rtol=1e-5)
    assert valid.all()
    with pytest.raises(ValueError, match="identity_weight"):
        judge_lib.make_judge(stub.url, "stub", identity_weight=1.0)
