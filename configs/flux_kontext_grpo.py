"""Flux.1 Kontext (instruction editing) + GRPO on an edit set: JSONL records of `image_path` and `instruction`
(no mask), rewarded by a VLM judge of the edit as Flow-GRPO's Kontext recipe does."""
from configs import flux_fill_grpo


def get_config():
    c = flux_fill_grpo.get_config()
    c.output_dir = "runs/flux_kontext_grpo"
    c.model.family = "flux_kontext"
    c.model.path = ""  # python -m tools.convert_weights flux-kontext --src FLUX.1-Kontext-dev --dst DIR
    c.sample.guidance_scale = 2.5  # Kontext's embedded guidance
    c.reward.specs = {"judge": {"reward": "vlm", "weight": 1.0,
                                "config": {"base_url": "http://127.0.0.1:8000/v1", "model": "Qwen2.5-VL-7B-Instruct",
                                           "templates": ["alignment", "quality"], "include_source": True}}}
    return c
