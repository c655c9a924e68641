"""Stable Diffusion 3 / 3.5: the MM-DiT transformer (transformer.py) and the `sd3` / `sd3_inpaint` families."""
