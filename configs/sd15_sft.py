"""SD1.5 inpainting supervised baseline."""
from configs import sd15_grpo


def get_config():
    c = sd15_grpo.get_config()
    c.output_dir = "runs/sd15_sft"
    c.train.method = "sft"
    c.train.num_epochs = 1000
    c.train.minibatch_size = 4  # --train_batch_size
    return c
