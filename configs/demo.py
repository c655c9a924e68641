"""The demo: a tiny SD1.5-inpainting-shaped model trained from scratch on synthetic shapes, CPU, minutes.

SFT warm-up teaches the fill from ground truth, then GRPO raises a pixel-level
reward (similarity to the ground truth inside the mask). Prints the held-out
reward after warm-up and after RL.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.output_dir = "runs/demo"
    c.model.family = "sd15_inpaint"
    c.model.tiny = True
    c.data.format = "synthetic"
    c.data.resolution = 32
    c.data.num_examples = 256
    c.data.num_eval_examples = 16
    c.sample.sampler = "ddim"
    c.sample.noise_level = 1.0  # DDIM eta (DDPO)
    c.sample.num_steps = 10
    c.sample.eval_num_steps = 10
    c.sample.guidance_scale = 2.0
    c.sample.images_per_prompt = 8
    c.sample.prompts_per_batch = 4
    c.sample.batches_per_epoch = 2
    c.train.method = "grpo"
    c.train.autoencoder_steps = 400
    c.train.warmup_steps = 300
    c.train.num_epochs = 40
    c.train.learning_rate = 1e-3
    c.train.minibatch_size = 16
    c.train.timestep_fraction = 1.0
    c.grpo.clip_range = 1e-2
    c.eval.interval = 10
    c.checkpoint.interval = 40  # optimizer steps: 4 per epoch
    c.reward.specs = {"reference_similarity": {"weight": 1.0}}
    return c
