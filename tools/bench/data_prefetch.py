"""How long the training step waits for data, with and without prefetch.

    python -m tools.bench.data_prefetch [--examples 32] [--size 512] [--resolution 256]
        [--prompts 4] [--group 4] [--steps 12] [--step-seconds 0.15]

Writes a JSONL inpainting set of random PNGs (--size px) to a temporary folder,
then consumes --steps batches while a simulated accelerator step (sleep, which
like a running XLA program leaves the host free) takes --step-seconds. Prints the
consumer's total wait (`Loader.wait_seconds`) for prefetch=0 and prefetch=2 and
their ratio; with prefetch the wait should drop to about the first batch's cost
when a batch is cheaper to build than a step.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from jax_inpaint_rl.data import Loader, masks, open_source


def write_random_set(folder: Path, count: int, size: int) -> Path:
    """count random RGB PNGs with generated box masks, listed in folder/data.jsonl."""
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        mask = masks.generate("box", 0, index, size, size)[..., 0]
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{index}_mask.png")
        lines.append(json.dumps({"image_path": f"{index}.png", "mask_path": f"{index}_mask.png",
                                 "prompt": f"example {index}"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def consumer_wait(source, prefetch: int, args) -> tuple[float, float]:
    """(total seconds the consumer waited, wall seconds) over args.steps simulated steps."""
    start = time.perf_counter()
    with Loader(source, prompts_per_batch=args.prompts, group_size=args.group, resolution=args.resolution,
                prefetch=prefetch, validate=False) as loader:
        for _ in range(args.steps):
            next(loader)
            time.sleep(args.step_seconds)
        return loader.wait_seconds, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--step-seconds", type=float, default=0.15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        source = open_source(write_random_set(Path(folder), args.examples, args.size))
        results = {prefetch: consumer_wait(source, prefetch, args) for prefetch in (0, 2)}
    print(f"{args.steps} steps of {args.step_seconds:.3f} s, batches of {args.prompts}x{args.group} "
          f"from {args.size}px PNGs at {args.resolution}px")
    for prefetch, (wait, wall) in results.items():
        print(f"prefetch={prefetch}: consumer waited {wait:.3f} s in total ({wait / args.steps * 1e3:.1f} ms/step), "
              f"wall {wall:.2f} s")
    print(f"wait ratio prefetch=2 / prefetch=0: {results[2][0] / results[0][0]:.3f}")


if __name__ == "__main__":
    main()
