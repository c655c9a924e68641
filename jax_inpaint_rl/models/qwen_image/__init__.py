"""Qwen-Image / Qwen-Image-Edit: the MM-DiT transformer (transformer.py); the family is not written yet."""
