"""Masks: binarising stored masks, and generating masks deterministically from a seed.

Convention everywhere: a mask is float32 (H, W, 1) with 1 = region to fill and
0 = context to keep. Stored masks (PNG, any mode) are read as 8-bit luminance and
binarised with `value > MASK_THRESHOLD`, so anti-aliased or JPEG-noisy edges land
on one side consistently.

Generated masks (for datasets without masks, e.g. any TFDS image set) depend only
on (seed, index, height, width): an example gets the same mask on every epoch,
host and run. Every generated mask is non-empty and leaves part of the image as
context.
"""
import numpy as np
from PIL import Image, ImageDraw

MASK_THRESHOLD = 127  # of 255: stored pixels strictly above this are 'fill'
MASK_KINDS = ("box", "brush", "text", "mixed")


def binarize(luminance: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) uint8 luminance -> float32 (H, W, 1) in {0, 1}."""
    values = luminance.reshape(luminance.shape[0], luminance.shape[1], 1)
    return (values > MASK_THRESHOLD).astype(np.float32)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the fill region, exclusive ends; None when empty."""
    fill = mask.reshape(mask.shape[0], mask.shape[1]) > 0
    rows, cols = np.flatnonzero(fill.any(axis=1)), np.flatnonzero(fill.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def random_box(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An axis-aligned box covering roughly 10-50% of the image."""
    box_h = int(rng.integers(max(1, height // 4), max(2, (height * 3) // 4)))
    box_w = int(rng.integers(max(1, width // 4), max(2, (width * 3) // 4)))
    return _box_mask(rng, height, width, box_h, box_w)


def text_box(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A wide, short box shaped like a line of text (40-80% wide, 10-25% high)."""
    box_w = int(rng.integers(max(1, (width * 2) // 5), max(2, (width * 4) // 5)))
    box_h = int(rng.integers(max(1, height // 10), max(2, height // 4)))
    return _box_mask(rng, height, width, box_h, box_w)


def brush_strokes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1-4 free-form strokes (random walks drawn with a round brush), as in LaMa-style training."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    side = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        brush = max(1, int(side * rng.uniform(0.05, 0.15)))
        point = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        points = [tuple(point)]
        for _ in range(int(rng.integers(2, 6))):
            angle = rng.uniform(0, 2 * np.pi)
            step = side * rng.uniform(0.1, 0.3)
            point = np.clip(point + step * np.array([np.cos(angle), np.sin(angle)]), 0, [width - 1, height - 1])
            points.append(tuple(point))
        draw.line(points, fill=255, width=brush, joint="curve")
        x, y = points[0]
        draw.ellipse((x - brush / 2, y - brush / 2, x + brush / 2, y + brush / 2), fill=255)  # never empty
    mask = binarize(np.asarray(canvas))
    return _keep_context(mask)


def generate(kind: str, seed: int, index: int, height: int, width: int) -> np.ndarray:
    """The mask of example `index`: depends only on (kind, seed, index, size)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r}: expected one of {MASK_KINDS}")
    rng = np.random.default_rng([seed, index])
    if kind == "mixed":
        kind = MASK_KINDS[int(rng.integers(0, 3))]
    return {"box": random_box, "brush": brush_strokes, "text": text_box}[kind](rng, height, width)


def _box_mask(rng, height, width, box_h, box_w):
    box_h, box_w = min(box_h, height), min(box_w, width)
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    mask = np.zeros((height, width, 1), np.float32)
    mask[top:top + box_h, left:left + box_w] = 1.0
    return _keep_context(mask)


def _keep_context(mask):
    """Guarantee at least one context pixel (tiny images can otherwise be fully covered)."""
    if mask.all():
        mask[0, 0] = 0.0
    return mask
