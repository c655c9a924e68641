"""Flux.1 Fill supervised baseline on the dataset's targets (loss weighted toward the mask)."""
from configs import flux_fill_grpo


def get_config():
    c = flux_fill_grpo.get_config()
    c.output_dir = "runs/flux_fill_sft"
    c.train.method = "sft"
    c.train.num_epochs = 1000
    c.train.minibatch_size = 4  # --train_batch_size
    c.sample.batches_per_epoch = 1
    c.sft.mask_weight_inside = 1.0
    c.sft.mask_weight_outside = 0.1
    return c
