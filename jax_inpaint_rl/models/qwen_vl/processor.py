"""Qwen2.5-VL's image processor (transformers' Qwen2VLImageProcessor, PIL backend) on the host, in NumPy + PIL.

Each image is resized (PIL, `resample`, bicubic by default) to the nearest size whose sides are multiples
of patch_size * merge_size and whose area lies in [min_pixels, max_pixels] (`smart_resize`), rescaled to
[0, 1], normalised by the CLIP mean and std, and cut into patch_size x patch_size patches; each patch is
repeated temporal_patch_size times (a still image is a clip of identical frames) and flattened as
(C, T, p, p), and the patches are ordered merge group by merge group (merge_size^2 neighbours
consecutive), as the vision tower (vision.py) and its merger expect.

Input: RGB images as uint8 (H, W, 3) arrays (the only kind accepted: PIL resizes 8-bit images, so a float
image would be quantised first anyway). Output: patches float32 (N, 3 * T * p * p) and grid_thw int64
(num_images, 3) = (1, H' / p, W' / p) per image: transformers' (pixel_values, image_grid_thw).

Exactness: equal to transformers' PIL-backend processor (`Qwen2VLImageProcessorPil`, which
AutoImageProcessor loads when torchvision is not installed): same grids, bitwise the same pixel values.
NOT bitwise equal to the default torchvision processor (`Qwen2VLImageProcessor` with torchvision), which
resizes with torchvision's antialiased bicubic on tensors: same grids (the same smart_resize), but resized
pixels may differ by an 8-bit level or so, i.e. up to ~0.02 after normalisation; that one is not tested here.
"""
import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image

from jax_inpaint_rl.models.params_io import read_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
MAX_ASPECT_RATIO = 200
# Keys transformers' Qwen2-VL processors accept or save but never use for images (metadata, the fast
# processor's generic options; do_convert_rgb is a no-op on the RGB arrays `preprocess` takes).
IGNORED_KEYS = ("image_processor_type", "processor_class", "do_convert_rgb", "crop_size", "do_center_crop",
                "data_format", "input_data_format", "default_to_square", "device", "disable_grouping",
                "return_tensors")


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """A preprocessor_config.json's fields that matter, with transformers' defaults."""
    min_pixels: int = 56 * 56  # size['shortest_edge']: the least area after resizing
    max_pixels: int = 28 * 28 * 1280  # size['longest_edge']: the largest area after resizing
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC.value  # a PIL resampling filter
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge group spans it."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "preprocessor_config") -> "ImageProcessorConfig":
        """The pixel bounds come from min_pixels / max_pixels when present, else from size {shortest_edge,
        longest_edge} (transformers: min_pixels / max_pixels override size; a given size replaces the default)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | set(IGNORED_KEYS) | {"size"}
        unknown = sorted(k for k in config if k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown Qwen2-VL image processor keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        kind = config.get("image_processor_type", PROCESSOR_TYPES[0])
        if kind not in PROCESSOR_TYPES:
            raise ValueError(f"{source}: image_processor_type={kind!r}: expected one of {PROCESSOR_TYPES}")
        values = {k: v for k, v in config.items() if k in fields}
        size = config.get("size")
        if size is not None:
            if not isinstance(size, Mapping) or set(size) - {"shortest_edge", "longest_edge"}:
                raise ValueError(f"{source}: size={size!r}: expected {{'shortest_edge': min_pixels, "
                                 "'longest_edge': max_pixels}")
            for edge, name in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
                if name not in values:
                    if edge not in size:
                        raise ValueError(f"{source}: size={dict(size)} has no {edge!r} and there is no {name}")
                    values[name] = size[edge]
        for name in ("image_mean", "image_std"):
            if name in values:
                values[name] = tuple(float(v) for v in values[name])
        made = cls(**values)
        problems = []
        if len(made.image_mean) != 3 or len(made.image_std) != 3:
            problems.append(f"image_mean={made.image_mean}, image_std={made.image_std}: 3 channels expected")
        if made.resample not in {r.value for r in Image.Resampling}:
            problems.append(f"resample={made.resample}: not a PIL resampling filter")
        if not 0 < made.min_pixels <= made.max_pixels:
            problems.append(f"min_pixels={made.min_pixels}, max_pixels={made.max_pixels}: expected 0 < min <= max")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return made

    @classmethod
    def from_file(cls, path) -> "ImageProcessorConfig":
        """From a preprocessor_config.json."""
        return cls.from_dict(read_json(path), str(path))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) -> the nearest sides that are multiples of `factor`, scaled (aspect ratio kept as
    well as the rounding allows) into [min_pixels, max_pixels] of area when rounding alone leaves it outside."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {height} x {width}: aspect ratio above {MAX_ASPECT_RATIO} is not supported")
    new_height, new_width = round(height / factor) * factor, round(width / factor) * factor
    if new_height * new_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def patchify(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """(H, W, C) float32 -> (H/p * W/p, C * T * p * p): merge groups row-major, patches row-major in each,
    each patch flattened as (C, T, p, p) with its T frames identical."""
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    height, width, channels = image.shape
    grid = image.reshape(height // (p * m), m, p, width // (p * m), m, p, channels)
    grid = grid.transpose(0, 3, 1, 4, 6, 2, 5)  # (group row, group col, row, col, C, p, p)
    frames = np.broadcast_to(grid[:, :, :, :, :, None], (*grid.shape[:5], t, p, p))
    return frames.reshape(-1, channels * t * p * p)


def preprocess_one(image: np.ndarray, config: ImageProcessorConfig, index: int = 0) -> tuple[np.ndarray, tuple]:
    """One uint8 (H, W, 3) image -> (patches, (1, grid_h, grid_w))."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image {index}: {described}: expected an RGB uint8 array (H, W, 3)")
    height, width = image.shape[:2]
    if config.do_resize:
        height, width = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
        image = np.asarray(Image.fromarray(image).resize((width, height), resample=config.resample))
    elif height % config.factor or width % config.factor:
        raise ValueError(f"image {index}: {height} x {width} with do_resize=False: both sides must be multiples of "
                         f"patch_size * merge_size = {config.factor}")
    pixels = (image.astype(np.float64) * config.rescale_factor).astype(np.float32) if config.do_rescale \
        else image.astype(np.float32)
    if config.do_normalize:
        pixels = (pixels - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    p = config.patch_size
    return patchify(pixels, config), (1, height // p, width // p)


def preprocess(images, config: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """A list of uint8 (H, W, 3) RGB images -> (patches float32 (N, 3 T p p), grid_thw int64 (len(images), 3))."""
    if not len(images):
        raise ValueError("preprocess: no images")
    done = [preprocess_one(image, config, i) for i, image in enumerate(images)]
    return (np.concatenate([patches for patches, _ in done]).astype(np.float32),
            np.array([grid for _, grid in done], np.int64))
