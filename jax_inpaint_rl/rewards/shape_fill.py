"""The demo's reward: does the fill show the prompt's shape in the prompt's colour, on a background that
continues the image around the mask? Computed from the generated pixels alone.

What it reads, and nothing else:
- `images`: the generated images after compositing (outside the mask they are the
  source's pixels, so the background around the box is read from them);
- `meta['mask']`: where the fill is; its bounding box is where the shape goes;
- `prompts`: 'a <colour> <shape>' in data/synthetic.py's vocabulary (4 colours, 3
  shapes), parsed to the colour's RGB and the shape's outline (`synthetic.shape_mask`
  on the mask's bounding box, the rule the data draws by).
It never reads meta['reference'] (the ground truth) or meta['source'].

The background expected inside the mask is a plane per channel (a + b*y + c*x)
fitted by least squares to the image outside the mask: exact for the plain and
linear-gradient backgrounds of the synthetic data. With `outline` the shape's
pixels, `d_colour` / `d_background` a pixel's RGB distance to the prompt's colour /
to the fitted background, and closeness(d) = exp(-(d / sigma)^2):
- colour     = mean over the outline of closeness(d_colour): the shape is the prompt's colour;
- shape      = soft IoU of the foreground (1 - closeness(d_background)) with the
               outline: something stands out from the background exactly there;
- background = mean over the rest of the mask of closeness(d_background): the fill
               continues the background around the shape (no seam, no smudge);
- score      = their weighted mean (`weights`, equal by default), in [0, 1] (1 = the
               prompt's shape, flat in its colour, on the continued background).
Accuracies, 0 or 1 per fill, from each pixel's nearest class among the 4 shape
colours and the background there:
- colour_right: at least half of the outline's pixels are nearest the prompt's colour;
- shape_right: the pixels nearest a shape colour overlap the prompt's shape's outline
  more (IoU) than the other shapes' outlines, with IoU >= 0.5;
- fill_right: both.
"""
from typing import Mapping, Sequence

import numpy as np

from jax_inpaint_rl.data import synthetic
from jax_inpaint_rl.rewards.base import Meta, Reward, Scores, check_images, check_prompts, mask_boxes, meta_mask

PALETTE = np.asarray(list(synthetic.COLOURS.values()), np.float32)  # (4, 3) the shape colours
PARTS = {"colour": 1.0, "shape": 1.0, "background": 1.0}  # the score's parts and their default weights


def background_planes(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float32: per image and channel, the least-squares plane through the pixels outside the mask."""
    batch, height, width = mask.shape
    y, x = np.mgrid[:height, :width].astype(np.float32)
    design = np.stack([np.ones_like(y), y / height, x / width], axis=-1)  # (H, W, 3)
    planes = np.empty(images.shape, np.float32)
    for i in range(batch):
        outside = ~mask[i]
        if outside.sum() < 3:
            raise ValueError(f"shape_fill: sample {i} has {int(outside.sum())} pixels outside the mask; at least 3 "
                             "are needed to read the background")
        coefficients, *_ = np.linalg.lstsq(design[outside], images[i][outside].astype(np.float32), rcond=None)
        planes[i] = design @ coefficients
    return planes


def outlines(prompts: Sequence[str], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each prompt's colour index in PALETTE (B,), the outlines of every shape in synthetic.SHAPES on each mask's
    bounding box (B, S, H, W) bool, each prompt's shape index (B,)) for prompts 'a <colour> <shape>'."""
    batch, height, width = mask.shape
    parsed = [synthetic.parse_shape_prompt(prompt) for prompt in prompts]
    boxes = mask_boxes(mask)
    empty = [i for i, box in enumerate(boxes) if box is None]
    if empty:
        raise ValueError(f"shape_fill: meta['mask'] is empty for samples {empty}; nothing was filled")
    shapes = np.stack([[synthetic.shape_mask(shape, (left, top, right, bottom), height, width)
                        for shape in synthetic.SHAPES] for top, left, bottom, right in boxes])
    return (np.asarray([list(synthetic.COLOURS).index(colour) for colour, _ in parsed]), shapes,
            np.asarray([synthetic.SHAPES.index(shape) for _, shape in parsed]))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Soft IoU over the last two axes (values in [0, 1])."""
    union = np.maximum(a, b).sum(axis=(-2, -1))
    return np.minimum(a, b).sum(axis=(-2, -1)) / np.maximum(union, 1e-6)


def shape_fill_scores(images: np.ndarray, prompts: Sequence[str], mask: np.ndarray, sigma: float,
                      weights: Mapping[str, float]) -> Scores:
    """The scores and accuracies above for (B, H, W, 3) uint8 images and (B, H, W) bool masks; 'score' is the
    weighted mean of the parts named in `weights`."""
    colour_index, shapes, wanted = outlines(prompts, mask)
    colours, rows = PALETTE[colour_index], np.arange(len(images))
    outline = shapes[rows, wanted]  # (B, H, W)
    pixels = images.astype(np.float32)
    background = background_planes(images, mask)
    d_colour = np.linalg.norm(pixels - colours[:, None, None], axis=-1)
    d_background = np.linalg.norm(pixels - background, axis=-1)
    closeness = lambda d: np.exp(-((d / sigma) ** 2))  # noqa: E731
    rest = mask & ~outline
    colour = (closeness(d_colour) * outline).sum(axis=(1, 2)) / outline.sum(axis=(1, 2))
    foreground = (1.0 - closeness(d_background)) * mask
    shape = _iou(foreground, outline.astype(np.float32))
    background_score = (closeness(d_background) * rest).sum(axis=(1, 2)) / np.maximum(rest.sum(axis=(1, 2)), 1)
    # nearest class per pixel: the 4 shape colours, then the background there (index 4)
    to_palette = np.linalg.norm(pixels[..., None, :] - PALETTE, axis=-1)  # (B, H, W, 4)
    nearest = np.argmin(np.concatenate([to_palette, d_background[..., None]], axis=-1), axis=-1)
    colour_right = ((nearest == colour_index[:, None, None]) & outline).sum(axis=(1, 2)) >= outline.sum(axis=(1, 2)) / 2
    painted = ((nearest < len(PALETTE)) & mask).astype(np.float32)
    overlaps = _iou(painted[:, None], shapes.astype(np.float32))  # (B, S)
    shape_right = (np.argmax(overlaps, axis=1) == wanted) & (overlaps[rows, wanted] >= 0.5)
    parts = {"colour": colour, "shape": shape, "background": background_score}
    score = sum(weights[name] * parts[name] for name in weights) / sum(weights.values())
    scores = {"score": score, **parts, "colour_right": colour_right, "shape_right": shape_right,
              "fill_right": colour_right & shape_right}
    return {name: value.astype(np.float32) for name, value in scores.items()}


def make_shape_fill(sigma: float = 60.0, weights: Mapping[str, float] | None = None) -> Reward:
    """Registry entry 'shape_fill': `sigma` is the RGB distance (0-441) at which closeness falls to 1/e;
    `weights` {part: weight} over 'colour', 'shape', 'background' (default: equal)."""
    weights = dict(PARTS if weights is None else weights)
    if not weights or set(weights) - set(PARTS) or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"shape_fill: weights {weights}: expected non-negative weights, not all 0, of {PARTS}")

    def shape_fill(images: np.ndarray, prompts: Sequence[str], meta: Meta) -> Scores:
        images = check_images(images)
        prompts = check_prompts(prompts, len(images))
        return shape_fill_scores(images, prompts, meta_mask(meta, images, "shape_fill"), sigma, weights)

    return shape_fill
