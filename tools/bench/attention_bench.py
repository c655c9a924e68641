"""`jax.nn.dot_product_attention` implementations on a family's attention shapes: speed, and error against
float32.

The shapes are the family's largest attention at the bench resolution (models.py's
builders): the joint attention over text + image tokens of Flux and Calligrapher
(24 heads of 128 at full size; Calligrapher's image tokens cover its canvas) and of
SD3 (24 heads of 64 for SD3.5-Medium), SD1.5's self-attention at the first UNet
level (8 heads of 40). Each implementation
(model.attention's names: 'auto' (JAX picks), 'xla', 'cudnn': the fused flash kernel on NVIDIA GPUs) is
timed in the bench dtype and compared with 'xla' in float32 (max |diff| / max
|reference|); one that cannot run here is recorded with its reason.
`recommended` is the fastest within TOLERANCE: what `model.attention` should
be set to on this device.
"""
import functools

import jax
import jax.numpy as jnp

from jax_inpaint_rl.models.layers import attention
from tools.bench import measure
from tools.bench.models import Model

TOLERANCE = 2e-2  # bf16 has 8 bits of mantissa: a max error of ~1e-2 of the output scale is its rounding


def shape(model: Model, batch: int, resolution: int) -> tuple[int, int, int, int]:
    """(batch, tokens, heads, head dim) of the family's largest attention at `resolution` (its builder says)."""
    return model.attention_shape(batch, resolution)


def run(model: Model, batch: int, resolution: int, dtype: str, repeats: int, device) -> dict:
    dims = shape(model, batch, resolution)
    keys = jax.random.split(jax.random.key(0), 3)
    q32, k32, v32 = (jax.device_put(jax.random.normal(key, dims, jnp.float32), device) for key in keys)
    reference = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="xla"))(q32, k32, v32)
    q, k, v = (a.astype(dtype) for a in (q32, k32, v32))
    results = {}
    for name, implementation in attention.IMPLEMENTATIONS.items():
        attend = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=implementation))
        try:
            compiled = attend.lower(q, k, v).compile()
        except Exception as error:  # e.g. cudnn off NVIDIA GPUs, or shapes its kernel does not take
            results[name] = {"unavailable": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        timings, out = measure.timed_runs(lambda: compiled(q, k, v), jax.block_until_ready, repeats,
                                          f"attention {name}")
        error = float(jnp.abs(out.astype(jnp.float32) - reference).max() / jnp.abs(reference).max())
        results[name] = {"median_s": timings["median_s"], "relative_error": error}
    within = {name: r for name, r in results.items() if "median_s" in r and r["relative_error"] <= TOLERANCE}
    return {"shape": dict(zip(("batch", "tokens", "heads", "head_dim"), dims)), "dtype": dtype,
            "implementations": results, "tolerance": TOLERANCE,
            "recommended": min(within, key=lambda name: within[name]["median_s"]) if within else None}
