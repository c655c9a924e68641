"""Defaults shared by every recipe; each field has the meaning of the seeds' flag named in its comment."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.output_dir = "runs/default"  # --output_dir

    c.model = ml_collections.ConfigDict()
    c.model.family = "sd15_inpaint"  # --model_type: sd15_inpaint | flux_fill | flux_kontext | flux_dev | module:build
    c.model.path = ""  # --pretrained_model_name_or_path: a folder written by tools.convert_weights
    c.model.tiny = False  # build a tiny randomly initialised model instead (demo, tests)
    c.model.param_dtype = "float32"  # weights kept in this dtype (frozen base, encoders, full fine-tuning)
    c.model.compute_dtype = "float32"  # --mixed_precision: bfloat16 runs the models in bf16 (float16: refused)
    c.model.remat = False  # --gradient_checkpointing
    # attention kernel: auto (JAX picks) | xla | cudnn (flash, NVIDIA GPUs, bf16); tools/bench/gpu_suite.py measures
    c.model.attention = "auto"
    c.model.offload_text_encoders = False  # --offload_text_encoder_two: encoders in host memory, sent per batch

    c.data = ml_collections.ConfigDict()
    c.data.format = "synthetic"  # synthetic | self_bench | jsonl (--train_data_json) | txt | flow_grpo | tfds
    c.data.path = ""  # dataset file or folder
    c.data.eval_path = ""  # held-out set (synthetic: a different seed)
    c.data.resolution = 512  # --resolution
    c.data.num_examples = 64  # synthetic only: examples generated
    c.data.num_eval_examples = 16  # synthetic only
    c.data.synthetic_kinds = ("shape", "text")  # synthetic only: what the masked box holds (text has target_text)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 10  # --rl_num_inference_steps
    c.sample.eval_num_steps = 10  # steps for evaluation images (deterministic solver)
    c.sample.guidance_scale = 3.5  # --rl_guidance_scale
    c.sample.sampler = "flow_grpo"  # flow_grpo | dance_grpo | cps | ddim (ode is used outside the window)
    c.sample.noise_level = 0.7  # a (Flow-GRPO / CPS) or eta (DanceGRPO / DDIM)
    c.sample.strength = 1.0  # inpainting strength (pasting families): < 1 starts from the noised source, fewer steps
    c.sample.window_size = 0  # SDE window length in steps; 0 = every step is stochastic; 1 = S1
    c.sample.window_max_start = 0  # window start drawn uniformly in [0, window_max_start] per epoch
    c.sample.images_per_prompt = 4  # --rl_num_images_per_prompt (group size k)
    c.sample.prompts_per_batch = 2  # prompts per rollout batch on each host (the global batch is x hosts)
    c.sample.batches_per_epoch = 1  # --rl_num_batches_per_epoch (SFT runs: optimizer steps per epoch)
    c.sample.same_noise_per_group = False  # same initial noise for a group's k images

    c.train = ml_collections.ConfigDict()
    c.train.method = "grpo"  # --rl_method: grpo | grpo_one_step | nft | dpo | sft (no --use_rl) | module:make
    c.train.num_epochs = 10  # epochs (rollout + inner updates each; SFT: batches_per_epoch steps)
    c.train.max_train_steps = 0  # --max_train_steps: stop at the end of the epoch that reaches it (0 = off)
    c.train.autoencoder_steps = 0  # tiny from-scratch models only: fit the VAE as an autoencoder first
    c.train.autoencoder_learning_rate = 1e-3
    c.train.warmup_steps = 0  # --rl_warmup_steps: SFT optimizer steps before RL
    c.train.learning_rate = 1e-4  # --learning_rate
    # full | lora (--use_lora) | subset (only trainable_pattern's parameters) | subset+lora (both)
    c.train.trainable = "full"
    c.train.trainable_pattern = ""  # regex on denoiser parameter paths: the subset trained in full
    c.train.lora_pattern = ""  # the same for the kernels that get LoRA; default: attention q/k/v/out
    c.train.lora_rank = 32  # --lora_rank
    c.train.lora_alpha = 64.0  # --lora_alpha (the adapter is scaled by alpha / rank)
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.weight_decay = 1e-4
    c.train.max_grad_norm = 1.0
    c.train.minibatch_size = 4  # --train_batch_size: samples (SFT: examples; DPO: pairs) per micro-batch, all hosts
    c.train.gradient_accumulation_steps = 1  # --gradient_accumulation_steps
    c.train.inner_epochs = 1  # --rl_num_inner_epochs
    c.train.timestep_fraction = 1.0  # --rl_timestep_fraction
    c.train.timestep_mode = "shuffle"  # first | shuffle | one (one random window step of each rollout)
    c.train.scan_trained_steps = False  # a minibatch's trained steps in one lax.scan call (4.4x slower on XLA:CPU)
    c.train.adv_clip_max = 5.0  # --rl_adv_clip_max
    c.train.max_nonfinite_steps = 5  # stop after this many non-finite updates in a row

    c.grpo = ml_collections.ConfigDict()  # grpo and grpo_one_step
    c.grpo.clip_range = 1e-4  # --rl_grpo_clip_range (ratios of mean-over-dims log-probs: tiny)
    c.grpo.kl_beta = 0.0  # --rl_kl_beta
    c.grpo.kl_mode = "exact"  # exact (KL / step variance) | flow_grpo (KL / sigma_t^2 = exact x (-dt))

    c.nft = ml_collections.ConfigDict()
    c.nft.beta = 0.5  # --nft_beta
    c.nft.adv_mode = "normal"  # --nft_adv_mode: normal | positive_only | negative_only | one_only | binary
    c.nft.decay_type = "1"  # --nft_decay_type: 0 (fixed old model) | 1 | 2 | copy (old = learner each epoch)
    c.nft.kl_beta = 0.0  # --rl_kl_beta: velocity MSE to the reference

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 100.0  # Diffusion-DPO beta (5000 for SD1.5 epsilon, ~100 flow)
    c.dpo.ref_update_interval = 0  # online DPO: refresh the reference every N optimizer steps (0 = never)

    c.sft = ml_collections.ConfigDict()
    c.sft.mask_weight_inside = 1.0  # SFT loss weight inside the mask
    c.sft.mask_weight_outside = 1.0  # SFT loss weight outside the mask

    c.advantage = ml_collections.ConfigDict()
    c.advantage.per_prompt_stat_tracking = True  # --rl_per_prompt_stat_tracking: group mean (else batch mean)
    c.advantage.std = "batch"  # batch | group | none
    c.advantage.drop_zero_signal = True  # groups whose valid rewards are all equal train nothing

    c.ema = ml_collections.ConfigDict()
    c.ema.enabled = False  # --use_ema
    c.ema.decay = 0.9999  # --ema_decay
    c.ema.interval = 1  # --ema_update_interval

    c.reward = ml_collections.ConfigDict()
    # name -> {"weight": w, "reward": registry name (default: name), "config": {...}} (seed 000: ocr + vlm)
    c.reward.specs = {"reference_similarity": {"weight": 1.0}}

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # batch split (-1: the devices left over by the other axes)
    c.mesh.fsdp = 1  # batch and every parameter / optimizer-state matrix split (ZeRO-3 style)
    c.mesh.tensor = 1  # the family's tensor-parallel layers split (parallel/partition.py)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # one process per host: jax.distributed.initialize before anything else
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = detected (SLURM, TPU, MPI, ...)
    c.distributed.num_processes = -1  # -1 = detected
    c.distributed.process_id = -1  # -1 = detected

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.interval = 500  # --checkpointing_steps: optimizer steps between saves (at epoch ends)
    c.checkpoint.keep = 2
    c.checkpoint.resume = True  # continue from a checkpoint in output_dir (the config may change only in ways it can)
    c.checkpoint.resume_step = -1  # which checkpoint: -1 = the latest, else a saved number (an earlier one)
    c.checkpoint.init_from = ""  # --initial_ip_adapter_path: an export folder whose denoiser the run starts from

    c.eval = ml_collections.ConfigDict()
    c.eval.interval = 5  # epochs between evaluations
    c.eval.num_grid = 8  # examples shown in the PNG grid
    return c
