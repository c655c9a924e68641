"""What a run shows people: JSONL + TensorBoard metrics, PNG sample grids, the reward curve."""
import functools
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8."""
    return np.asarray(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


class MetricLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    Every line names its phase ('autoencoder', 'warmup', 'rl', 'control'): steps count autoencoder
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


FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
CELL = 128  # px: grid images are upscaled (nearest neighbour) by the largest whole factor that fits
PAD = 4  # px between cells
TEXT = 16  # px: the height of a line of titles, captions and notes


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans where installed, else Pillow's bundled scalable font."""
    return ImageFont.truetype(FONT_PATH, size) if os.path.isfile(FONT_PATH) else ImageFont.load_default(size)


def upscaled(image: np.ndarray, size: int = CELL) -> np.ndarray:
    """(H, W, 3|1) uint8 repeated by max(1, size // W) along both axes (nearest neighbour), as RGB."""
    factor = max(1, size // image.shape[1])
    image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def outlined(image: np.ndarray, mask: np.ndarray, size: int = CELL) -> np.ndarray:
    """The image upscaled with the edge of the (H, W, 1) mask (uint8, 255 = fill) drawn on it, black just inside
    and white just outside, so it shows on dark and light images: where the fill goes."""
    big, region = upscaled(image, size).copy(), Image.fromarray(upscaled(mask, size)[..., 0])
    inside = np.asarray(region) > 127
    eroded = np.asarray(region.filter(ImageFilter.MinFilter(5))) > 127
    dilated = np.asarray(region.filter(ImageFilter.MaxFilter(3))) > 127
    big[inside & ~eroded] = 0
    big[dilated & ~inside] = 255
    return big


def save_grid(path: str, rows: list[list[np.ndarray]], titles: list[str], captions: list[str] | None = None,
              notes: list[list[str]] | None = None) -> None:
    """One row per example (uint8 (H, W, 3|1) cells, each upscaled to about CELL px), `titles` over the
    columns, a caption under each row (e.g. its prompt) and a note under each cell (e.g. its reward)."""
    cells = [[upscaled(cell) for cell in row] for row in rows]
    height, width = cells[0][0].shape[:2]
    below = TEXT * ((notes is not None) + (captions is not None))
    row_height = height + below + PAD
    canvas = Image.new("RGB", (len(titles) * (width + PAD) + PAD, TEXT + PAD + len(rows) * row_height), "white")
    draw, font = ImageDraw.Draw(canvas), _font(TEXT - 4)
    for column, title in enumerate(titles):
        draw.text((PAD + column * (width + PAD) + width / 2, TEXT / 2 + 1), title, fill="black", font=font, anchor="mm")
    for r, row in enumerate(cells):
        top = TEXT + PAD + r * row_height
        for c, cell in enumerate(row):
            left = PAD + c * (width + PAD)
            canvas.paste(Image.fromarray(cell), (left, top))
            if notes is not None:
                draw.text((left + width / 2, top + height + TEXT / 2), notes[r][c], fill="black", font=font,
                          anchor="mm")
        if captions is not None:
            draw.text((PAD, top + below + height - TEXT / 2), captions[r], fill="black", font=font, anchor="lm")
    canvas.save(path, optimize=True)


def save_results(path: str, rows: list[dict]) -> None:
    """An evaluation's grid rows (evaluate.grid_fields: prompt, result, score, and the images the data has) as
    stacked arrays in an .npz."""
    np.savez_compressed(path, **{name: np.stack([row[name] for row in rows]) for name in rows[0]})


def load_results(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no evaluation results (eval_<tag>.npz, written by trainer/evaluate.py)")
    with np.load(path) as results:
        return {name: results[name] for name in results.files}


def _context_columns(results: dict) -> tuple[list[str], list[np.ndarray]]:
    """(titles, per-row cells) of the source with the mask outlined, or whatever of them the data has."""
    if "image" in results and "mask" in results:
        return ["source, mask outlined"], [outlined(i, m) for i, m in zip(results["image"], results["mask"])]
    for name, title in (("image", "source"), ("mask", "mask")):
        if name in results:
            return [title], list(results[name])
    return [], []


def save_eval_grid(path: str, rows: list[dict]) -> None:
    """An evaluation's grid: source with the mask outlined | result (its reward under it) | target."""
    results = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    save_comparison(path, {"result": results})


def save_comparison(path: str, arms: dict) -> None:
    """Several evaluations of the same held-out examples side by side: source with the mask outlined | one
    result column per arm (its reward under it) | target. `arms`: {column title: the evaluation's .npz path
    (or its loaded arrays)}."""
    loaded = {title: load_results(value) if isinstance(value, str) else value for title, value in arms.items()}
    first = next(iter(loaded.values()))
    for title, results in loaded.items():
        if list(results["prompt"]) != list(first["prompt"]):
            raise ValueError(f"{path}: arm {title!r} evaluated other examples ({list(results['prompt'])[:3]}...) "
                             f"than the first arm ({list(first['prompt'])[:3]}...)")
    titles, context = _context_columns(first)
    titles += list(loaded)
    count = len(first["prompt"])
    rows = [([context[i]] if context else []) + [results["result"][i] for results in loaded.values()]
            for i in range(count)]
    notes = [([""] if context else []) + [f"reward {results['score'][i]:.2f}" for results in loaded.values()]
             for i in range(count)]
    if "target" in first:
        titles.append("target")
        for i in range(count):
            rows[i].append(first["target"][i])
            notes[i].append("")
    save_grid(path, rows, titles, [str(prompt) for prompt in first["prompt"]], notes)


SUMMARY_ARMS = {"eval_after_warmup": "after warm-up", "eval_after_rl": "after RL",
                "eval_after_control": "SFT control"}  # summary.json's evaluations, in the table's row order


def arms_table(summary: dict) -> str:
    """The held-out evaluations a run's summary has, as a Markdown table: the reward and the mean of every part
    the rewards report (an accuracy's mean is the fraction of fills it counts right), one row per arm."""
    arms = {label: summary[key] for key, label in SUMMARY_ARMS.items() if key in summary}
    if not arms:
        return ""
    parts = [name for name in next(iter(arms.values())) if name not in ("reward", "examples", "grid", "results")]
    lines = ["| held-out (%d examples) | reward | %s |" % (next(iter(arms.values()))["examples"], " | ".join(parts)),
             "| --- " * (len(parts) + 2) + "|"]
    lines += [f"| {label} | {scores['reward']:.3f} | " + " | ".join(f"{scores[name]:.3f}" for name in parts) + " |"
              for label, scores in arms.items()]
    return "\n".join(lines)


ARMS = {"rl": "RL", "control": "SFT control"}  # history phases drawn as arms, from the warm-up's evaluation


def save_reward_curve(path: str, history: list[dict]) -> None:
    """Reward against optimizer steps after the warm-up ('arm_step'): RL's train rollouts, and the held-out
    evaluations of each arm the run has, each starting at the warm-up's evaluation."""
    fig, ax = plt.subplots(figsize=(6, 4))
    start = [(h["arm_step"], h["eval_reward"]) for h in history if h["phase"] == "warmup"]
    rollouts = [(h["arm_step"], h["reward_mean"]) for h in history if "reward_mean" in h]
    if rollouts:
        ax.plot(*zip(*rollouts), color="tab:blue", alpha=0.4, label="RL: train rollouts")
    for (phase, label), colour in zip(ARMS.items(), ("tab:blue", "tab:orange")):
        points = [(h["arm_step"], h["eval_reward"]) for h in history if h["phase"] == phase and "eval_reward" in h]
        if points:
            ax.plot(*zip(*(start + points)), color=colour, marker="o", label=f"{label}: held-out")
    if start and not any(h["phase"] in ARMS and "eval_reward" in h for h in history):
        ax.plot(*zip(*start), color="tab:blue", marker="o", label="held-out")
    ax.set_xlabel("optimizer steps after the warm-up")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
