"""Qwen-Image-Edit supervised baseline on edit pairs (JSONL records of `image_path`, `instruction` and
`target_path`): flow matching toward the target with LoRA, qwen_edit_grpo's model settings."""
from configs import qwen_edit_grpo


def get_config():
    c = qwen_edit_grpo.get_config()
    c.output_dir = "runs/qwen_edit_sft"
    c.train.method = "sft"
    c.train.num_epochs = 1000
    c.train.learning_rate = 1e-4
    c.train.minibatch_size = 8
    c.train.gradient_accumulation_steps = 1
    c.sample.batches_per_epoch = 1
    return c
