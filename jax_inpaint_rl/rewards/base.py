"""The reward contract, and the input checks every reward shares.

A reward is any callable

    reward(images, prompts, meta) -> {"score": (B,) float32, "<sub-score>": (B,) ...}

- `images`: (B, H, W, 3) uint8, the generated images after compositing.
- `prompts`: list of B strings.
- `meta`: per-sample fields, each batch-leading: `mask` (B, H, W, 1) in {0, 1}
  (1 = region that was filled), `source` (B, H, W, 3) uint8 (the image before
  filling), `target_text` (B strings), `reference` (B, H, W, 3) uint8,
  `metadata` (B strings, each a JSON object: the example's record, e.g. a GenEval
  prompt's tag and clauses). A reward reads only the fields it needs and checks
  them with the helpers below.

Rewards run on the host, outside jit. A reward that cannot score a sample raises
(`RewardError` or a more specific error); it never returns a made-up value.
"""
import json
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

Meta = Mapping[str, Any]
Scores = dict[str, np.ndarray]


class RewardError(RuntimeError):
    """A reward could not score its batch (bad answer, unreachable server, ...)."""


class Reward(Protocol):
    def __call__(self, images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores: ...


RewardFactory = Callable[..., Reward]


def check_images(images: Any, name: str = "images") -> np.ndarray:
    """(B, H, W, 3) uint8, or a ValueError that says what arrived instead."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name}: expected a (B, H, W, 3) uint8 array, got shape {images.shape} dtype {images.dtype}")
    return images


def check_prompts(prompts: Sequence[str], batch: int, name: str = "prompts") -> list[str]:
    prompts = list(prompts)
    if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}: expected {batch} strings, got {len(prompts)} items {[type(p).__name__ for p in prompts[:4]]}")
    return prompts


def meta_field(meta: Meta, field: str, reward: str) -> Any:
    if field not in meta:
        raise KeyError(f"{reward}: meta[{field!r}] is required; meta has {sorted(meta)}")
    return meta[field]


def meta_mask(meta: Meta, images: np.ndarray, reward: str) -> np.ndarray:
    """meta['mask'] as a (B, H, W) bool array matching `images`."""
    mask = np.asarray(meta_field(meta, "mask", reward))
    expected = images.shape[:3] + (1,)
    if mask.shape != expected:
        raise ValueError(f"{reward}: meta['mask'] must have shape {expected} (B, H, W, 1), got {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{reward}: meta['mask'] must hold only 0 and 1 (1 = filled region)")
    return mask[..., 0].astype(bool)


def meta_image(meta: Meta, field: str, images: np.ndarray, reward: str) -> np.ndarray:
    """meta[field] as a uint8 image batch with the same shape as `images`."""
    image = check_images(meta_field(meta, field, reward), name=f"{reward}: meta[{field!r}]")
    if image.shape != images.shape:
        raise ValueError(f"{reward}: meta[{field!r}] must have shape {images.shape} like images, got {image.shape}")
    return image


def meta_texts(meta: Meta, field: str, batch: int, reward: str) -> list[str]:
    return check_prompts(meta_field(meta, field, reward), batch, name=f"{reward}: meta[{field!r}]")


def meta_records(meta: Meta, field: str, batch: int, reward: str) -> list[dict]:
    """meta[field] (B JSON strings, as they also travel to remote rewards) as B dicts."""
    records = []
    for row, text in enumerate(meta_texts(meta, field, batch, reward)):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{reward}: meta[{field!r}] row {row} is not JSON ({error.msg}): {text[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{reward}: meta[{field!r}] row {row} is a JSON {type(record).__name__}, "
                             "expected an object")
        records.append(record)
    return records


def check_scores(scores: Mapping[str, Any], batch: int, reward: str) -> Scores:
    """A reward's output as float32 (B,) arrays with 'score' present.

    Values must be finite, except for samples a reward marks invalid with a
    'valid' entry of 0 (a remote reward that dropped their groups); those carry NaN.
    """
    if "score" not in scores:
        raise RewardError(f"{reward}: returned keys {sorted(scores)}; 'score' is required")
    out = {name: np.asarray(value, dtype=np.float32) for name, value in scores.items()}
    for name, value in out.items():
        if value.shape != (batch,):
            raise RewardError(f"{reward}: {name!r} has shape {value.shape}, expected ({batch},)")
    valid = out.get("valid", np.ones(batch, np.float32)).astype(bool)
    for name, value in out.items():
        bad = ~np.isfinite(value) & valid
        if bad.any():
            raise RewardError(f"{reward}: {name!r} is not finite for samples {np.flatnonzero(bad).tolist()}")
    return out


def mask_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int] | None]:
    """Per-sample bounding box (top, left, bottom, right), exclusive, of a (B, H, W) bool mask; None if empty."""
    boxes = []
    for m in mask:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        boxes.append(None if rows.size == 0 else (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1))
    return boxes
