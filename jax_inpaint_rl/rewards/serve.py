"""Serve any registered reward over HTTP (uvicorn + a plain ASGI app), batching concurrent requests.

    python -m jax_inpaint_rl.rewards.serve --reward ocr --host 127.0.0.1 --port 8001 \
        --config '{"mode": "crop"}' --max-batch 64 --max-wait-ms 20 --max-body-mb 64

Requests that arrive while the reward is busy (or within `max_wait_ms` of each
other) are concatenated into one call of up to `max_batch` images, so a GPU
reward model sees large batches even when many trainer hosts send small ones.
Every request is checked on its own first (one row per image in every meta
field), and only requests with the same image size and meta fields, shapes and
dtypes are merged, so a merged batch's meta stays aligned with its images.

Endpoints: POST /score (wire format in `remote.py`), GET /health. Limits: a body
over `max_body_mb` gets 413 before it is read; a body that stops arriving for
`read_timeout_s` gets 408 and the connection is closed. With a token (`--token`
or $REWARD_SERVER_TOKEN) every request must carry `Authorization: Bearer <token>`
or gets 401; without one, bind to 127.0.0.1 or a trusted network.
"""
import argparse
import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Sequence

import numpy as np
import uvicorn

from jax_inpaint_rl.rewards import get_reward, reward_names
from jax_inpaint_rl.rewards.base import Meta, Reward, check_images, check_prompts, check_scores
from jax_inpaint_rl.rewards.remote import TOKEN_ENV, decode_request

log = logging.getLogger(__name__)


def check_request(images: Any, prompts: Any, meta: Meta) -> tuple[np.ndarray, list[str], Meta]:
    """One request on its own: uint8 images, one prompt and one row of every meta field per image.

    Runs before merging: rows that do not line up would otherwise shift every later
    request's meta in a merged batch onto the wrong images.
    """
    images = check_images(images)
    batch = len(images)
    if not isinstance(prompts, list):  # a 0-d string array decodes to a str, whose characters are no prompts
        raise ValueError(f"prompts: expected a 1-D array of {batch} strings, got {type(prompts).__name__}")
    prompts = check_prompts(prompts, batch)
    for field, value in meta.items():
        rows = len(value) if isinstance(value, list) else (np.shape(value) or (None,))[0]
        if rows != batch:
            shape = f"{len(value)} strings" if isinstance(value, list) else f"shape {np.shape(value)}"
            raise ValueError(f"meta[{field!r}] has {shape}, expected {batch} rows (one per image)")
    return images, prompts, meta


def _merge_key(images: np.ndarray, meta: Meta) -> tuple:
    """Requests with equal keys can be concatenated along the batch axis without changing any dtype."""
    fields = tuple(
        sorted((k, "str") if isinstance(v, list) else (k, v.shape[1:], v.dtype.str) for k, v in meta.items())
    )
    return images.shape[1:], fields


def _concat(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], list):
        return [item for part in parts for item in part]
    return np.concatenate(parts)


class BatchingScorer:
    """Runs `reward` on one worker thread over batches merged from concurrent `submit` calls."""

    def __init__(self, reward: Reward, name: str, max_batch: int, max_wait_s: float):
        self.reward, self.name, self.max_batch, self.max_wait_s = reward, name, max_batch, max_wait_s
        self.jobs: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "images": 0}
        self._held: list[tuple] = []  # a job that did not fit the previous batch
        self._worker = threading.Thread(target=self._run, name=f"reward-{name}", daemon=True)
        self._worker.start()

    def submit(self, images: np.ndarray, prompts: list[str], meta: Meta) -> concurrent.futures.Future:
        """Queue one request already passed by `check_request`; the future holds its scores."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((images, prompts, meta, done))
        return done

    def _collect(self) -> list[tuple]:
        """The next job plus compatible ones arriving within max_wait_s, up to max_batch images."""
        first = self._held.pop() if self._held else self.jobs.get()
        batch, size, key = [first], len(first[0]), _merge_key(first[0], first[2])
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if _merge_key(job[0], job[2]) != key or size + len(job[0]) > self.max_batch:
                self._held.append(job)  # starts the next batch
                break
            batch.append(job)
            size += len(job[0])
        return batch

    def _score(self, batch: list[tuple]) -> None:
        """Score merged jobs; if the merged call fails, score each job alone so one bad request fails alone."""
        try:
            images = _concat([job[0] for job in batch])
            prompts = _concat([job[1] for job in batch])
            meta = {field: _concat([job[2][field] for job in batch]) for field in batch[0][2]}
            scores = check_scores(self.reward(images, prompts, meta), len(images), self.name)
        except Exception as err:  # handed to the waiting request, never swallowed
            if len(batch) > 1:
                for job in batch:
                    self._score([job])
            else:
                batch[0][3].set_exception(err)
            return
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["images"] += len(images)
        start = 0
        for job in batch:
            stop = start + len(job[0])
            job[3].set_result({k: v[start:stop] for k, v in scores.items()})
            start = stop

    def _run(self) -> None:
        while True:
            self._score(self._collect())


class Refused(Exception):
    """An error answer: HTTP status, message, and whether to close the connection (body left unread)."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


async def _reply(send, status: int, payload: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive, headers: dict[bytes, bytes], max_bytes: int, timeout_s: float) -> bytes | None:
    """The request body, or None if the client left; `Refused` past `max_bytes` or `timeout_s` of silence.

    A declared Content-Length over the limit is answered before one byte is read; the connection
    stays open and uvicorn discards the rest as it arrives, so the client reads the 413 rather than
    a reset. A stalled body closes the connection (its remaining bytes may never come).
    """
    declared = headers.get(b"content-length")
    if declared is not None and int(declared) > max_bytes:
        raise Refused(413, f"body of {int(declared)} bytes is over this server's limit of {max_bytes} bytes "
                           "(--max-body-mb); send fewer images per request (client groups_per_request)")
    chunks, received, more = [], 0, True
    while more:
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except TimeoutError:
            expected = f"{int(declared)} declared" if declared is not None else "chunked"
            raise Refused(408, f"request body: received {received} bytes ({expected}), then nothing for "
                               f"{timeout_s} s (--read-timeout-s)", close=True) from None
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        received += len(chunks[-1])
        if received > max_bytes:
            raise Refused(413, f"chunked body passed this server's limit of {max_bytes} bytes (--max-body-mb)",
                          close=True)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _parse(body: bytes) -> tuple[np.ndarray, list[str], Meta]:
    try:
        return check_request(*decode_request(body))
    except Exception as err:
        raise Refused(400, f"malformed request: {type(err).__name__}: {err}") from None


def make_app(scorer: BatchingScorer, max_body_bytes: int, read_timeout_s: float, token: str | None):
    """The ASGI app: auth, routing, bounded body reads; decoding runs off the event loop, scoring in `scorer`."""
    expected_auth = f"Bearer {token}".encode() if token else None

    async def score(receive, headers: dict[bytes, bytes]) -> dict[str, Any] | None:
        body = await read_body(receive, headers, max_body_bytes, read_timeout_s)
        if body is None:
            return None
        images, prompts, meta = await asyncio.get_running_loop().run_in_executor(None, _parse, body)
        try:
            scores = await asyncio.wrap_future(scorer.submit(images, prompts, meta))
        except (ValueError, KeyError) as err:  # the reward's own input checks
            raise Refused(400, f"{type(err).__name__}: {err}") from None
        except Exception as err:
            log.error("reward %s failed: %s: %s", scorer.name, type(err).__name__, err, exc_info=err)
            raise Refused(500, f"{type(err).__name__}: {err}") from None
        return {"scores": {k: v.tolist() for k, v in scores.items()}}

    async def app(scope, receive, send) -> None:
        headers = dict(scope["headers"])
        route = (scope["method"], scope["path"])
        try:
            if expected_auth and not hmac.compare_digest(headers.get(b"authorization", b""), expected_auth):
                raise Refused(401, "missing or wrong 'Authorization: Bearer <token>' header")
            if route == ("GET", "/health"):
                return await _reply(send, 200, {"reward": scorer.name, **scorer.stats})
            if route != ("POST", "/score"):
                raise Refused(404, f"no {route[0]} {route[1]}; use GET /health or POST /score")
            payload = await score(receive, headers)
            if payload is not None:
                await _reply(send, 200, payload)
        except Refused as err:
            extra = [(b"connection", b"close")] if err.close else []
            if err.status == 401:
                extra.append((b"www-authenticate", b"Bearer"))
            await _reply(send, err.status, {"error": err.message}, extra)

    return app


class RewardServer:
    """uvicorn on a socket bound at construction (so port 0 is resolved before serving)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, scorer: BatchingScorer):
        self.server, self.sock, self.scorer = uvicorn.Server(config), sock, scorer
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (main thread) or `stop()`."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout_s: float = 10.0) -> "RewardServer":
        """Serve in a daemon thread; returns once uvicorn accepts connections."""
        self._thread = threading.Thread(target=self.serve, name="reward-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"reward server on {self.url} did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.sock.close()


def make_server(
    reward: Reward,
    name: str,
    host: str,
    port: int,
    max_batch: int = 64,
    max_wait_ms: float = 10.0,
    max_body_mb: float = 64.0,
    read_timeout_s: float = 30.0,
    token: str | None = None,
    backlog: int = 2048,
    keep_alive_s: int = 5,
) -> RewardServer:
    """A bound, listening server (not yet serving); port 0 picks a free port (see `.url`).

    The listen backlog absorbs bursts of connections while the event loop is busy;
    `keep_alive_s` is how long an idle kept-alive connection stays open.
    """
    scorer = BatchingScorer(reward, name, max_batch, max_wait_ms / 1000.0)
    app = make_app(scorer, int(max_body_mb * 2**20), read_timeout_s, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as err:
        raise OSError(err.errno, f"reward server: cannot listen on {host}:{port}: {err.strerror}") from err
    # h11 (uvicorn's pure-Python parser) everywhere, so the limits behave as tested whatever else is installed.
    config = uvicorn.Config(app, http="h11", ws="none", lifespan="off", log_config=None, access_log=False,
                            backlog=backlog, timeout_keep_alive=keep_alive_s, timeout_graceful_shutdown=5)
    return RewardServer(config, sock, scorer)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help=f"registered reward name, one of {reward_names()}")
    parser.add_argument("--config", default="{}", help="JSON object of keyword arguments for the reward's factory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (printed at start)")
    parser.add_argument("--max-batch", type=int, default=64, help="most images per reward call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="larger request bodies get 413 unread")
    parser.add_argument("--read-timeout-s", type=float, default=30.0, help="a body that stalls this long gets 408")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require 'Authorization: Bearer <token>' (default ${TOKEN_ENV}: out of ps)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as err:
        parser.error(f"--config is not valid JSON ({err}): {args.config!r}")
    if not isinstance(config, dict):
        parser.error(f"--config must be a JSON object, got {args.config!r}")
    server = make_server(get_reward(args.reward, **config), args.reward, args.host, args.port, args.max_batch,
                         args.max_wait_ms, args.max_body_mb, args.read_timeout_s, args.token or None)
    print(f"serving reward {args.reward!r} on {server.url}", flush=True)
    log.info("reward server: %s", "bearer token required" if args.token else "no authentication (no --token)")
    server.serve()


if __name__ == "__main__":
    main()
