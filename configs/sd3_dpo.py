"""SD3.5-Medium + online DPO on Flow-GRPO's OCR prompts: best vs worst of each group, reference refreshed
every 50 optimizer steps."""
from configs import sd3_grpo


def get_config():
    c = sd3_grpo.get_config()
    c.output_dir = "runs/sd3_dpo"
    c.train.method = "dpo"
    c.dpo.beta = 100.0
    c.dpo.ref_update_interval = 50
    c.train.minibatch_size = 4  # pairs, one per GPU
    c.train.gradient_accumulation_steps = 1
    return c
