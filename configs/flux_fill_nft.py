"""Flux.1 Fill + DiffusionNFT (seed 004's recommended settings: beta 0.5, decay type 1, kl 0.01, EMA 0.999)."""
from configs import flux_fill_grpo


def get_config():
    c = flux_fill_grpo.get_config()
    c.output_dir = "runs/flux_fill_nft"
    c.train.method = "nft"
    c.sample.window_size = 0
    c.sample.window_max_start = 0
    c.nft.beta = 0.5
    c.nft.adv_mode = "normal"
    c.nft.decay_type = "1"
    c.nft.kl_beta = 0.01
    c.train.timestep_fraction = 0.5
    c.ema.decay = 0.999
    return c
