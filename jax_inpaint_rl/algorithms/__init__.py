"""Training algorithms as values (algorithms/base.py), named in a registry.

`from_config(config)` builds the algorithm `config.train.method` names: a
registered name, or "package.module:make" for one of your own. Each `make(config)`
reads its own config section (`config.grpo`, `config.nft`, ...) and the shared
loop settings in `config.train`.
"""
from jax_inpaint_rl.registry import resolve

# name -> "module:make", imported on first use
ALGORITHMS = {
    "grpo": "jax_inpaint_rl.algorithms.grpo:make",
    "grpo_one_step": "jax_inpaint_rl.algorithms.grpo_one_step:make",
    "nft": "jax_inpaint_rl.algorithms.nft:make",
    "dpo": "jax_inpaint_rl.algorithms.dpo:make",
    "sft": "jax_inpaint_rl.algorithms.sft:make",
}


def make(name: str, config):
    """The algorithm registered as `name` (or named "module:make"), built from the config."""
    return resolve(name, ALGORITHMS, "train.method")(config)


def from_config(config):
    return make(config.train.method, config)
