"""Learning check of the VLM policy kind (issue 15): with a reward for completions that contain a chosen word, the
fraction of completions containing it rises over 30 CPU epochs of the tiny Qwen-Image-Edit Plus family.

    .venv/bin/python -m tools.vlm_policy_learning [--epochs 30] [--out /tmp/vlm_policy_learning]

The reward goes through the loop's reward seam (config reward.factory, "module:factory"), in place of the judge;
everything else (sampling, conditioning, DiT rendering, GRPO update) is the recipe's, shrunk. Prints the fraction
over the first and last 5 epochs; exits 1 unless it rose.
"""
import argparse
import sys

import numpy as np

from configs import qwen_edit_vlm_grpo
from jax_inpaint_rl.vlm_policy import loop

WORD = "t7"  # the tiny detokeniser's name of token id 7


def word_reward(word: str = WORD):
    """1 for a completion that holds `word`, else 0 (the image is not looked at)."""
    def reward(images, sources, instructions, completions):
        del images, sources, instructions
        scores = np.array([float(word in text.split()) for text in completions], np.float32)
        return scores, np.ones(len(scores), bool), [""] * len(scores)
    return reward


def config(epochs: int, out: str):
    c = qwen_edit_vlm_grpo.get_config()
    c.output_dir = out
    c.model.tiny = True
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.data.format, c.data.resolution, c.data.num_examples = "synthetic", 32, 8
    c.policy.group_size, c.policy.prompts_per_batch, c.policy.max_new_tokens = 8, 2, 8
    c.sample.num_steps = c.sample.eval_num_steps = 2
    c.train.num_epochs = epochs
    c.train.lora_rank, c.train.lora_alpha, c.train.learning_rate = 8, 16.0, 3e-2
    c.checkpoint.interval = 0
    c.checkpoint.resume = False  # every call starts over (the output folder may hold an earlier one's metrics)
    c.eval.interval = 0  # the fraction over training's samples is the measure
    c.mesh.data = 1
    c.reward.factory = "tools.vlm_policy_learning:word_reward"
    c.reward.config = {"word": WORD}
    return c


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="/tmp/vlm_policy_learning")
    args = parser.parse_args(argv)
    history = loop.fit(config(args.epochs, args.out)).history
    fractions = [r["reward_mean"] for r in history]
    first, last = float(np.mean(fractions[:5])), float(np.mean(fractions[-5:]))
    print("per-epoch fraction:", " ".join(f"{f:.2f}" for f in fractions))
    print(f"fraction of completions holding {WORD!r}: first 5 epochs {first:.3f}, last 5 epochs {last:.3f}")
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main())
