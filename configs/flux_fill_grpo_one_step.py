"""Flux.1 Fill + one-step GRPO (seed 000): no rollout; per group the target is noised to one random step,
k stochastic steps from it are scored on their one-step x0 estimates. Needs targets (self_bench ref images)."""
from configs import flux_fill_grpo


def get_config():
    c = flux_fill_grpo.get_config()
    c.output_dir = "runs/flux_fill_grpo_one_step"
    c.data.format = "self_bench"
    c.train.method = "grpo_one_step"
    c.sample.window_size = 0  # the step is drawn from every step of the schedule
    c.sample.window_max_start = 0
    c.train.warmup_steps = 500  # --rl_warmup_steps: SFT toward the refs first, as seed 000 does
    c.reward.specs = {"ocr": {"weight": 1.0}, "reference_similarity": {"weight": 0.5}}
    return c
