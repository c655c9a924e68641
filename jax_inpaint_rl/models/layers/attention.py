"""Softmax attention for the denoisers and image encoders, through one kernel choice.

Which kernel is fastest depends on the device, not on the model, so the choice
is process-wide, as jax's default matmul precision is: `use` sets it from
config `model.attention` before any program is traced. 'auto' lets JAX pick,
'xla' is the plain XLA softmax(q k^T) v, 'cudnn' the fused flash kernel on
NVIDIA GPUs (bf16 / fp16 only). tools/bench/attention_bench.py measures each on a
family's shapes and recommends the fastest within bf16 tolerance.
"""
import jax

IMPLEMENTATIONS = {"auto": None, "xla": "xla", "cudnn": "cudnn"}
_chosen = {"implementation": None}


def use(name: str) -> None:
    """Select the kernel for every attention traced from now on."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"config: model.attention={name!r}: expected one of {sorted(IMPLEMENTATIONS)}")
    if name == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"config: model.attention='cudnn' needs an NVIDIA GPU; this process runs on "
                         f"{jax.default_backend()!r}: use 'auto' or 'xla'")
    _chosen["implementation"] = IMPLEMENTATIONS[name]


def attend(q, k, v, **kwargs):
    """jax.nn.dot_product_attention on (B, T, heads, head_dim) with the selected kernel."""
    return jax.nn.dot_product_attention(q, k, v, implementation=_chosen["implementation"], **kwargs)
