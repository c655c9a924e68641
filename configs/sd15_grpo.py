"""SD1.5 inpainting + GRPO with DDIM(eta=1) log-probs (DDPO-style), CFG 7.5."""
from configs import base


def get_config():
    c = base.get_config()
    c.output_dir = "runs/sd15_grpo"
    c.model.family = "sd15_inpaint"
    c.model.path = ""  # python -m tools.convert_weights sd15-inpaint --src stable-diffusion-inpainting --dst DIR
    c.data.format = "jsonl"
    c.data.resolution = 512
    c.sample.sampler = "ddim"
    c.sample.noise_level = 1.0
    c.sample.num_steps = 20
    c.sample.eval_num_steps = 50
    c.sample.guidance_scale = 7.5
    c.sample.images_per_prompt = 8
    c.sample.prompts_per_batch = 2
    c.train.method = "grpo"
    c.train.learning_rate = 1e-5
    c.train.minibatch_size = 8
    c.grpo.clip_range = 1e-4
    c.train.timestep_fraction = 0.5
    c.ema.enabled = True
    c.reward.specs = {"ocr": {"weight": 1.0}}
    return c
