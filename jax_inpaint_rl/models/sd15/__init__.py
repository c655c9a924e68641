"""Stable Diffusion 1.5 inpainting: the UNet and the family functions."""
