"""VLM judge: an OpenAI-compatible chat-completions client that asks a vision-language
model (Qwen-VL served by vLLM / sglang, or a hosted GPT-4-class model) to rate images.

Each template asks for a 0-10 rating of one aspect; the reward returns each aspect,
rescaled to [0, 1], as a sub-score and their mean as 'score'. Requests run
concurrently up to `max_concurrency`; each is retried with exponential backoff on
timeouts, connection errors, HTTP 408/429/5xx and unparseable answers. A request
that still fails raises `RewardError` naming the endpoint and the last problem:
the judge never turns a failure into a score.

The API key is read from the environment variable `api_key_env` (default
OPENAI_API_KEY) and sent as a bearer token when set; local servers need none.
Only the standard library is used for HTTP.
"""
import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from jax_inpaint_rl.rewards.base import Meta, RewardError, Scores, check_images, check_prompts, meta_image

SCORE_RANGE = (0.0, 10.0)
_ANSWER_FORMAT = 'Reply with JSON only: {"score": <number from 0 to 10>, "reason": "<one sentence>"}.'

# template name -> (system message, user message; "{prompt}" is replaced by the prompt); images follow the text
TEMPLATES: dict[str, tuple[str, str]] = {
    "alignment": (
        "You are a strict judge of image edits. You compare an edited image with its instruction.",
        "Instruction: {prompt}\n"
        "The first image is the original, the second is the result (if only one image is given, it is the result). "
        "Rate from 0 (ignores the instruction) to 10 (follows it exactly, including any requested text) "
        "how well the result follows the instruction. " + _ANSWER_FORMAT,
    ),
    "quality": (
        "You are a strict judge of image quality.",
        "The image was produced by filling a region of a photo; the request was: {prompt}\n"
        "Rate from 0 (broken, obvious artifacts or seams) to 10 (natural, seamless, sharp) the visual quality "
        "of the last image, ignoring whether it follows the request. " + _ANSWER_FORMAT,
    ),
}

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_LABELLED = re.compile(rf"(?:score|rating)\s*\**\s*[:=]?\s*\**\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?", re.IGNORECASE)
_FRACTION = re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*({_NUMBER})", re.IGNORECASE)
_ALONE = re.compile(rf"^\s*({_NUMBER})\s*\.?\s*$")


class ScoreParseError(RewardError):
    """The model's answer holds no usable score."""


def _json_score(text: str) -> float | None:
    """"score" of the last JSON object in the text that has a numeric one."""
    for candidate in reversed(_JSON_OBJECT.findall(text)):
        try:
            return float(json.loads(candidate)["score"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return None


def _text_score(text: str, low: float, high: float) -> float | None:
    """Last labelled score, else last fraction, else a lone number; "3/5" is rescaled to [low, high]."""
    for pattern in (_LABELLED, _FRACTION, _ALONE):
        matches = pattern.findall(text)
        if matches:
            value, denominator = matches[-1] if isinstance(matches[-1], tuple) else (matches[-1], "")
            if denominator and float(denominator) not in (0.0, high):
                return low + (high - low) * float(value) / float(denominator)
            return float(value)
    return None


def parse_score(answer: str, low: float = SCORE_RANGE[0], high: float = SCORE_RANGE[1]) -> float:
    """The rating in an answer, rescaled from [low, high] to [0, 1].

    Accepted, in this order: a JSON object with "score"; "score: 7", "Rating = 7/10";
    a bare "7/10" or "7 out of 10"; an answer that is only a number. Reasoning in
    <think> blocks is ignored. Anything else, or a value outside [low, high], raises
    ScoreParseError.
    """
    text = _THINK.sub("", answer or "")
    value = _json_score(text)
    if value is None:
        value = _text_score(text, low, high)
    if value is None:
        raise ScoreParseError(f"no score found in answer {answer[:200]!r}")
    if not np.isfinite(value) or not low <= value <= high:
        raise ScoreParseError(f"score {value} outside [{low}, {high}] in answer {answer[:200]!r}")
    return (value - low) / (high - low)


def image_data_url(image: np.ndarray) -> str:
    """uint8 (H, W, 3) -> PNG data URL, the form chat-completions APIs take inline."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(template: str, prompt: str, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    system, user = TEMPLATES[template]
    content = [{"type": "text", "text": user.replace("{prompt}", prompt)}]
    content += [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


@dataclasses.dataclass(frozen=True)
class ChatEndpoint:
    base_url: str  # up to and including /v1, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0  # per socket operation (connect, each read)
    max_retries: int = 3  # attempts after the first
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k, plus up to 10% jitter
    temperature: float = 0.0
    max_tokens: int = 256

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def _post_chat(endpoint: ChatEndpoint, messages: list[dict[str, Any]]) -> str:
    """One request; returns the answer text or raises (urllib / json / KeyError)."""
    body = {"model": endpoint.model, "messages": messages, "temperature": endpoint.temperature, "max_tokens": endpoint.max_tokens}
    headers = {"Content-Type": "application/json"}
    api_key = os.environ.get(endpoint.api_key_env)
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint.url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=endpoint.timeout_s) as response:
        reply = json.loads(response.read())
    return reply["choices"][0]["message"]["content"]


def ask_score(endpoint: ChatEndpoint, messages: list[dict[str, Any]]) -> float:
    """Ask until an answer parses, retrying transient failures; RewardError after the last try."""
    problem = "no attempt made"
    for attempt in range(endpoint.max_retries + 1):
        if attempt:
            delay = endpoint.backoff_s * 2 ** (attempt - 1)
            time.sleep(delay * (1 + 0.1 * random.random()))
        try:
            return parse_score(_post_chat(endpoint, messages))
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            problem = f"HTTP {err.code}: {detail}"
            if err.code in (401, 403):
                raise RewardError(f"vlm: {endpoint.url} refused the request ({problem}); set ${endpoint.api_key_env}") from err
            if err.code not in _RETRY_STATUS:
                raise RewardError(f"vlm: {endpoint.url} rejected the request ({problem})") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            problem = f"malformed response ({type(err).__name__}: {err})"
        except ScoreParseError as err:
            problem = str(err)
    raise RewardError(f"vlm: {endpoint.url} failed after {endpoint.max_retries + 1} attempts; last problem: {problem}")


def make_vlm_reward(
    base_url: str,
    model: str,
    templates: Sequence[str] = ("alignment", "quality"),
    weights: Mapping[str, float] | None = None,
    include_source: bool = True,
    max_concurrency: int = 8,
    **endpoint_config,
):
    """VLM judge reward; `endpoint_config` takes the other ChatEndpoint fields.

    'score' is the weighted mean of the templates' scores (equal weights by default).
    With `include_source`, the alignment template also sees meta['source'].
    """
    unknown = [t for t in templates if t not in TEMPLATES]
    if unknown or not templates:
        raise ValueError(f"vlm: unknown templates {unknown or list(templates)}; known: {sorted(TEMPLATES)}")
    weights = {t: float((weights or {}).get(t, 1.0)) for t in templates}
    endpoint = ChatEndpoint(base_url=base_url, model=model, **endpoint_config)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vlm")

    def vlm_reward(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        prompts = check_prompts(prompts, len(images))
        source = meta_image(meta, "source", images, "vlm") if include_source and "source" in meta else None
        jobs = {}
        for template in templates:
            for i, (image, prompt) in enumerate(zip(images, prompts)):
                shown = [source[i], image] if template == "alignment" and source is not None else [image]
                jobs[template, i] = pool.submit(ask_score, endpoint, build_messages(template, prompt, shown))
        try:
            scores = {t: np.asarray([jobs[t, i].result() for i in range(len(images))], np.float32) for t in templates}
        except RewardError:
            for job in jobs.values():
                job.cancel()
            raise
        total = sum(weights[t] * scores[t] for t in templates) / sum(weights.values())
        return {"score": total, **scores}

    return vlm_reward
