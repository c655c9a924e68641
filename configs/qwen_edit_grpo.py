"""Qwen-Image-Edit + GRPO on an edit set (JSONL records of `image_path` and `instruction`), with Flow-GRPO's
Qwen-Image-Edit settings (counting_qwenimage_edit_8gpu, stated for 8 GPUs): 512 px, 10 SDE steps at noise level
1.0 for training and 50 for evaluation, true CFG 4 (negative prompt " "), groups of 16, 2 prompts per rollout
batch, 16 batches and 2 optimizer steps per epoch, no KL, no EMA; LoRA rank 32 / alpha 64 on the transformer's
attention projections, bf16, blocks rematerialised. Rewarded by a VLM judge of the edit against its source
(instruction alignment and quality), as the Kontext recipe is. Inpainting triplets (image, mask, prompt):
`--config.model.family=qwen_image_edit_inpaint` on data with `mask_path` (add a `preservation` term: it reads
the mask)."""
from configs import base

GPUS = 8  # the batch sizes below are global: Flow-GRPO's per-GPU sizes x this


def get_config():
    c = base.get_config()
    c.output_dir = "runs/qwen_edit_grpo"
    c.model.family = "qwen_image_edit"
    c.model.path = ""  # python -m tools.convert_weights qwen-image-edit --src Qwen-Image-Edit --dst DIR
    c.model.compute_dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # the frozen 20B base, VAE and Qwen2.5-VL; LoRA adapters stay float32
    c.model.remat = True
    c.data.format = "jsonl"
    c.data.path = "data/edit_train.jsonl"
    c.data.eval_path = "data/edit_eval.jsonl"
    c.data.resolution = 512
    c.sample.sampler = "flow_grpo"
    c.sample.noise_level = 1.0
    c.sample.num_steps = 10
    c.sample.eval_num_steps = 50
    c.sample.guidance_scale = 4.0  # true CFG with the norm rescale (the family's guidance)
    c.sample.images_per_prompt = 16
    c.sample.prompts_per_batch = 2  # 32 images per rollout batch: 4 per GPU
    c.sample.batches_per_epoch = 16
    c.train.method = "grpo"
    c.train.trainable = "lora"  # q / k / v / out of both streams (the default lora_pattern)
    c.train.lora_rank = 32
    c.train.lora_alpha = 64.0
    c.train.learning_rate = 3e-4
    c.train.minibatch_size = 4 * GPUS
    c.train.gradient_accumulation_steps = 8  # 512 samples / 32 per micro-batch / 8 = 2 optimizer steps per epoch
    c.train.timestep_fraction = 0.99
    c.train.num_epochs = 100000  # Flow-GRPO stops by hand
    c.grpo.kl_beta = 0.0
    c.advantage.per_prompt_stat_tracking = True
    c.advantage.std = "batch"  # global_std=True
    c.ema.enabled = False
    c.eval.interval = 30  # epochs
    c.checkpoint.interval = 120  # optimizer steps: every 60 epochs
    c.reward.specs = {"judge": {"reward": "vlm", "weight": 1.0,
                                "config": {"base_url": "http://127.0.0.1:8000/v1", "model": "Qwen2.5-VL-7B-Instruct",
                                           "templates": ["alignment", "quality"], "include_source": True}}}
    c.mesh.data = -1
    return c
