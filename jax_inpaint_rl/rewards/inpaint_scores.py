"""Inpainting-specific rewards: preservation outside the mask, similarity to the
reference inside it, seam at its boundary, and a wrapper that scores any reward on
the masked region only.

All are plain numpy on the host. Preservation matters for editing models that
regenerate the whole image (Kontext, Qwen-Image-Edit); after pixel compositing it
is 1 by construction and can be left out of the calculator.
"""
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from jax_inpaint_rl.rewards.base import (
    Meta,
    Reward,
    Scores,
    check_images,
    check_prompts,
    check_scores,
    mask_boxes,
    meta_image,
    meta_mask,
)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation of (B, H, W) bool masks with a 3x3 cross, `steps` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
        out = grown
    return out


def _samples_without(flags: np.ndarray) -> list[int]:
    return np.flatnonzero(~flags).tolist()


def match_scores(images: np.ndarray, other: np.ndarray, region: np.ndarray, reward: str) -> Scores:
    """1 - mean |image - other| / 255 over the (B, H, W) bool `region`, and the PSNR there."""
    pixels = region.sum(axis=(1, 2))
    if not (pixels > 0).all():
        raise ValueError(f"{reward}: the scored region is empty for samples {_samples_without(pixels > 0)}")
    diff = (images.astype(np.float32) - other.astype(np.float32)) / 255.0
    abs_error = (np.abs(diff).mean(axis=-1) * region).sum(axis=(1, 2)) / pixels
    squared_error = ((diff**2).mean(axis=-1) * region).sum(axis=(1, 2)) / pixels
    return {"score": 1.0 - abs_error, "psnr": -10.0 * np.log10(np.maximum(squared_error, 1e-10))}


def _pair_means(gray: np.ndarray, mask: np.ndarray, band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean |step| between neighbouring pixels that cross the mask edge, and between neighbours inside the band that do not."""
    cross_sum = cross_n = band_sum = band_n = 0.0
    for axis in (1, 2):
        step = np.abs(np.diff(gray, axis=axis))
        crosses = np.diff(mask.astype(np.int8), axis=axis) != 0
        a = band[:, 1:] if axis == 1 else band[:, :, 1:]
        b = band[:, :-1] if axis == 1 else band[:, :, :-1]
        inside_band = a & b & ~crosses
        cross_sum = cross_sum + (step * crosses).sum(axis=(1, 2))
        cross_n = cross_n + crosses.sum(axis=(1, 2))
        band_sum = band_sum + (step * inside_band).sum(axis=(1, 2))
        band_n = band_n + inside_band.sum(axis=(1, 2))
    has_edge = cross_n > 0
    if not has_edge.all():
        raise ValueError(f"seam: mask has no boundary (empty or full) for samples {_samples_without(has_edge)}")
    return cross_sum / cross_n, band_sum / np.maximum(band_n, 1)


def seam_scores(images: np.ndarray, mask: np.ndarray, band_width: int, scale: float) -> Scores:
    """exp(-excess / scale): excess = how much larger the grey-level step across the mask edge is
    than the steps next to it (within `band_width` px). 1 = invisible seam."""
    gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    edge = _dilate(mask, 1) & _dilate(~mask, 1)  # pixels on either side of the mask boundary
    band = _dilate(edge, band_width)
    across, nearby = _pair_means(gray, mask, band)
    excess = np.maximum(across - nearby, 0.0)
    return {"score": np.exp(-excess / scale), "seam_step": across, "band_step": nearby}


def make_preservation(margin: int = 2) -> Reward:
    """How unchanged the image is against meta['source'] outside the mask grown by `margin` px (blending zone)."""

    def preservation(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        check_prompts(prompts, len(images))
        source = meta_image(meta, "source", images, "preservation")
        outside = ~_dilate(meta_mask(meta, images, "preservation"), margin)
        return match_scores(images, source, outside, "preservation")

    return preservation


def make_reference_similarity() -> Reward:
    """How close the filled region is to meta['reference'] (the ground truth) inside the mask, in pixels."""

    def reference_similarity(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        check_prompts(prompts, len(images))
        reference = meta_image(meta, "reference", images, "reference_similarity")
        return match_scores(images, reference, meta_mask(meta, images, "reference_similarity"), "reference_similarity")

    return reference_similarity


def make_seam(band_width: int = 4, scale: float = 8.0) -> Reward:
    """How invisible the boundary of the filled region is."""

    def seam(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        check_prompts(prompts, len(images))
        return seam_scores(images, meta_mask(meta, images, "seam"), band_width, scale)

    return seam


def _region_box(box: tuple[int, int, int, int], pad: int, aspect: float, height: int, width: int):
    """Padded box grown to the output aspect ratio (h / w) where the image allows, clamped to it."""
    top, left, bottom, right = box
    h, w = bottom - top + 2 * pad, right - left + 2 * pad
    h, w = max(h, round(w * aspect)), max(w, round(h / aspect))
    h, w = min(h, height), min(w, width)
    center_y, center_x = (top + bottom) / 2, (left + right) / 2
    y0 = int(np.clip(round(center_y - h / 2), 0, height - h))
    x0 = int(np.clip(round(center_x - w / 2), 0, width - w))
    return y0, x0, y0 + h, x0 + w


def _crop_resize(array: np.ndarray, box, size: tuple[int, int], resample) -> np.ndarray:
    y0, x0, y1, x1 = box
    crop = array[y0:y1, x0:x1]
    squeeze = crop.shape[-1] == 1
    image = Image.fromarray(crop[..., 0] if squeeze else crop)
    out = np.asarray(image.resize((size[1], size[0]), resample))
    return out[..., None] if squeeze else out


def crop_regions(images: np.ndarray, meta: Meta, size: tuple[int, int], pad: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Images and every image-shaped meta field cropped to the padded mask box and resized to `size`."""
    mask = meta_mask(meta, images, "region")
    boxes = mask_boxes(mask)
    empty = [i for i, box in enumerate(boxes) if box is None]
    if empty:
        raise ValueError(f"region: meta['mask'] is empty for samples {empty}; nothing to crop")
    height, width = images.shape[1:3]
    boxes = [_region_box(box, pad, size[0] / size[1], height, width) for box in boxes]

    def crop_batch(batch: np.ndarray, resample) -> np.ndarray:
        return np.stack([_crop_resize(a, box, size, resample) for a, box in zip(batch, boxes)])

    cropped_meta: dict[str, Any] = {}
    for field, value in meta.items():
        array = np.asarray(value) if not isinstance(value, (list, tuple)) else None
        if array is not None and array.ndim == 4 and array.shape[:3] == images.shape[:3]:
            if field == "mask":
                cropped_meta[field] = crop_batch(array.astype(np.uint8), Image.NEAREST)
            else:
                cropped_meta[field] = crop_batch(array, Image.BICUBIC)
        else:
            cropped_meta[field] = value
    return crop_batch(images, Image.BICUBIC), cropped_meta


def region_only(reward: Reward, size: tuple[int, int] = (224, 224), pad: int = 16) -> Reward:
    """Score `reward` on the masked region only: crop to the mask box (+pad), resize to `size`."""

    def region_reward(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        check_prompts(prompts, len(images))
        cropped, cropped_meta = crop_regions(images, meta, tuple(size), pad)
        return check_scores(reward(cropped, prompts, cropped_meta), len(images), "region")

    return region_reward


def make_region_only(reward: str, reward_config: Mapping[str, Any] | None = None, size=(224, 224), pad: int = 16) -> Reward:
    """Registry entry: the reward registered as `reward`, scored on the masked region only."""
    from jax_inpaint_rl.rewards import get_reward

    return region_only(get_reward(reward, **dict(reward_config or {})), tuple(size), pad)
