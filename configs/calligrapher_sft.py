"""Calligrapher supervised training (the seeds without --use_rl): the adapter learns toward ref on seed 000's
self_bench triplets."""
from configs import calligrapher_grpo


def get_config():
    c = calligrapher_grpo.get_config()
    c.output_dir = "runs/calligrapher_sft"
    c.train.method = "sft"
    c.train.warmup_steps = 0
    c.train.num_epochs = 10000  # one optimizer step per epoch (batches_per_epoch x accumulation micro-batches)
    c.grpo.kl_beta = 0.0
    return c
