"""Qwen2.5-VL (the text encoder of Qwen-Image-Edit): vision tower, image processor and language model in Flax."""
