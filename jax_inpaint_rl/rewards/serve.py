"""Serve any registered reward over HTTP, batching concurrent requests.

    python -m jax_inpaint_rl.rewards.serve --reward ocr --host 127.0.0.1 --port 8001 \
        --config '{"mode": "crop"}' --max-batch 64 --max-wait-ms 20

Requests that arrive while the reward is busy (or within `max_wait_ms` of each
other) are concatenated into one call of up to `max_batch` images, so a GPU
reward model sees large batches even when many trainer hosts send small ones.
Only requests with the same image size and meta fields are merged. Endpoints:
POST /score (wire format in `remote.py`), GET /health. Bind to 127.0.0.1 unless
the network is trusted: there is no authentication.
"""
import argparse
import concurrent.futures
import http.server
import json
import logging
import queue
import threading
import time
from typing import Any, Sequence

import numpy as np

from jax_inpaint_rl.rewards import get_reward, reward_names
from jax_inpaint_rl.rewards.base import Meta, Reward, Scores, check_images, check_scores
from jax_inpaint_rl.rewards.remote import decode_request

log = logging.getLogger(__name__)


def _merge_key(images: np.ndarray, meta: Meta) -> tuple:
    """Requests with equal keys can be concatenated along the batch axis."""
    fields = tuple(sorted((k, np.asarray(v).shape[1:], isinstance(v, list)) for k, v in meta.items()))
    return images.shape[1:], fields


def _concat(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], list):
        return [item for part in parts for item in part]
    return np.concatenate([np.asarray(p) for p in parts])


class BatchingScorer:
    """Runs `reward` on one worker thread over batches merged from concurrent `score` calls."""

    def __init__(self, reward: Reward, name: str, max_batch: int, max_wait_s: float):
        self.reward, self.name, self.max_batch, self.max_wait_s = reward, name, max_batch, max_wait_s
        self.jobs: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "images": 0}
        self._held: list[tuple] = []  # a job that did not fit the previous batch
        self._worker = threading.Thread(target=self._run, name=f"reward-{name}", daemon=True)
        self._worker.start()

    def score(self, images: np.ndarray, prompts: list[str], meta: Meta) -> Scores:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((images, prompts, meta, done))
        return done.result()

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


def make_handler(scorer: BatchingScorer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._reply(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})
            self._reply(200, {"reward": scorer.name, **scorer.stats})

        def do_POST(self) -> None:
            if self.path != "/score":
                return self._reply(404, {"error": f"unknown path {self.path}; use POST /score"})
            try:
                images, prompts, meta = decode_request(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                check_images(images)
            except Exception as err:
                return self._reply(400, {"error": f"malformed request: {type(err).__name__}: {err}"})
            try:
                scores = scorer.score(images, prompts, meta)
            except (ValueError, KeyError) as err:  # the reward's own input checks
                return self._reply(400, {"error": f"{type(err).__name__}: {err}"})
            except Exception as err:
                log.exception("reward %s failed", scorer.name)
                return self._reply(500, {"error": f"{type(err).__name__}: {err}"})
            self._reply(200, {"scores": {k: v.tolist() for k, v in scores.items()}})

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def make_server(reward: Reward, name: str, host: str, port: int, max_batch: int = 64, max_wait_ms: float = 10.0):
    """A ThreadingHTTPServer (not yet serving) and its scorer; port 0 picks a free port."""
    scorer = BatchingScorer(reward, name, max_batch, max_wait_ms / 1000.0)
    server = http.server.ThreadingHTTPServer((host, port), make_handler(scorer))
    server.daemon_threads = True
    return server, scorer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help=f"registered reward name, one of {reward_names()}")
    parser.add_argument("--config", default="{}", help="JSON object of keyword arguments for the reward's factory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (printed at start)")
    parser.add_argument("--max-batch", type=int, default=64, help="most images per reward call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as err:
        parser.error(f"--config is not valid JSON ({err}): {args.config!r}")
    if not isinstance(config, dict):
        parser.error(f"--config must be a JSON object, got {args.config!r}")
    server, _ = make_server(get_reward(args.reward, **config), args.reward, args.host, args.port, args.max_batch, args.max_wait_ms)
    host, port = server.server_address[:2]
    print(f"serving reward {args.reward!r} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
