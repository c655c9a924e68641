"""Mask handling shared by the inpainting families, following diffusers' inpaint pipelines.

Masks are (B, H, W, 1) with 1 = region to fill; images (B, H, W, 3) in [-1, 1].
"""
from jax_inpaint_rl.models.layers.conv_blocks import nearest_resize


def masked_image(image, mask):
    """The source with the fill region zeroed: image * (mask < 0.5), as the pipelines build it."""
    return image * (mask < 0.5).astype(image.dtype)


def latent_mask(mask, height: int, width: int):
    """Mask resized to the latent grid with torch's default nearest interpolation (the SD pipeline's)."""
    return nearest_resize(mask, height, width)


def composite(generated, source, mask):
    """Paste the source back outside the mask: generated * mask + source * (1 - mask)."""
    mask = mask.astype(generated.dtype)
    return generated * mask + source.astype(generated.dtype) * (1.0 - mask)


def check_image_and_mask(image, mask, multiple: int) -> None:
    """Raise naming the shapes when image and mask disagree or the size is not a multiple of `multiple`."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image shape {image.shape}: expected (B, H, W, 3)")
    if mask.shape != image.shape[:3] + (1,):
        raise ValueError(f"mask shape {mask.shape}: expected {image.shape[:3] + (1,)} to match image {image.shape}")
    if image.shape[1] % multiple or image.shape[2] % multiple:
        raise ValueError(f"image size {image.shape[1]}x{image.shape[2]}: expected multiples of {multiple}")
