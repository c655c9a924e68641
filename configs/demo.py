"""The demo: a tiny SD1.5-inpainting-shaped model trained from scratch on synthetic shapes, CPU, minutes.

Prompts 'a <colour> <shape>' on a two-colour gradient, the mask the box the
shape goes in. The VAE is fitted as an autoencoder, an SFT warm-up teaches the
fill from ground truth, then online DPO raises a pixel reward (shape_fill: the
prompt's colour and shape in the box, the background continued around it), and
an SFT control arm continues from the warm-up's end (params and optimizer state)
for as many optimizer steps as RL took. Prints the held-out reward and
accuracies after warm-up, after RL and after the control (summary.json).
"""
from configs import base


def get_config():
    c = base.get_config()
    c.output_dir = "runs/demo"
    c.model.family = "sd15_inpaint"
    c.model.tiny = True
    c.data.format = "synthetic"
    c.data.synthetic_kinds = ("gradient_shape",)  # 'a red circle' in the box, on a two-colour gradient
    c.data.resolution = 32
    c.data.num_examples = 256
    c.data.num_eval_examples = 32
    c.sample.sampler = "ddim"
    c.sample.noise_level = 1.0  # DDIM eta
    c.sample.num_steps = 10
    c.sample.eval_num_steps = 10
    c.sample.guidance_scale = 1.0  # no CFG: the from-scratch model never saw an empty prompt
    c.sample.images_per_prompt = 8  # the best and the worst of each 8 make a DPO pair
    c.sample.prompts_per_batch = 8  # also the autoencoder fit's batch (8 images and their 8 targets)
    c.sample.batches_per_epoch = 8  # 64 pairs: 4 optimizer steps of 16 pairs per epoch
    c.train.method = "dpo"
    c.train.sft_control = True  # SFT from the warm-up's end for as many optimizer steps as RL: the control arm
    c.train.autoencoder_steps = 500
    c.train.autoencoder_learning_rate = 3e-3
    c.train.warmup_steps = 600
    c.train.warmup_learning_rate = 3e-3  # SFT warm-up and the control arm
    c.train.learning_rate = 1e-4  # RL (DPO diverges at the SFT rate)
    c.train.num_epochs = 40
    c.train.minibatch_size = 16  # SFT examples per step; DPO pairs per step
    c.dpo.beta = 500.0
    c.eval.interval = 10
    c.eval.num_grid = 8
    c.checkpoint.interval = 1000  # a save blocks ~4 s: this short run saves at its end (and on SIGTERM)
    c.reward.specs = {"shape_fill": {"weight": 1.0}}
    return c
