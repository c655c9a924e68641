"""Building blocks shared by the model families: conv / attention blocks, VAE, CLIP, T5, mask helpers."""
