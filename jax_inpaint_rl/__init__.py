"""RL fine-tuning of inpainting diffusion models in JAX."""
