"""Calligrapher (Flux.1 Fill + SigLIP image-prompt adapter) + GRPO as seed 004 trains it, on seed 000's
self_bench triplets (source / mask / ref: ref is the SFT target and, cropped to the mask's box, the style
image); the adapter alone is trained, Flux stays frozen; OCR of the mask region (0.6) + VLM judge (0.4)."""
from configs import base

ADAPTER = "/(image_proj|ip_attention)/"  # the adapter: image projection + to_k_ip / to_v_ip of all 57 blocks


def get_config():
    c = base.get_config()
    c.output_dir = "runs/calligrapher_grpo"
    c.model.family = "calligrapher"
    # python -m tools.convert_weights calligrapher --flux FLUX.1-Fill-dev --siglip siglip-so400m-patch14-384
    #     --adapter calligrapher.bin|ip-adapter.bin --dst DIR   (the seeds' --initial_ip_adapter_path is --adapter)
    c.model.path = ""
    c.model.compute_dtype = "bfloat16"  # --mixed_precision fp16 (bf16 here: fp16 is refused)
    # Flux frozen in bf16; the trained adapter is an fp32 copy whatever this says (README's memory plan: it needs
    # mesh.fsdp >= 2, i.e. two 80 GB GPUs)
    c.model.param_dtype = "bfloat16"
    c.model.remat = True  # --gradient_checkpointing
    c.model.offload_text_encoders = True  # --offload_text_encoder_two (CLIP and T5 in host memory)
    c.data.format = "self_bench"  # seed 000's folder; 'jsonl' (--train_data_json) with target_path works too
    c.data.path = ""
    c.data.eval_path = ""
    c.data.resolution = 512  # --resolution
    c.sample.sampler = "flow_grpo"  # the fork's SDE step has std 1e-8 (no noise): Flow-GRPO's SDE as for Flux Fill
    c.sample.noise_level = 0.9
    c.sample.num_steps = 50  # --rl_num_inference_steps; window_size=4 (Flow-GRPO-Fast) trains 4 of them, cheaper
    c.sample.eval_num_steps = 50
    c.sample.guidance_scale = 30.0  # Fill's embedded guidance, as Calligrapher samples
    c.sample.images_per_prompt = 4  # --rl_num_images_per_prompt
    c.sample.prompts_per_batch = 1
    c.sample.batches_per_epoch = 1  # --rl_num_batches_per_epoch
    c.train.method = "grpo"
    c.train.warmup_steps = 500  # --rl_warmup_steps (SFT toward ref first)
    c.train.learning_rate = 1e-4  # --learning_rate
    # the adapter only; 'subset+lora' adds LoRA (train.lora_rank, train.lora_pattern) on Flux's projections
    c.train.trainable = "subset"
    c.train.trainable_pattern = ADAPTER
    # seed: --train_batch_size 1, --gradient_accumulation_steps 4; the same 4 samples per optimizer step, split
    # over the 2 GPUs the memory plan needs (a micro-batch is a multiple of the data-parallel devices, mesh.fsdp here)
    c.train.minibatch_size = 2
    c.train.gradient_accumulation_steps = 2
    c.train.timestep_fraction = 1.0  # --rl_timestep_fraction
    c.train.max_train_steps = 10000  # --max_train_steps
    c.train.num_epochs = 10000
    c.train.adv_clip_max = 5.0  # --rl_adv_clip_max
    # --rl_grpo_clip_range 0.2: the fork clips ratios of summed log-probs of a zero-noise step; ours are ratios of
    # mean-over-dims log-probs of a true Gaussian step, where |log ratio| is ~1e-4 and 0.2 never clips: Flow-GRPO's 1e-4
    c.grpo.clip_range = 1e-4
    c.grpo.kl_beta = 0.1  # --rl_kl_beta
    c.grpo.kl_mode = "flow_grpo"  # KL / sigma_t^2, so the seed's kl_beta means the same
    c.advantage.per_prompt_stat_tracking = True  # --rl_per_prompt_stat_tracking
    c.ema.enabled = True  # --use_ema
    c.ema.decay = 0.9999  # --ema_decay (GRPO)
    c.checkpoint.interval = 500  # --checkpointing_steps
    # the seeds' RewardClient: 0.6 OCR confidence + 0.4 VLM score. OCR reads the mask's box and compares with the
    # example's target_text (self_bench: NUMBER<TAB>TEXT<TAB>TEXT; JSON: "target_text")
    c.reward.specs = {
        "ocr": {"weight": 0.6, "config": {"mode": "crop"}},
        "judge": {"reward": "vlm", "weight": 0.4,
                  "config": {"base_url": "http://127.0.0.1:8000/v1", "model": "Qwen2.5-VL-7B-Instruct",
                             "templates": ["alignment", "quality"], "include_source": True}},
    }
    c.mesh.data = 1
    c.mesh.fsdp = -1  # every GPU: parameters and Adam state split (ZeRO-3 style)
    return c
