"""Flux.1 Fill + online DPO: best vs worst of each group, reference refreshed every 50 optimizer steps."""
from configs import flux_fill_grpo


def get_config():
    c = flux_fill_grpo.get_config()
    c.output_dir = "runs/flux_fill_dpo"
    c.train.method = "dpo"
    c.sample.window_size = 0
    c.sample.window_max_start = 0
    c.dpo.beta = 100.0
    c.dpo.ref_update_interval = 50
    c.train.minibatch_size = 2  # pairs
    return c
