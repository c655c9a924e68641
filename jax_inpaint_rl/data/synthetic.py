"""A synthetic inpainting set a tiny model can learn: the prompt and the surroundings determine the fill.

Each example is a background with a square box (the mask, half the image side).
The ground truth (`target`) has, inside the box, either a coloured shape
('a red circle', drawn by `shape_mask`: the box inset by an eighth of its side)
or dark rendered text ('text "AB"', DejaVu Sans Bold); the model input (`image`)
is the background with the box left empty. Kinds: 'shape' and 'text' on a plain
tinted background, 'gradient_shape' a shape on a linear two-colour gradient, which
the fill must continue around the shape (a flat fill leaves a visible seam).
Four colours, three shapes and a short alphabet keep the task small. Everything
depends only on (seed, index), so any example can be regenerated anywhere.
"""
import functools
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABEHKLOTXZ"
BACKGROUNDS = ((200, 200, 200), (230, 225, 210), (205, 215, 230))
# gradient ends: pale and muted, far from every shape colour; each gradient joins two of them
GRADIENT_ENDS = ((235, 235, 230), (150, 160, 175), (215, 195, 165), (165, 195, 185), (200, 180, 210))
TEXT_COLOUR = (20, 20, 20)
FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
KINDS = ("shape", "text")  # the default mix
ALL_KINDS = ("shape", "text", "gradient_shape")


class SyntheticSource:
    """`num_examples` generated examples at `resolution` px (a source, like FileSource)."""

    kind = "inpaint"
    listing_problems = ()

    def __init__(self, num_examples: int, resolution: int = 32, seed: int = 0, kinds: tuple[str, ...] = KINDS):
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown or not kinds:
            raise ValueError(f"synthetic kinds {kinds!r}: expected a non-empty subset of {ALL_KINDS}")
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
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "gradient_shape":
        source = _gradient(rng, resolution)
    target = source.copy()
    draw = ImageDraw.Draw(target)
    region = (left, top, left + box, top + box)
    if kind != "text":
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        _draw_shape(draw, shape, region, COLOURS[colour])
        prompt, target_text = shape_prompt(colour, shape), None
    else:
        target_text = "".join(LETTERS[int(i)] for i in rng.integers(len(LETTERS), size=2))
        _draw_text(draw, target_text, region)
        prompt = f'text "{target_text}"'
    mask = np.zeros((resolution, resolution, 1), np.float32)
    mask[top:top + box, left:left + box] = 1.0
    return {"id": f"synthetic-{seed}-{index}", "prompt": prompt, "image": np.asarray(source),
            "mask": mask, "target": np.asarray(target), "target_text": target_text, "embeddings": {}}


def shape_prompt(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def parse_shape_prompt(prompt: str) -> tuple[str, str]:
    """(colour, shape) of a prompt written by `shape_prompt`, or a ValueError naming it."""
    words = prompt.split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"prompt {prompt!r}: expected 'a <colour> <shape>' with a colour in {list(COLOURS)} "
                         f"and a shape in {list(SHAPES)}")
    return words[1], words[2]


def shape_mask(shape: str, region: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """(height, width) bool: where `shape` is drawn for the box region = (left, top, right, bottom), exclusive."""
    canvas = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, region, 255)
    return np.asarray(canvas) > 0


def _gradient(rng: np.random.Generator, resolution: int) -> Image.Image:
    """A linear gradient between two of GRADIENT_ENDS along a random direction, across the whole image."""
    start, end = (np.asarray(GRADIENT_ENDS[int(i)], np.float32)
                  for i in rng.choice(len(GRADIENT_ENDS), size=2, replace=False))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    y, x = np.mgrid[:resolution, :resolution].astype(np.float32) / (resolution - 1) - 0.5
    along = (x * np.cos(angle) + y * np.sin(angle)) / (abs(np.cos(angle)) + abs(np.sin(angle))) + 0.5  # [0, 1]
    pixels = start + (end - start) * along[..., None]
    return Image.fromarray(np.round(pixels).astype(np.uint8))


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
