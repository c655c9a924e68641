"""SD3.5-Medium + GRPO on Flow-GRPO's OCR task (its general_ocr_sd3_4gpu settings, stated for 4 GPUs on one
host): 10 SDE steps at noise level 0.7 for training, 40 ODE steps for evaluation, CFG 4.5, groups of 16, 16
prompts and 2 optimizer steps per epoch, KL 0.04, LoRA rank 32 / alpha 64 at lr 3e-4, EMA 0.9 every 8 steps."""
from configs import base

GPUS = 4  # the batch sizes below are global: Flow-GRPO's per-GPU sizes x this


def get_config():
    c = base.get_config()
    c.output_dir = "runs/sd3_grpo"
    c.model.family = "sd3"
    c.model.path = ""  # python -m tools.convert_weights sd3 --src stable-diffusion-3.5-medium --dst DIR
    c.model.compute_dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # the frozen base and encoders; LoRA adapters stay float32
    c.data.format = "flow_grpo"  # Flow-GRPO's dataset/ocr folder: train.txt, test.txt
    c.data.path = "dataset/ocr"
    c.data.resolution = 512
    c.sample.sampler = "flow_grpo"
    c.sample.noise_level = 0.7
    c.sample.num_steps = 10
    c.sample.eval_num_steps = 40
    c.sample.guidance_scale = 4.5
    c.sample.images_per_prompt = 16
    c.sample.prompts_per_batch = 2  # 32 images per rollout batch: 8 per GPU (Flow-GRPO: train_batch_size 8)
    c.sample.batches_per_epoch = 8  # 16 prompts x 16 images per epoch
    c.train.method = "grpo"
    c.train.trainable = "lora"  # Flow-GRPO's targets: q / k / v / out of both streams (our default lora_pattern)
    c.train.lora_rank = 32
    c.train.lora_alpha = 64.0
    c.train.learning_rate = 3e-4
    c.train.minibatch_size = 8 * GPUS
    c.train.gradient_accumulation_steps = 4  # 256 samples / 32 per micro-batch / 4 = 2 optimizer steps per epoch
    c.train.timestep_fraction = 0.99  # 9 of the 10 steps
    c.train.num_epochs = 100000  # Flow-GRPO stops by hand
    c.grpo.clip_range = 1e-4
    c.grpo.kl_beta = 0.04
    c.grpo.kl_mode = "flow_grpo"  # its KL: squared mean difference / (2 sigma_t^2)
    c.advantage.per_prompt_stat_tracking = True
    c.advantage.std = "batch"  # global_std=True
    c.ema.enabled = True
    c.ema.decay = 0.9
    c.ema.interval = 8
    c.eval.interval = 60  # epochs
    c.checkpoint.interval = 120  # optimizer steps: every 60 epochs
    # Flow-GRPO's OCR reward: the whole image read, against the prompt's text in double quotes
    c.reward.specs = {"ocr": {"weight": 1.0, "config": {"mode": "full", "target": "quoted"}}}
    c.mesh.data = -1
    return c
