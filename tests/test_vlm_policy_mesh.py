"""The VLM policy on a device mesh (config.mesh; conftest's 8 CPU devices): the loop's own pipeline (vlm_policy/
loop.build and loop.edit: sampler, conditioning and render programs; the update step over two minibatches) run
for the same seed on one device and on a data=4 x fsdp=2 mesh gives the same completions, the same edits and the
same trained LoRA tree within fp32 rounding, with the batch's rows really split over the 8 devices and the LoRA
tree fsdp-split."""
import jax
import numpy as np
import pytest

from configs import qwen_edit_vlm_grpo
from jax_inpaint_rl.data.loader import loaders_from_config
from jax_inpaint_rl.parallel import mesh as mesh_lib
from jax_inpaint_rl.vlm_policy import loop, update

pytestmark = pytest.mark.slow  # compile-bound (sampling / update programs): CI's second stage

LORA_TOLERANCE = 1e-5  # max |difference| of the trained LoRA leaves (lr 1e-2), 1 device vs 8: 7.2e-7 measured


def tiny_config():
    c = qwen_edit_vlm_grpo.get_config()
    c.model.tiny = True
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.data.format, c.data.resolution, c.data.num_examples = "synthetic", 32, 8
    c.policy.group_size, c.policy.prompts_per_batch, c.policy.max_new_tokens = 2, 8, 4
    c.policy.minibatches = 2
    c.sample.num_steps = c.sample.eval_num_steps = 2
    c.train.lora_rank, c.train.lora_alpha, c.train.learning_rate = 4, 8.0, 1e-2
    c.reward.factory = "tools.vlm_policy_learning:word_reward"
    c.reward.config = {"word": "t7"}
    return c


def one_epoch(axes: dict):
    """(the mesh, the sampled completions, this host's edits, the LoRA tree after two minibatch steps)."""
    config = tiny_config()
    mesh = mesh_lib.make_mesh(axes)
    loop.check_config(config, mesh_lib.data_parallel_size(mesh))
    pipe, trainable, opt_state, step = loop.build(config, mesh)
    train, _, _ = loaders_from_config(config.data, prompts_per_batch=config.policy.prompts_per_batch,
                                      seed=config.seed)
    try:
        batch = next(train)
    finally:
        train.close()
    made = loop.edit(pipe, trainable, batch, config.policy.group_size, jax.random.key(3))
    rows = len(made["instructions"])
    advantages = mesh_lib.from_host_rows(mesh, np.linspace(-1.0, 1.0, rows, dtype=np.float32))
    out = made["out"]
    batch = update.UpdateBatch(made["prompts"], out.tokens, out.mask, out.log_probs, advantages,
                               mesh_lib.from_host_rows(mesh, np.ones(rows, bool)))
    for index in range(config.policy.minibatches):
        trainable, opt_state, metrics = step(trainable, opt_state, pipe.base, batch, index)
        assert float(metrics["skipped"]) == 0
    return mesh, out, made["edited"], trainable


def test_one_device_and_an_eight_device_mesh_agree():
    _, single_out, single_edits, single_lora = one_epoch({"data": 1, "fsdp": 1, "tensor": 1})
    mesh, out, edits, lora = one_epoch({"data": 4, "fsdp": 2, "tensor": 1})

    assert out.tokens.sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), 2)
    assert len({shard.device for shard in out.tokens.addressable_shards}) == 8
    assert all(shard.data.shape[0] == 2 for shard in out.tokens.addressable_shards)  # 16 rows, 2 per device
    split = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(lora) if "fsdp" in str(leaf.sharding.spec)]
    assert split, "no LoRA leaf is fsdp-split"

    assert np.array_equal(np.asarray(out.tokens), np.asarray(single_out.tokens))
    assert np.array_equal(np.asarray(out.mask), np.asarray(single_out.mask))
    logp_gap = float(np.abs(np.asarray(out.log_probs) - np.asarray(single_out.log_probs)).max())
    edit_gap = int(np.abs(edits.astype(int) - single_edits.astype(int)).max())
    gaps = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(lora),
                                  jax.device_get(single_lora))
    lora_gap = max(jax.tree_util.tree_leaves(gaps))
    moved = max(float(np.abs(b).max()) for b in jax.tree_util.tree_leaves(jax.device_get(single_lora)))
    print(f"1 vs 8 devices: log-probs {logp_gap:.2e}, edits {edit_gap} / 255, trained LoRA {lora_gap:.2e} "
          f"(largest LoRA entry {moved:.2e}); split leaves {split[:2]}")
    assert logp_gap <= 1e-5, logp_gap
    assert edit_gap <= 1, edit_gap
    assert lora_gap <= LORA_TOLERANCE, lora_gap
