"""Flux.1 Fill + GRPO (Flow-GRPO SDE, noise level 0.9), OCR + VLM rewards as in the seed trainers."""
from configs import base


def get_config():
    c = base.get_config()
    c.output_dir = "runs/flux_fill_grpo"
    c.model.family = "flux_fill"
    c.model.path = ""  # python -m tools.convert_weights flux-fill --src FLUX.1-Fill-dev --dst DIR
    c.model.compute_dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # the frozen 12B base and encoders; LoRA adapters stay float32
    c.model.remat = True
    c.data.format = "jsonl"
    c.data.resolution = 512
    c.sample.sampler = "flow_grpo"
    c.sample.noise_level = 0.9
    c.sample.num_steps = 20
    c.sample.eval_num_steps = 28
    c.sample.guidance_scale = 30.0  # Fill's embedded guidance
    c.sample.images_per_prompt = 8
    c.sample.prompts_per_batch = 2
    c.sample.window_size = 4  # Flow-GRPO-Fast: train 4 SDE steps
    c.sample.window_max_start = 8
    c.train.method = "grpo"
    # LoRA on the attention projections, so a group of 8 fits on one 80 GB GPU; full fine-tuning of the 12B
    # transformer: train.trainable='full', model.param_dtype='float32', learning_rate 1e-5, mesh.fsdp over GPUs
    c.train.trainable = "lora"
    c.train.lora_rank = 32
    c.train.lora_alpha = 64.0
    c.train.learning_rate = 3e-4  # Flow-GRPO's LoRA rate
    c.train.minibatch_size = 8
    c.grpo.clip_range = 1e-4
    c.grpo.kl_beta = 0.0
    c.ema.enabled = True
    c.ema.decay = 0.9999
    c.reward.specs = {"ocr": {"weight": 1.0}}
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
