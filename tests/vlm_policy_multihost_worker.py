"""One process of the VLM policy's 2-process test (tests/test_vlm_policy_multihost.py): the tiny recipe over both
processes' devices, each host loading, rendering and rewarding its own prompts.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
        python -m tests.vlm_policy_multihost_worker PROCESS_ID PORT OUTPUT_DIR
"""
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from configs import qwen_edit_vlm_grpo
from jax_inpaint_rl.vlm_policy import loop

HOSTS = 2
PROMPTS = 4  # per epoch, over all hosts


def config_for(output_dir, hosts: int):
    """2 epochs of 4 prompts x 2 completions on 4 devices (data=4), two minibatch steps each, an evaluation at the
    end; the reward is the learning tool's word count (the completions alone decide it, on any host)."""
    c = qwen_edit_vlm_grpo.get_config()
    c.output_dir = str(output_dir)
    c.model.tiny = True
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.data.format, c.data.resolution, c.data.num_examples, c.data.num_eval_examples = "synthetic", 32, 8, 8
    c.policy.group_size, c.policy.prompts_per_batch, c.policy.max_new_tokens = 2, PROMPTS // hosts, 4
    c.policy.minibatches = 2
    c.sample.num_steps = c.sample.eval_num_steps = 2
    c.train.num_epochs = 2
    c.train.lora_rank, c.train.lora_alpha, c.train.learning_rate = 4, 8.0, 1e-2
    c.eval.interval, c.eval.num_grid = 2, 2
    c.checkpoint.interval = 2
    c.mesh.data = 4
    c.reward.factory = "tools.vlm_policy_learning:word_reward"
    c.reward.config = {"word": "t7"}
    return c


def main(process_id: int, port: int, output_dir: str) -> None:
    config = config_for(output_dir, HOSTS)
    config.distributed.enabled = True
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes, config.distributed.process_id = HOSTS, process_id
    runner = loop.main(config)
    assert jax.process_count() == HOSTS and jax.device_count() == 4
    lora = {jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
            for path, leaf in jax.tree_util.tree_flatten_with_path(runner.trainable)[0]}
    if process_id == 0:
        np.savez(os.path.join(output_dir, "final_lora.npz"), **lora)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
