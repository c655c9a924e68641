"""SD1.5 inpainting + online DPO (epsilon targets, beta 5000)."""
from configs import sd15_grpo


def get_config():
    c = sd15_grpo.get_config()
    c.output_dir = "runs/sd15_dpo"
    c.train.method = "dpo"
    c.dpo.beta = 5000.0
    c.dpo.ref_update_interval = 50
    c.train.minibatch_size = 2  # pairs
    return c
