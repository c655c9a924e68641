"""Flux.1 (Fill, Kontext, dev): the transformer and the family functions."""
