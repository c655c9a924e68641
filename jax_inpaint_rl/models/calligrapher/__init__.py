"""Calligrapher: Flux.1 Fill with the SigLIP image-prompt adapter (family.py, adapter.py)."""
