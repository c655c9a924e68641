"""Timing, memory and FLOP helpers shared by both sides of the benchmark."""
import math
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm


def timed_runs(run: Callable[[], Any], sync: Callable[[Any], Any], repeats: int, desc: str,
               warmup: int = 2) -> tuple[dict, Any]:
    """`warmup` calls (the first one's time is reported: it holds torch.compile's compilation; eager torch on
    CPU needs a few calls before its kernels run at speed), then `repeats` timed calls, each waiting for the
    device (`sync`). Returns the timings and the last output."""
    start = time.perf_counter()
    out = sync(run())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        out = sync(run())
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        start = time.perf_counter()
        out = sync(run())
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "median_s": statistics.median(times), "times_s": times}, out


def process_peak_rss() -> dict:
    """ru_maxrss is KiB on Linux and only ever grows: it covers everything run before in the process."""
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "source": "process peak RSS (cumulative over the whole process)"}


def jax_peak_memory(device) -> dict:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"bytes": int(stats["peak_bytes_in_use"]),
                "source": "jax device.memory_stats()['peak_bytes_in_use'] (since process start)"}
    return process_peak_rss()


def matmul_peak(device, repeats: int = 10) -> dict:
    """The device's measured matmul throughput: bf16 8192^3 on accelerators; on CPU float32 1024^3
    (bf16 matmuls are emulated there)."""
    on_cpu = device.platform == "cpu"
    size, dtype = (1024, jnp.float32) if on_cpu else (8192, jnp.bfloat16)
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device) for k in keys)
    matmul = jax.jit(jnp.matmul)
    timings, _ = timed_runs(lambda: matmul(a, b), jax.block_until_ready, repeats, "peak matmul")
    return {"flops_per_s": 2 * size**3 / min(timings["times_s"]), "dtype": jnp.dtype(dtype).name, "size": size}


def xla_flops(compiled) -> float | None:
    """FLOPs from XLA's cost analysis (a dict, or a list of one dict per program in older jax)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def has_while_loop(compiled) -> bool:
    """XLA's cost analysis counts a while loop's body once, whatever its trip count (Flux's scanned blocks)."""
    return " while(" in compiled.as_text()


def _sub_jaxprs(params: dict) -> list:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


def _eqn_flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
    if name == "conv_general_dilated":
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
        rhs = eqn.invars[1].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[d] for d in rhs_spec[1:])
    inner = [jaxpr_flops(jaxpr) for jaxpr in _sub_jaxprs(eqn.params)]
    if not inner:
        return 0
    if name == "scan":
        return eqn.params["length"] * sum(inner)
    if name == "cond":
        return max(inner)
    return sum(inner)


def jaxpr_flops(jaxpr) -> int:
    """Matmul and convolution FLOPs of a jaxpr, scan bodies times their length (while bodies once)."""
    return sum(_eqn_flops(eqn) for eqn in jaxpr.eqns)


def program_flops(compiled_programs: list) -> dict:
    """FLOPs of [(compiled, jaxpr), ...] run one after the other: XLA's count, unless a program has a while
    loop (or XLA gives none); then the jaxprs' matmul + conv count."""
    from_xla = [xla_flops(compiled) for compiled, _ in compiled_programs]
    counted = float(sum(jaxpr_flops(getattr(jaxpr, "jaxpr", jaxpr)) for _, jaxpr in compiled_programs))
    loops = any(has_while_loop(compiled) for compiled, _ in compiled_programs)
    use_xla = None not in from_xla and not loops
    return {"flops_xla": sum(from_xla) if None not in from_xla else None, "flops_counted": counted,
            "has_while_loop": loops, "flops": sum(from_xla) if use_xla else counted,
            "flops_source": "xla cost_analysis" if use_xla else
            "jaxpr matmul+conv count (XLA's cost analysis counts a while-loop body once)"}
