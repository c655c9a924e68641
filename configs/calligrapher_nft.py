"""Calligrapher + DiffusionNFT with seed 004's NFT settings (beta 0.5, decay type 1, kl 0.01, EMA 0.999,
1000 warm-up steps); the adapter alone is trained."""
from configs import calligrapher_grpo


def get_config():
    c = calligrapher_grpo.get_config()
    c.output_dir = "runs/calligrapher_nft"
    c.train.method = "nft"  # rollouts from the old adapter with the deterministic solver
    c.train.warmup_steps = 1000  # --rl_warmup_steps (the NFT production script)
    c.nft.beta = 0.5  # --nft_beta
    c.nft.adv_mode = "normal"  # --nft_adv_mode
    c.nft.decay_type = "1"  # --nft_decay_type 1: old <- d old + (1 - d) new, d = min(0.001 epoch, 0.5)
    c.nft.kl_beta = 0.01  # --rl_kl_beta (velocity MSE to the reference)
    c.grpo.kl_beta = 0.0
    c.ema.decay = 0.999  # --ema_decay (NFT)
    return c
