"""What a run shows people: JSONL + TensorBoard metrics, PNG sample grids, the reward curve."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8."""
    return np.asarray(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


class MetricLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    Every line names its phase ('autoencoder', 'warmup', 'rl'): steps count autoencoder
    steps in the first and optimizer steps in the others. Non-finite values are written
    as null (JSON has no NaN)."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard")) if enabled else None

    def write(self, step: int, record: dict, phase: str = "rl") -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in record.items() if np.ndim(v) == 0 and not isinstance(v, str)}
        line = {"step": step, "phase": phase, **{k: v if np.isfinite(v) else None for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def lines(self) -> int:
        """Lines written so far (saved with a checkpoint)."""
        if not (self.enabled and os.path.exists(self.path)):
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def truncate(self, lines: int) -> None:
        """Keep the first `lines` lines: a resumed run logs again what it does again."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            kept = f.readlines()[:lines]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def save_grid(path: str, rows: list[list[np.ndarray]], titles: list[str]) -> None:
    """One row per example: e.g. source | mask | result | target (uint8 HxWx3 or HxWx1)."""
    rows = [[np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img for img in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    pad = 2
    grid = np.full((len(rows) * (h + pad) + pad, len(titles) * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = img
    scale = max(1, 256 // w)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def save_reward_curve(path: str, history: list[dict]) -> None:
    """Train and eval reward means against the update step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("reward_mean", "train rollouts"), ("eval_reward", "held-out eval")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "eval_reward" else None, label=label)
    ax.set_xlabel("update step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
