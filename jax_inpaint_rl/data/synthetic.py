"""A synthetic inpainting set a tiny model can learn: the prompt alone determines the fill.

Each example is a plain tinted background with a square box (the mask). The
ground truth (`target`) has, inside the box, either a coloured shape
('a red circle') or dark rendered text ('text "AB"', DejaVu Sans Bold); the model
input (`image`) is the background with the box left empty. Four colours, three
shapes and a short alphabet keep the task small. Everything depends only on
(seed, index), so any example can be regenerated anywhere.
"""
import functools
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABEHKLOTXZ"
BACKGROUNDS = ((200, 200, 200), (230, 225, 210), (205, 215, 230))
TEXT_COLOUR = (20, 20, 20)
FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
KINDS = ("shape", "text")


class SyntheticSource:
    """`num_examples` generated examples at `resolution` px (a source, like FileSource)."""

    kind = "inpaint"
    listing_problems = ()

    def __init__(self, num_examples: int, resolution: int = 32, seed: int = 0, kinds: tuple[str, ...] = KINDS):
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"synthetic kinds {kinds!r}: expected a non-empty subset of {KINDS}")
        if resolution < 16:
            raise ValueError(f"synthetic resolution {resolution}: expected at least 16 px")
        self.num_examples, self.resolution, self.seed, self.kinds = num_examples, resolution, seed, tuple(kinds)
        text_only = {"target_text"} if set(kinds) == {"text"} else set()  # shape examples have none
        self.fields = frozenset({"prompt", "image", "mask", "target", *text_only})
        self.name = f"synthetic(seed={seed}, n={num_examples}, {resolution}px)"

    def __len__(self) -> int:
        return self.num_examples

    def locate(self, index: int, field: str) -> str:
        return f"{self.name}[{index}] ({field})"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic index {index} outside [0, {self.num_examples})")
        return synthetic_example(self.seed, index, self.resolution, self.kinds)


def synthetic_example(seed: int, index: int, resolution: int, kinds: tuple[str, ...] = KINDS) -> dict:
    """One example (see formats.py for the keys); target_text is the rendered text or None."""
    rng = np.random.default_rng([seed, index])
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    box = resolution // 2
    top, left = (int(v) for v in rng.integers(0, resolution - box + 1, size=2))
    source = Image.new("RGB", (resolution, resolution), background)
    target = source.copy()
    draw = ImageDraw.Draw(target)
    region = (left, top, left + box, top + box)
    if kinds[int(rng.integers(len(kinds)))] == "shape":
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        _draw_shape(draw, shape, region, COLOURS[colour])
        prompt, target_text = f"a {colour} {shape}", None
    else:
        target_text = "".join(LETTERS[int(i)] for i in rng.integers(len(LETTERS), size=2))
        _draw_text(draw, target_text, region)
        prompt = f'text "{target_text}"'
    mask = np.zeros((resolution, resolution, 1), np.float32)
    mask[top:top + box, left:left + box] = 1.0
    return {"id": f"synthetic-{seed}-{index}", "prompt": prompt, "image": np.asarray(source),
            "mask": mask, "target": np.asarray(target), "target_text": target_text, "embeddings": {}}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, region, colour) -> None:
    left, top, right, bottom = region
    inset = (right - left) // 8
    box = (left + inset, top + inset, right - inset - 1, bottom - inset - 1)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)


def _draw_text(draw: ImageDraw.ImageDraw, text: str, region) -> None:
    left, top, right, bottom = region
    font = _font(max(6, (right - left) // 2))
    draw.text(((left + right) / 2, (top + bottom) / 2), text, fill=TEXT_COLOUR, font=font, anchor="mm")


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Bold where installed, else Pillow's bundled scalable font."""
    return ImageFont.truetype(FONT_PATH, size) if os.path.isfile(FONT_PATH) else ImageFont.load_default(size)
