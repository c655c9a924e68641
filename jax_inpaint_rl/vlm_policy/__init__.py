"""The VLM policy kind (issue 15, seed 002): GRPO on Qwen-Image-Edit's Qwen2.5-VL, the DiT frozen; `loop.fit`."""
