"""SD3.5-Medium + GRPO, S1 (seed 003's SD3 S1 trainer): one SDE step per trajectory at a position drawn each
epoch in the first half, every other step the ODE; only that step is trained."""
from configs import sd3_grpo


def get_config():
    c = sd3_grpo.get_config()
    c.output_dir = "runs/sd3_s1"
    c.sample.window_size = 1
    c.sample.window_max_start = 4
    c.train.timestep_fraction = 1.0
    return c
