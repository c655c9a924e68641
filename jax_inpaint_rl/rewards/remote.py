"""Remote rewards: the trainer-side HTTP client for `python -m jax_inpaint_rl.rewards.serve`.

Wire format (both ends live here so they cannot drift): the request is
POST /score with an uncompressed .npz body holding `images`, `prompts` (str
array) and one `meta/<field>` entry per meta field; the reply is JSON
{"scores": {name: [floats]}} or, on failure, {"error": "..."} with HTTP 400
(bad input: not retried) or 500 (retried).

The batch is split into requests of whole GRPO groups (`group_size` consecutive
samples share a prompt), sent concurrently. A request that still fails after its
retries either raises `RemoteRewardError` (on_failure="raise", the default) or,
with on_failure="drop", is logged and its samples come back as NaN with
'valid' = 0 so the trainer drops those groups. Every reply carries 'valid'.
A failure is never turned into a zero reward.
"""
import concurrent.futures
import http.client
import io
import json
import logging
import random
import time
import urllib.parse
from typing import Any, Sequence

import numpy as np

from jax_inpaint_rl.rewards.base import Meta, RewardError, Scores, check_images, check_prompts, check_scores

log = logging.getLogger(__name__)


class RemoteRewardError(RewardError):
    """A remote reward server did not answer usefully after all retries."""


class BadRequest(RemoteRewardError):
    """The server rejected the input itself (HTTP 400); retrying cannot help."""


def encode_request(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> bytes:
    arrays = {"images": np.asarray(images), "prompts": np.asarray(list(prompts), dtype=str)}
    for field, value in meta.items():
        arrays[f"meta/{field}"] = np.asarray(value if not isinstance(value, tuple) else list(value))
        if arrays[f"meta/{field}"].dtype == object:
            raise ValueError(f"meta[{field!r}]: cannot send an object array; use equal-shape arrays or a list of strings")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_request(body: bytes) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Inverse of `encode_request`; 1-D string arrays come back as lists of str."""
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if "images" not in arrays or "prompts" not in arrays:
        raise ValueError(f"request must hold 'images' and 'prompts', got {sorted(arrays)}")
    meta = {}
    for name, value in arrays.items():
        if name.startswith("meta/"):
            meta[name[len("meta/") :]] = value.tolist() if value.dtype.kind == "U" and value.ndim == 1 else value
    return arrays["images"], arrays["prompts"].tolist(), meta


def _post(url: str, body: bytes, timeout_s: float) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        connection.request("POST", parts.path or "/", body=body, headers={"Content-Type": "application/x-npz"})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    try:
        reply = json.loads(payload)
    except json.JSONDecodeError:
        raise ConnectionError(f"HTTP {response.status}, body is not JSON: {payload[:200]!r}") from None
    if response.status == 400:
        raise BadRequest(f"{url} rejected the input: {reply.get('error', reply)}")
    if response.status != 200 or "scores" not in reply:
        raise ConnectionError(f"HTTP {response.status}: {reply.get('error', reply)}")
    return reply["scores"]


def post_with_retries(url: str, body: bytes, timeout_s: float, max_retries: int, backoff_s: float) -> dict[str, Any]:
    problem = "no attempt made"
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1) * (1 + 0.1 * random.random()))
        try:
            return _post(url, body, timeout_s)
        except BadRequest:
            raise
        except (OSError, http.client.HTTPException) as err:  # timeouts, refused/reset connections, 5xx
            problem = f"{type(err).__name__}: {err}"
    raise RemoteRewardError(f"{url}: no usable reply after {max_retries + 1} attempts; last problem: {problem}")


def _slice_meta(meta: Meta, start: int, stop: int) -> dict[str, Any]:
    return {field: value[start:stop] for field, value in meta.items()}


def make_remote_reward(
    url: str,
    timeout_s: float = 120.0,
    max_retries: int = 3,
    backoff_s: float = 1.0,
    group_size: int = 1,
    groups_per_request: int = 4,
    max_concurrency: int = 4,
    on_failure: str = "raise",
):
    """Client for a reward server at `url` (e.g. http://127.0.0.1:8001); see module docstring."""
    if on_failure not in ("raise", "drop"):
        raise ValueError(f"remote: on_failure must be 'raise' or 'drop', got {on_failure!r}")
    score_url = url.rstrip("/") + "/score"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="remote-reward")

    def remote_reward(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        prompts = check_prompts(prompts, len(images))
        batch = len(images)
        if batch % group_size:
            raise ValueError(f"remote: batch of {batch} is not a whole number of groups of {group_size}")
        step = group_size * groups_per_request
        chunks = [(start, min(start + step, batch)) for start in range(0, batch, step)]
        jobs = {
            chunk: pool.submit(
                post_with_retries,
                score_url,
                encode_request(images[slice(*chunk)], prompts[slice(*chunk)], _slice_meta(meta, *chunk)),
                timeout_s,
                max_retries,
                backoff_s,
            )
            for chunk in chunks
        }
        replies, failed = {}, {}
        for chunk, job in jobs.items():
            try:
                replies[chunk] = job.result()
            except BadRequest:
                raise
            except RemoteRewardError as err:
                if on_failure == "raise":
                    raise
                failed[chunk] = err
        if not replies:
            raise RemoteRewardError(f"{score_url}: every request failed; first problem: {next(iter(failed.values()))}")
        names = sorted(next(iter(replies.values())))
        if any(sorted(reply) != names for reply in replies.values()):
            raise RemoteRewardError(f"{score_url}: replies disagree on score names: {[sorted(r) for r in replies.values()]}")
        out = {name: np.full(batch, np.nan, np.float32) for name in names}
        out["valid"] = np.zeros(batch, np.float32)
        for (start, stop), reply in replies.items():
            for name in names:
                out[name][start:stop] = reply[name]
            out["valid"][start:stop] = 1.0
        for (start, stop), err in failed.items():
            groups = list(range(start // group_size, stop // group_size))
            log.warning("remote reward %s: dropping groups %s (samples %d:%d): %s", score_url, groups, start, stop, err)
        return check_scores(out, batch, f"remote {score_url}")

    return remote_reward
