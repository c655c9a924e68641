"""SD3.5-Medium supervised baseline: flow matching toward a JSONL set's images (`prompt` + `target_path` per
line; the same LoRA, rate and batch as the GRPO recipe)."""
from configs import sd3_grpo


def get_config():
    c = sd3_grpo.get_config()
    c.output_dir = "runs/sd3_sft"
    c.train.method = "sft"
    c.data.format = "jsonl"
    c.data.path = ""
    c.data.eval_path = ""
    c.train.num_epochs = 1000
    c.train.gradient_accumulation_steps = 1
    c.sample.batches_per_epoch = 1
    return c
