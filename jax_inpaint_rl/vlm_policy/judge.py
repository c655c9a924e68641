"""The VLM policy's reward: the seed's rubric through our OpenAI-compatible judge client (rewards/vlm.py).

Two questions per edited image, each answered 0-10 and parsed from the judge's answer by `vlm.parse_score`:
instruction following (the source image and the result shown) and visual quality (the result); the reward is
0.6 x following + 0.4 x quality in [0, 1]. Requests run concurrently and each is retried by the client
(`vlm.ask_score`: timeouts, 5xx, unparseable answers). A judgement that still fails is not scored (the seed
scores it 0.5): the sample comes back with valid False and the reason, and is dropped from its group's
statistics and from the loss. `identity_weight` > 0 mixes in identity preservation: 1 - mean |edited - source| / 255
over the whole image (the pixel measure of rewards/inpaint_scores.py; edit sets have no mask), so
reward = (1 - w) x rubric + w x identity; it needs no request and never fails.

A reward for this policy is `reward(images, sources, instructions, completions) -> (scores (B,) float32,
valid (B,) bool, reasons: list of B str, '' when valid)`; images and sources uint8 (B, H, W, 3).
"""
import concurrent.futures

import numpy as np

from jax_inpaint_rl.rewards.base import RewardError
from jax_inpaint_rl.rewards.inpaint_scores import match_scores
from jax_inpaint_rl.rewards.vlm import ChatEndpoint, ask_score, image_data_url

_ANSWER = 'Reply with JSON only: {"score": <number from 0 to 10>, "reason": "<one sentence>"}.'
RUBRIC = {  # aspect -> (system, user; "{instruction}" replaced), the images follow the text
    "instruction_following": (
        "You are a strict judge of image edits.",
        "Edit instruction: {instruction}\nThe first image is the original, the second the edited result. Rate from "
        "0 (ignores the instruction) to 10 (does exactly what it asks, changing nothing else) how well the result "
        "follows the instruction. " + _ANSWER),
    "quality": (
        "You are a strict judge of image quality.",
        "The image is the result of the edit: {instruction}\nRate from 0 (broken, artifacts, distorted) to 10 "
        "(natural, sharp, coherent) its visual quality, whatever the instruction asked. " + _ANSWER),
}
WEIGHTS = {"instruction_following": 0.6, "quality": 0.4}


def messages(aspect: str, instruction: str, images) -> list[dict]:
    system, user = RUBRIC[aspect]
    content = [{"type": "text", "text": user.replace("{instruction}", instruction)}]
    content += [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def make_judge(base_url: str, model: str, weights: dict | None = None, max_concurrency: int = 8,
               identity_weight: float = 0.0, **endpoint):
    """The rubric judge at an OpenAI-compatible `base_url` (up to /v1), mixed with identity preservation by
    `identity_weight` in [0, 1); `endpoint` takes ChatEndpoint's other fields (timeout_s, max_retries,
    backoff_s, api_key_env, ...)."""
    if not 0.0 <= identity_weight < 1.0:
        raise ValueError(f"vlm_policy judge: identity_weight={identity_weight}: expected a value in [0, 1)")
    weights = dict(WEIGHTS if weights is None else weights)
    unknown = sorted(set(weights) - set(RUBRIC))
    if unknown or not weights:
        raise ValueError(f"vlm_policy judge: weights {weights}: expected aspects among {sorted(RUBRIC)}")
    chat = ChatEndpoint(base_url=base_url, model=model, **endpoint)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="judge")

    def judge(images, sources, instructions, completions):
        del completions  # the judge rates the edit, not the text
        jobs = {(aspect, i): pool.submit(ask_score, chat, messages(
                    aspect, instructions[i], [sources[i], images[i]] if aspect == "instruction_following"
                    else [images[i]])) for aspect in weights for i in range(len(images))}
        scores, valid, reasons = np.zeros(len(images), np.float32), np.ones(len(images), bool), [""] * len(images)
        for (aspect, i), job in jobs.items():
            try:
                scores[i] += weights[aspect] * job.result() / sum(weights.values())
            except RewardError as error:
                valid[i], reasons[i] = False, f"{aspect}: {error}"
        if identity_weight:
            whole = np.ones(np.asarray(images).shape[:3], bool)
            identity = match_scores(np.asarray(images), np.asarray(sources), whole, "identity")["score"]
            scores = (1.0 - identity_weight) * scores + identity_weight * identity
        return np.where(valid, scores, 0.0).astype(np.float32), valid, reasons

    return judge
