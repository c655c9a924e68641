"""SD3.5-Medium + Flow-GRPO-Fast: only a 2-step SDE window in the first half of the trajectory is stochastic
and trained (ODE elsewhere), so an update costs 2 denoiser calls per sample; Flow-GRPO's fast settings: noise
level 0.8, clip range 1e-5, no KL."""
from configs import sd3_grpo


def get_config():
    c = sd3_grpo.get_config()
    c.output_dir = "runs/sd3_grpo_fast"
    c.sample.noise_level = 0.8
    c.sample.window_size = 2
    c.sample.window_max_start = 3  # windows inside steps 0-4
    c.train.timestep_fraction = 1.0
    c.grpo.clip_range = 1e-5
    c.grpo.kl_beta = 0.0
    return c
