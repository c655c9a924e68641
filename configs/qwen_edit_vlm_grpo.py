"""Seed 002: GRPO on Qwen-Image-Edit Plus's Qwen2.5-VL (the text policy), the 20B DiT frozen. The VLM writes a
completion (how to carry out the edit) for each (image, instruction); the completion's hidden states condition
the DiT, which edits with true CFG 4 and a deterministic sampler; the judge at an OpenAI-compatible URL rates the
edit (instruction following 0.6 + quality 0.4). The seed's setting: 8 generations per prompt, at most 256 new
tokens, LoRA rank 32 / alpha 64 on the VLM's attention and MLP projections, lr 1e-5, bf16; one prompt per GPU on
8 GPUs (config.mesh: the batch's 64 rows split over data=8). Runs through jax_inpaint_rl.vlm_policy.loop.fit
(policy kind 'vlm'); resumes from output_dir/checkpoints, evaluates greedy completions on the held-out set and
ends with an inference export (output_dir/export)."""
import ml_collections

from jax_inpaint_rl.vlm_policy.loop import LORA_PATTERN

GPUS = 8


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.output_dir = "runs/qwen_edit_vlm_grpo"
    c.policy_kind = "vlm"  # train.py: the trained policy is the text model (vlm_policy.loop.fit)

    c.model = ml_collections.ConfigDict()
    c.model.family = "qwen_image_edit_plus"  # "Picture 1: <image>" + instruction in the user turn, as the seed
    c.model.path = ""  # tools.convert_weights qwen-image-edit --lm-head (the policy needs its logits)
    c.model.tiny = False  # a tiny random model instead (tests, CPU checks)
    c.model.param_dtype = "bfloat16"  # frozen DiT, VAE and VLM; the LoRA tree stays float32
    c.model.compute_dtype = "bfloat16"
    c.model.remat = False  # rematerialise the VLM's and the DiT's layers in the backward pass
    c.model.attention = "auto"  # attention kernel: auto | xla | cudnn (setup.build_family)

    c.data = ml_collections.ConfigDict()
    c.data.format = "jsonl"  # edit sets: records of image_path + instruction
    c.data.path = "data/edit_train.jsonl"
    c.data.eval_path = "data/edit_eval.jsonl"  # held-out edits for evaluation (synthetic: generated)
    c.data.resolution = 512  # the edited size; the VLM reads the input resized to 384 x 384's area (Edit Plus)
    c.data.num_examples = 64  # synthetic only
    c.data.num_eval_examples = 16  # synthetic only
    c.data.synthetic_kinds = ("shape", "text")  # synthetic only

    c.policy = ml_collections.ConfigDict()
    c.policy.group_size = 8  # completions (and edits) per prompt: the seed's num_generations
    c.policy.prompts_per_batch = GPUS  # one prompt per GPU per step, as the seed's per-device batch
    c.policy.max_new_tokens = 256  # the seed's max_completion_length
    c.policy.temperature = 1.0  # trl's default
    c.policy.top_p = 1.0
    c.policy.condition_from = "policy"  # policy (the LoRA VLM embeds the completion: the seed) | base (frozen VLM)
    c.policy.eps_low = 0.2  # trl's epsilon
    c.policy.eps_high = 0.2  # > eps_low: DAPO's clip-higher (0.28 in DAPO)
    c.policy.beta = 0.0  # k3 KL to the LoRA-free VLM (trl's default 0)
    c.policy.aggregation = "dapo"  # grpo | dapo | dr_grpo (trl's default loss_type is dapo)
    c.policy.num_iterations = 1  # passes over each sampled batch (trl's num_iterations); > 1: off-policy ratio
    c.policy.minibatches = 1  # optimizer steps per pass, over disjoint slices of the batch (rows j, j + m, ...)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 50  # DiT steps (deterministic sampler), the pipeline's default
    c.sample.eval_num_steps = 50  # DiT steps of evaluation's edits (and the export's default for inference)
    c.sample.sampler = "ode"  # the DiT's solver, run without noise (diffusion/steps.py)
    c.sample.guidance_scale = 4.0  # true CFG, negative prompt " "

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 1000  # one sampled batch per epoch (num_iterations x minibatches optimizer steps)
    c.train.trainable = "lora"
    c.train.trainable_pattern = ""
    c.train.lora_pattern = LORA_PATTERN  # q / k / v / o and gate / up / down of every language-model layer
    c.train.lora_rank = 32
    c.train.lora_alpha = 64.0
    c.train.learning_rate = 1e-5
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0

    c.advantage = ml_collections.ConfigDict()
    c.advantage.std = "group"  # trl's scale_rewards='group'
    c.advantage.clip = 5.0

    c.reward = ml_collections.ConfigDict()
    c.reward.factory = "jax_inpaint_rl.vlm_policy.judge:make_judge"
    # the judge's rubric (0.6 instruction following + 0.4 quality); identity_weight > 0 mixes in preservation of the
    # source (1 - mean |edited - source|), which the seed does not
    c.reward.config = ml_collections.ConfigDict({"base_url": "http://127.0.0.1:8000/v1", "model": "gpt-4o",
                                                 "max_concurrency": 16, "max_retries": 3, "identity_weight": 0.0})

    c.eval = ml_collections.ConfigDict()
    c.eval.interval = 50  # epochs between evaluations (greedy completions on the held-out set; and at the end); 0 = off
    c.eval.num_grid = 8  # held-out examples in the grid eval_<tag>.png

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # rows of a batch split over devices (-1: the devices the other axes leave)
    c.mesh.fsdp = 1  # rows split too, and every parameter / optimizer-state matrix (ZeRO-3 style)
    c.mesh.tensor = 1  # the DiT's tensor-parallel layers split (parallel/partition.py)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # one process per host: jax.distributed.initialize before anything else
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = detected
    c.distributed.num_processes = -1  # -1 = detected
    c.distributed.process_id = -1  # -1 = detected

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.interval = 50  # epochs; 0 = never
    c.checkpoint.keep = 2
    c.checkpoint.resume = True  # continue from output_dir/checkpoints (the config may change only as a resume can)
    c.checkpoint.resume_step = -1  # which checkpoint: -1 = the latest, else a saved epoch
    return c
