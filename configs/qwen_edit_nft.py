"""Qwen-Image-Edit + DiffusionNFT on an edit set: qwen_edit_grpo's data, model and rewards with NFT's objective
(seed 004's recommended settings: beta 0.5, decay type 1, KL 0.01, EMA 0.999); deterministic sampling."""
from configs import qwen_edit_grpo


def get_config():
    c = qwen_edit_grpo.get_config()
    c.output_dir = "runs/qwen_edit_nft"
    c.train.method = "nft"
    c.sample.window_size = 0
    c.sample.window_max_start = 0
    c.nft.beta = 0.5
    c.nft.adv_mode = "normal"
    c.nft.decay_type = "1"
    c.nft.kl_beta = 0.01
    c.train.timestep_fraction = 0.5
    c.ema.enabled = True
    c.ema.decay = 0.999
    return c
