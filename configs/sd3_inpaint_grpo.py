"""SD3.5 inpainting + GRPO on a JSONL inpainting set, with OCR of the mask region against each example's
target_text; Flow-GRPO's SD3 settings. A plain SD3.5-Medium folder inpaints by pasting the noised source outside
the mask after every step (log-probs over the mask); a 33-channel inpainting transformer sees the mask and the
masked image instead."""
from configs import sd3_grpo


def get_config():
    c = sd3_grpo.get_config()
    c.output_dir = "runs/sd3_inpaint_grpo"
    c.model.family = "sd3_inpaint"
    c.model.path = ""  # python -m tools.convert_weights sd3 --src stable-diffusion-3.5-medium --dst DIR
    c.data.format = "jsonl"  # image_path, mask_path, prompt, target_text (seeds 001 / 004)
    c.data.path = ""
    c.data.eval_path = ""
    c.reward.specs = {"ocr": {"weight": 1.0, "config": {"mode": "crop"}}}
    return c
