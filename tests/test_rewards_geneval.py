"""GenEval as a remote reward, with a stub evaluator (tests/geneval_stub.py) behind our server on 127.0.0.1:
end to end from a Flow-GRPO GenEval folder through the loader, the calculator and the client; the client's
request checks (nothing sent), bad replies named or dropped, the adapter's checks on the evaluator, and the
serve command the docs give."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_inpaint_rl.data import Loader, open_source
from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.base import RewardError
from jax_inpaint_rl.rewards.calculator import build_calculator
from jax_inpaint_rl.rewards.geneval import evaluator_reward
from jax_inpaint_rl.rewards.remote import BadReply, BadRequest, RemoteRewardError
from jax_inpaint_rl.rewards.serve import make_server
from tests.geneval_stub import make_stub_evaluator
from tests.test_data_flow_grpo import GENEVAL, write_geneval

FAST = {"timeout_s": 5.0, "max_retries": 1, "backoff_s": 0.01}
STUB = "tests.geneval_stub:make_stub_evaluator"


def images_with(found):
    """Images in which the stub finds found[i] objects."""
    return np.stack([np.full((8, 8, 3), 50 * n + 10, np.uint8) for n in found])


def expected(records, found):
    """GenEval's one-clause scores for each row's own record and image."""
    counts, found = np.array([r["include"][0]["count"] for r in records]), np.asarray(found)
    return {"score": np.maximum(0, 1 - np.abs(counts - found) / counts), "strict_accuracy": found == counts,
            "accuracy": found >= counts}


def metadata_for(prompts):
    return [json.dumps({"prompt": p, "tag": "counting", "include": [{"class": "cat", "count": 1}]}) for p in prompts]


@pytest.fixture
def geneval_server():
    seen = []
    reward = get_reward("geneval_evaluator", evaluator=STUB, only_strict=False, seen=seen)
    srv = make_server(reward, "geneval_evaluator", "127.0.0.1", 0, max_wait_ms=0).start()
    yield srv, seen
    srv.stop()


def test_a_geneval_folder_is_scored_through_loader_calculator_client_and_server(tmp_path, geneval_server):
    srv, seen = geneval_server
    source = open_source(write_geneval(tmp_path / "geneval"))
    batch = Loader(source, prompts_per_batch=4, group_size=2, seed=0, prefetch=0).batch_at(0, 0)
    records = [json.loads(text) for text in batch["metadata"]]
    found = [0, 1, 1, 2, 3, 3, 1, 0]
    calculator = build_calculator({"geneval": {"weight": 2.0, "config": {
        "url": srv.url, "group_size": 2, "groups_per_request": 1, **FAST}}})
    try:  # meta as the trainer hands it over: the batch's metadata and the group ids
        scores = calculator(images_with(found), batch["prompt"], {"metadata": batch["metadata"],
                                                                  "group": np.arange(8) // 2})
    finally:
        calculator.close()
    truth = expected(records, found)
    np.testing.assert_allclose(scores["geneval/score"], truth["score"], rtol=1e-6)
    np.testing.assert_allclose(scores["score"], 2 * truth["score"], rtol=1e-6)
    np.testing.assert_array_equal(scores["geneval/strict_accuracy"], truth["strict_accuracy"])
    np.testing.assert_array_equal(scores["geneval/accuracy"], truth["accuracy"])
    assert scores["valid"].all() and 0 < truth["score"].mean() < 1
    assert sorted(records, key=json.dumps) == sorted(seen, key=json.dumps)  # each record reached the evaluator
    assert srv.scorer.stats["requests"] == 4  # one per group


def test_only_strict_sends_no_accuracy():
    prompts = [record["prompt"] for record in GENEVAL]
    meta = {"metadata": [json.dumps(record) for record in GENEVAL]}
    images = images_with([1, 3, 2, 0])  # the counts of GENEVAL's include clauses: 1, 3, 1, 1
    strict = evaluator_reward(make_stub_evaluator())(images, prompts, meta)
    assert sorted(strict) == ["score", "strict_accuracy"]
    np.testing.assert_array_equal(strict["strict_accuracy"], [1, 1, 0, 0])
    both = evaluator_reward(make_stub_evaluator(), only_strict=False)(images, prompts, meta)
    np.testing.assert_array_equal(both["accuracy"], [1, 1, 1, 0])
    np.testing.assert_allclose(both["score"], [1, 1, 0, 0])


def test_the_client_checks_the_records_before_sending_anything(geneval_server):
    srv, _ = geneval_server
    reward = get_reward("geneval", url=srv.url, **FAST)
    prompts = [GENEVAL[0]["prompt"], GENEVAL[1]["prompt"]]
    good = [json.dumps(GENEVAL[0]), json.dumps(GENEVAL[1])]
    images = images_with([1, 3])
    cases = [
        ({}, KeyError, r"geneval: meta\[.+metadata.+\] is required .*but meta has \[\].*data.format=.+flow_grpo"),
        ({"metadata": good[::-1]}, ValueError, r"row 0 is for prompt 'a photo of three cats' but the image's "
                                               r"prompt is 'a photo of a bench'"),
        ({"metadata": [good[0], "{tag: 1}"]}, ValueError, r"meta\['metadata'\] row 1 is not JSON"),
        ({"metadata": [good[0], "[1]"]}, ValueError, r"row 1 is a JSON list, expected an object"),
        ({"metadata": [json.dumps({"prompt": prompts[0]}), good[1]]}, ValueError,
         r"row 0 has tag None and include None; expected a GenEval record"),
        ({"metadata": good[:1]}, ValueError, r"meta\['metadata'\]: expected 2 strings, got 1"),
    ]
    for meta, error, message in cases:
        with pytest.raises(error, match=message):
            reward(images, prompts, meta)
    assert srv.scorer.stats["requests"] == 0
    with pytest.raises(BadRequest, match=r"HTTP 400.*row 1 is not JSON"):  # the server checks on its own too
        get_reward("remote", url=srv.url, **FAST)(images, prompts, {"metadata": [good[0], "{tag: 1}"]})


def canned(images, prompts, meta):
    """Replies chosen by the first prompt of a request: 'ok' a good one, the others each break the contract."""
    rows, half = len(images), np.full(len(images), 0.5)
    return {"over": {"score": np.full(rows, 1.5)}, "negative": {"score": -half},
            "fractional": {"score": half, "strict_accuracy": half},
            "per_tag": {"score": half, "counting_accuracy": np.full(rows, -10.0)},
            }.get(prompts[0], {"score": half, "accuracy": np.ones(rows)})


@pytest.mark.parametrize("mode, problem", [
    ("over", r"'score' is \[1.5, 1.5\] at rows \[2, 3\], expected in \[0, 1\]"),
    ("negative", r"'score' is \[-0.5, -0.5\] at rows \[2, 3\], expected in \[0, 1\]"),
    ("fractional", r"'strict_accuracy' is \[0.5, 0.5\] at rows \[2, 3\], expected 0 or 1"),
    ("per_tag", r"unknown entries \['counting_accuracy'\]; expected 'score' and optionally 'strict_accuracy'"),
])
def test_a_bad_reply_is_named_or_drops_only_its_groups(caplog, mode, problem):
    srv = make_server(canned, "canned", "127.0.0.1", 0, max_batch=2).start()  # each request scored alone
    prompts = ["ok", "ok", mode, mode]
    meta = {"metadata": metadata_for(prompts)}
    config = {"url": srv.url, "group_size": 2, "groups_per_request": 1, **FAST}
    try:
        with pytest.raises(BadReply, match=f"{srv.url}/score: bad GenEval reply for rows 2:4: {problem}"):
            get_reward("geneval", **config)(images_with([1] * 4), prompts, meta)
        with caplog.at_level(logging.WARNING):
            scores = get_reward("geneval", on_failure="drop", **config)(images_with([1] * 4), prompts, meta)
    finally:
        srv.stop()
    np.testing.assert_array_equal(scores["valid"], [1, 1, 0, 0])
    np.testing.assert_allclose(scores["score"][:2], 0.5)
    assert np.isnan(scores["score"][2:]).all() and "dropping groups [1] (rows 2:4)" in caplog.text


def test_the_adapter_refuses_an_evaluator_with_another_contract():
    prompts = [record["prompt"] for record in GENEVAL]
    meta = {"metadata": [json.dumps(record) for record in GENEVAL]}
    with pytest.raises(RewardError, match=r"the evaluator's accuracy for tag 'single_object' is \[0.5, -10.0"):
        evaluator_reward(make_stub_evaluator(by_tag_offset=0.5))(images_with([1, 3, 1, 0]), prompts, meta)

    def short(images, metadatas, only_strict):
        return [1.0], [1.0], [1.0], {}, {}

    with pytest.raises(RewardError, match="returned 1 scores, 1 accuracies and 1 strict accuracies for 4 images"):
        evaluator_reward(short)(images_with([1, 3, 1, 0]), prompts, meta)
    with pytest.raises(ValueError, match="evaluator='load_geneval'; expected 'module:factory'"):
        get_reward("geneval_evaluator", evaluator="load_geneval")

    srv = make_server(evaluator_reward(make_stub_evaluator(by_tag_offset=0.5)), "bad", "127.0.0.1", 0).start()
    try:  # served: a 500, retried, then an error; never a score
        with pytest.raises(RemoteRewardError, match="2 attempts.*RewardError: geneval_evaluator: the evaluator's"):
            get_reward("geneval", url=srv.url, **FAST)(images_with([1, 3, 1, 0]), prompts, meta)
    finally:
        srv.stop()


def test_the_documented_serve_command_runs_an_evaluator_factory():
    config = json.dumps({"evaluator": STUB, "only_strict": False})
    command = [sys.executable, "-m", "jax_inpaint_rl.rewards.serve", "--reward", "geneval_evaluator", "--port", "0",
               "--config", config]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line = process.stdout.readline()  # "serving reward 'geneval_evaluator' on http://127.0.0.1:PORT"
        assert "serving reward 'geneval_evaluator'" in line, line
        prompts = [record["prompt"] for record in GENEVAL]
        meta = {"metadata": [json.dumps(record) for record in GENEVAL]}
        scores = get_reward("geneval", url=line.split(" on ")[1].strip(), **FAST)(images_with([1, 2, 1, 1]),
                                                                                  prompts, meta)
    finally:
        process.terminate()
        process.wait(timeout=10)
    truth = expected(GENEVAL, [1, 2, 1, 1])
    np.testing.assert_allclose(scores["score"], truth["score"], rtol=1e-6)
    np.testing.assert_array_equal(scores["accuracy"], truth["accuracy"])


def test_the_trainer_hands_metadata_and_only_complete_target_texts_to_rewards():
    from jax_inpaint_rl.trainer.collect import reward_meta

    records = ['{"tag": "single_object"}', '{"tag": "two_object"}']
    batch = {"prompt": ["a", "a", "b", "b"], "target_text": [None] * 4, "metadata": [r for r in records for _ in "ab"]}
    meta = reward_meta(batch, group_size=2)
    assert "target_text" not in meta and meta["metadata"] == batch["metadata"]
    assert meta["group"].tolist() == [0, 0, 1, 1]
    assert reward_meta({**batch, "target_text": ["x"] * 4}, 2)["target_text"] == ["x"] * 4
