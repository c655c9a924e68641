"""Flux.1 dev (text-to-image) + GRPO on a prompt list: Flow-GRPO's Flux recipe (noise level 0.9, LoRA)."""
from configs import flux_fill_grpo


def get_config():
    c = flux_fill_grpo.get_config()
    c.output_dir = "runs/flux_dev_grpo"
    c.model.family = "flux_dev"
    c.model.path = ""  # python -m tools.convert_weights flux-dev --src FLUX.1-dev --dst DIR
    c.data.format = "txt"  # one prompt per line (data.path, data.eval_path)
    c.sample.guidance_scale = 3.5  # dev's embedded guidance
    # python -m tools.convert_weights.clip --model <CLIPModel folder> --out ckpt/clip
    c.reward.specs = {"clip_score": {"weight": 1.0, "config": {"path": "ckpt/clip"}}}
    return c
