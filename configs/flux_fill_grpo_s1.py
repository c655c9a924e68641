"""Flux.1 Fill + GRPO, S1 (seed 003's SD3 S1 trainer): one SDE step per trajectory, every other step the ODE.

The stochastic step sits at a position drawn each epoch in [0, window_max_start]; only it is trained, so an
update costs one denoiser call per sample and the rollouts stay close to the deterministic sampler's images.
"""
from configs import flux_fill_grpo


def get_config():
    c = flux_fill_grpo.get_config()
    c.output_dir = "runs/flux_fill_grpo_s1"
    c.sample.window_size = 1
    c.sample.window_max_start = 10  # the first half of the 20 steps
    c.train.timestep_fraction = 1.0
    return c
