"""Remote rewards: the trainer-side HTTP client for `python -m jax_inpaint_rl.rewards.serve`.

Wire format (both ends live here so they cannot drift): the request is
POST /score with an uncompressed .npz body holding `images`, `prompts` (str
array) and one `meta/<field>` entry per meta field; the reply is JSON
{"scores": {name: [floats]}} or, on failure, {"error": "..."} with HTTP 400 (bad
input), 401 (missing or wrong bearer token) or 413 (body too large), none of
them retried, or 5xx (retried).

The batch is split into requests of whole groups, sent concurrently. Groups come
from meta['group'] (one integer id per image, each group's rows together: the
trainer's group-major rollouts, or one group per image in evaluation); without
it, every `group_size` consecutive rows form a group. meta['group'] itself is not
sent unless `send_group` is set. Every reply is checked: one finite number per
image for every score, or `BadReply` naming the server and the rows. A request
that still fails after its retries (or answers badly) either raises
`RemoteRewardError` (on_failure="raise", the default) or, with on_failure="drop",
is logged and its groups come back as NaN with 'valid' = 0 so the trainer drops
them. Every reply carries 'valid'. A failure is never turned into a reward.
"""
import concurrent.futures
import http.client
import io
import json
import logging
import os
import random
import time
import urllib.parse
from typing import Any, Callable, Sequence

import numpy as np

from jax_inpaint_rl.rewards.base import Meta, RewardError, Scores, check_images, check_prompts, check_scores

log = logging.getLogger(__name__)


class RemoteRewardError(RewardError):
    """A remote reward server did not answer usefully after all retries."""


class BadRequest(RemoteRewardError):
    """The server refused the request itself (bad input, token or size); retrying cannot help."""


class BadReply(RemoteRewardError):
    """The server answered, but not with one finite number per image for every score."""


TOKEN_ENV = "REWARD_SERVER_TOKEN"  # bearer token for client and server when none is configured
REFUSALS = {400: "rejected the input", 401: "refused the token (set config token or $" + TOKEN_ENV + ")",
            413: "refused the body as too large"}


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
    if not body.startswith(b"PK\x03\x04"):  # np.load would try a pickle or a bare .npy instead
        raise ValueError(f"body is not an .npz archive (starts with {body[:16]!r}); send encode_request(...) output")
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if "images" not in arrays or "prompts" not in arrays:
        raise ValueError(f"request must hold 'images' and 'prompts', got {sorted(arrays)}")
    meta = {}
    for name, value in arrays.items():
        if name.startswith("meta/"):
            meta[name[len("meta/") :]] = value.tolist() if value.dtype.kind == "U" and value.ndim == 1 else value
    return arrays["images"], arrays["prompts"].tolist(), meta


def _post(url: str, body: bytes, timeout_s: float, token: str | None) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/x-npz"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        connection.request("POST", parts.path or "/", body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    try:
        reply = json.loads(payload)
    except json.JSONDecodeError:
        raise ConnectionError(f"HTTP {response.status}, body is not JSON: {payload[:200]!r}") from None
    problem = reply.get("error", reply) if isinstance(reply, dict) else reply
    if response.status in REFUSALS:
        raise BadRequest(f"{url} {REFUSALS[response.status]} (HTTP {response.status}): {problem}")
    if response.status != 200 or not isinstance(reply, dict) or "scores" not in reply:
        raise ConnectionError(f"HTTP {response.status}: {problem}")
    return reply["scores"]


def post_with_retries(url: str, body: bytes, timeout_s: float, max_retries: int, backoff_s: float,
                      token: str | None = None) -> dict[str, Any]:
    problem = "no attempt made"
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1) * (1 + 0.1 * random.random()))
        try:
            return _post(url, body, timeout_s, token)
        except BadRequest:
            raise
        except (OSError, http.client.HTTPException) as err:  # timeouts, refused/reset connections, 5xx
            problem = f"{type(err).__name__}: {err}"
    raise RemoteRewardError(f"{url}: no usable reply after {max_retries + 1} attempts; last problem: {problem}")


def check_reply(scores: Any, start: int, stop: int, url: str) -> Scores:
    """A server's scores for rows start:stop as float32 arrays, with 'valid' (all 1 unless the reply has its
    own); `BadReply` unless every entry has one finite number per row (NaN only where 'valid' is 0)."""
    where, rows = f"{url}: bad reply for rows {start}:{stop}", stop - start
    if not isinstance(scores, dict) or "score" not in scores:
        raise BadReply(f"{where}: expected {{'score': [{rows} numbers], ...}}, got {str(scores)[:200]}")
    out = {}
    for name, values in scores.items():
        if not isinstance(values, list) or len(values) != rows:
            got = f"a list of {len(values)}" if isinstance(values, list) else f"a {type(values).__name__}"
            raise BadReply(f"{where}: {name!r} is {got}, expected a list of {rows} numbers (one per image)")
        wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
        if wrong:
            raise BadReply(f"{where}: {name!r} holds {wrong[:3]!r}, expected numbers")
        out[name] = np.asarray(values, np.float32)
    valid = out.setdefault("valid", np.ones(rows, np.float32))
    if not np.isin(valid, (0, 1)).all():
        raise BadReply(f"{where}: 'valid' holds {sorted(set(valid.tolist()) - {0.0, 1.0})[:3]}, expected 0 or 1")
    for name, value in out.items():
        bad = ~np.isfinite(value) & (valid > 0)
        if bad.any():
            raise BadReply(f"{where}: {name!r} is not finite at rows {(start + np.flatnonzero(bad)).tolist()}, "
                           "expected finite numbers")
    return out


def group_starts(meta: Meta, batch: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First row and id of every group: from meta['group'] when present, else runs of `group_size` rows."""
    if "group" not in meta:
        if batch % group_size:
            raise ValueError(f"remote: batch of {batch} is not a whole number of groups of {group_size}; "
                             "pass meta['group'] (a group id per image) or set group_size")
        starts = np.arange(0, batch, group_size)
        return starts, starts // group_size
    ids = np.asarray(meta["group"])
    if ids.shape != (batch,) or ids.dtype.kind not in "iu":
        raise ValueError(f"remote: meta['group'] must be a ({batch},) integer array of group ids, "
                         f"got shape {ids.shape} dtype {ids.dtype}")
    starts = np.flatnonzero(np.diff(ids, prepend=ids[:1] - 1))
    if len(np.unique(ids)) != len(starts):
        raise ValueError(f"remote: meta['group'] must keep each group's rows together (group-major, e.g. "
                         f"0,0,1,1), got {ids.tolist()[:32]}")
    return starts, ids[starts]


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
    token: str | None = None,
    send_group: bool = False,
    reply_check: Callable[[Scores, int, int, str], None] | None = None,
):
    """Client for a reward server at `url` (e.g. http://127.0.0.1:8001); see module docstring.

    `token` defaults to $REWARD_SERVER_TOKEN; `send_group` forwards meta['group'] to a
    server whose reward reads it (by default it stays on the trainer side).
    `reply_check(scores, start, stop, url)` is a reward's own reply contract (ranges,
    names), raising `BadReply`; it runs on every reply after the generic check, so
    in drop mode a bad reply drops only its own groups.
    """
    if on_failure not in ("raise", "drop"):
        raise ValueError(f"remote: on_failure must be 'raise' or 'drop', got {on_failure!r}")
    score_url = url.rstrip("/") + "/score"
    token = token or os.environ.get(TOKEN_ENV)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="remote-reward")

    def score_chunk(body: bytes, start: int, stop: int) -> Scores:
        reply = post_with_retries(score_url, body, timeout_s, max_retries, backoff_s, token)
        scores = check_reply(reply, start, stop, score_url)
        if reply_check is not None:
            reply_check(scores, start, stop, score_url)
        return scores

    def remote_reward(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        prompts = check_prompts(prompts, len(images))
        batch = len(images)
        starts, ids = group_starts(meta, batch, group_size)
        sent = {field: value for field, value in meta.items() if field != "group" or send_group}
        cuts = [*starts[::groups_per_request].tolist(), batch]
        chunks = {
            (start, stop): ids[k * groups_per_request : (k + 1) * groups_per_request].tolist()
            for k, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:]))
        }
        jobs = {
            (start, stop): pool.submit(
                score_chunk, encode_request(images[start:stop], prompts[start:stop], _slice_meta(sent, start, stop)),
                start, stop,
            )
            for start, stop in chunks
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
            for name in names:  # 'valid' included: 1, or 0 where the reply marks its own rows invalid
                out[name][start:stop] = reply[name]
        for (start, stop), err in failed.items():
            log.warning("remote reward %s: dropping groups %s (rows %d:%d): %s",
                        score_url, chunks[start, stop], start, stop, err)
        return check_scores(out, batch, f"remote {score_url}")

    return remote_reward
