"""One RL step of a family's denoiser, ours against a PyTorch reference on the same device.

    python -m tools.bench.rl_step --family sd15_inpaint|flux_fill|sd3|calligrapher --size tiny|full [--steps N --batch B
        --resolution R --dtype float32|bfloat16 --no-torch-compile --repeats K --seed S
        --out tools/bench/results.jsonl]

Measures rollout throughput (N denoising steps with log-probs and guidance) and the time of one GRPO and one
DiffusionNFT update step, for our jitted programs and for the torch reference (eager, and torch.compile'd
unless --no-torch-compile), with the same batch, steps and dtype; prints a table of the speed-ups and our
update's MFU and appends one JSON record to --out. tools/bench/README.md says how to read it.
"""
import os

# torch and JAX share one GPU in this process: JAX must not grab most of it before torch runs
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import diffusers  # noqa: E402
import flax  # noqa: E402
import jax  # noqa: E402
import jaxlib  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from tools.bench import measure, models, ours, reference  # noqa: E402

# family -> method -> the recipe whose settings the bench takes (bench_config sets train.method to the method)
RECIPES = {"sd15_inpaint": {"grpo": "configs.sd15_grpo"},
           "flux_fill": {"grpo": "configs.flux_fill_grpo", "nft": "configs.flux_fill_nft"},
           # no SD3 NFT recipe: the GRPO recipe trained by NFT, with configs/base.py's NFT settings (beta 0.5,
           # adv_mode normal: those of flux_fill_nft and calligrapher_nft)
           "sd3": {"grpo": "configs.sd3_grpo", "nft": "configs.sd3_grpo"},
           "calligrapher": {"grpo": "configs.calligrapher_grpo", "nft": "configs.calligrapher_nft"}}
METHODS = ("grpo", "nft")
PHASES = ("rollout",) + tuple(f"update_{method}" for method in METHODS)
DTYPES = ("float32", "bfloat16")
# --size tiny defaults; --size full takes steps, batch and resolution from the recipe
TINY_DEFAULTS = dict(steps=4, batch=2, resolution=32, dtype="float32", repeats=3)
FULL_DEFAULTS = dict(dtype="bfloat16", repeats=5)
WEIGHTS = "random, drawn independently on each side from the same denoiser config (speed only is compared)"
OVERRIDES = ("SDE with log-probs at every step (window_size 0); --trainable on both sides in place of the recipe's "
             "(LoRA: the recipe's rank and alpha on the attention projections, peft on the torch side; a recipe's "
             "trained subset, such as Calligrapher's adapter, is not used); ema off and kl_beta 0 on both sides "
             "(the reference has no EMA or KL model); params and compute in --dtype on both sides")
DEFAULT_OUT = Path(__file__).parent / "results.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(RECIPES))
    parser.add_argument("--size", required=True, choices=models.SIZES)
    parser.add_argument("--steps", type=int, help="denoising steps (tiny: 4, full: the recipe's)")
    parser.add_argument("--batch", type=int, help="images per rollout and per update (tiny: 2, full: the recipe's "
                                                  "minibatch on one device)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (tiny: 32, full: the recipe's)")
    parser.add_argument("--dtype", choices=DTYPES, help="params and compute (tiny: float32, full: bfloat16)")
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                        help="skip the torch.compile variant of the reference")
    parser.add_argument("--repeats", type=int,
                        help="timed calls per measurement, after two warm-up calls (tiny 3, full 5)")
    parser.add_argument("--torch-threads", type=int, help="torch's CPU threads (default: torch's own); 1 avoids "
                                                          "OpenMP stalls on a CPU shared with other jobs")
    parser.add_argument("--trainable", choices=("full", "lora"), default="full",
                        help="what the updates train: the whole denoiser, or LoRA adapters (the recipe's rank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file the record is appended to")
    args = parser.parse_args(argv)
    module = importlib.import_module(RECIPES[args.family]["grpo"])
    recipe = module.get_config()
    defaults = TINY_DEFAULTS if args.size == "tiny" else dict(
        FULL_DEFAULTS, steps=recipe.sample.num_steps, batch=per_device_batch(module, recipe),
        resolution=recipe.data.resolution)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch", "resolution", "repeats", "torch_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    if args.size == "full" and jax.default_backend() == "cpu":
        parser.error("--size full builds the real model on an accelerator, but jax's backend is cpu "
                     "(use --size tiny, or run where jax sees a GPU)")
    return args


def per_device_batch(module, recipe) -> int:
    """The recipe's micro-batch on one device: a recipe that states global sizes for `GPUS` devices (as
    configs/sd3_grpo.py does) is divided by them."""
    return max(1, recipe.train.minibatch_size // getattr(module, "GPUS", 1))


def bench_config(recipe: str, method: str, args):
    """The recipe with the bench's method, size, dtype and the overrides both sides share (OVERRIDES)."""
    config = importlib.import_module(recipe).get_config()
    config.train.method = method
    config.sample.num_steps = args.steps
    config.sample.window_size = 0
    config.model.compute_dtype = config.model.param_dtype = args.dtype
    config.ema.enabled = False
    config.grpo.kl_beta = config.nft.kl_beta = 0.0
    config.train.trainable, config.train.trainable_pattern = args.trainable, ""
    config.train.minibatch_size, config.train.timestep_mode, config.train.inner_epochs = args.batch, "one", 1
    return config


def torch_device_for(jax_device) -> str:
    if jax_device.platform == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(f"jax runs on {jax_device.device_kind} but torch {torch.__version__} has no CUDA: install "
                         "a CUDA build (tools/bench/README.md)")
    return "cuda"


def versions() -> dict:
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def skip_missing_methods(results: dict, family: str) -> dict:
    """A method without a recipe for the family is reported as skipped (the NFT reference is flow-only)."""
    for method in METHODS:
        results.setdefault(f"update_{method}", {"skipped": f"no {method} recipe for {family} in {RECIPES[family]}"})
    return results


def speedups(ours_results: dict, theirs: dict | None) -> dict | None:
    """Their median time over ours per phase (> 1: ours is faster); None where either side has no time."""
    if theirs is None:
        return None
    return {phase: theirs[phase]["median_s"] / ours_results[phase]["median_s"]
            if "median_s" in theirs[phase] and "median_s" in ours_results[phase] else None for phase in PHASES}


def mfu(ours_results: dict, peak: dict) -> dict:
    """Model FLOPs utilisation of our update steps: FLOPs per step / median time / measured matmul peak."""
    return {phase: ours_results[phase]["flops"] / ours_results[phase]["median_s"] / peak["flops_per_s"]
            if "flops" in ours_results[phase] else None for phase in PHASES if phase != "rollout"}


def run(args) -> dict:
    """Build, measure the torch reference (first: it hands the device memory back), then ours."""
    device, load_average = jax.devices()[0], os.getloadavg()  # CPU timings mean little on a busy machine
    configs = {method: bench_config(recipe, method, args) for method, recipe in RECIPES[args.family].items()}
    remat = configs["grpo"].model.remat
    try:
        model = models.build(args.family, args.size, args.resolution, args.dtype, remat)
    except ValueError as error:  # the only flag the builders check: the latent grid must divide the image
        raise SystemExit(f"--resolution={args.resolution}: {error}") from error
    inputs = models.host_inputs(model, args.batch, args.resolution, args.seed)
    torch_device = torch_device_for(device)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    torch_results = reference.run(model, configs, inputs, args, torch_device)
    ours_results = skip_missing_methods(ours.run(model, configs, inputs, args, device), args.family)
    for variant in ("eager", "compiled"):
        if torch_results[variant] is not None:
            skip_missing_methods(torch_results[variant], args.family)
    peak = measure.matmul_peak(device)
    sample = configs["grpo"].sample
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"kind": device.device_kind, "platform": device.platform, "torch_device": torch_device,
                   "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "load_average": {"1m": load_average[0], "5m": load_average[1], "15m": load_average[2]}},
        "versions": versions(),
        "config": {"family": args.family, "size": args.size, "steps": args.steps, "batch": args.batch,
                   "resolution": args.resolution, "dtype": args.dtype, "repeats": args.repeats,
                   "torch_compile": args.torch_compile, "seed": args.seed, "remat": remat,
                   "trainable": args.trainable,
                   "sampler": sample.sampler, "noise_level": sample.noise_level,
                   "guidance": f"{model.family.guidance} {sample.guidance_scale}",
                   "latent_shape": list(inputs["x_init"].shape[1:]), "recipes": RECIPES[args.family],
                   "weights": WEIGHTS, "overrides": OVERRIDES},
        "params": {"ours": sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(model.param_shapes())),
                   "torch": torch_results["params"],
                   "trained": {"ours": ours_results["update_grpo"].get("trained_params"),
                               "torch": torch_results["trained"]}},
        "ours": ours_results,
        "torch_eager": torch_results["eager"],
        "torch_compiled": torch_results["compiled"],
        "speedup": {"vs_eager": speedups(ours_results, torch_results["eager"]),
                    "vs_compiled": speedups(ours_results, torch_results["compiled"])},
        "peak_matmul": peak,
        "mfu": mfu(ours_results, peak),
    }


# --- the table ------------------------------------------------------------------------------------------

def _cell(result: dict | None, key: str, fmt: str) -> str:
    if result is None:
        return "-"
    if "error" in result:
        return "OOM" if result["error"].startswith("out of memory") else "error"
    if "skipped" in result:
        return "n/a"
    return format(result[key], fmt) if result.get(key) is not None else "-"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _memory(result: dict | None) -> str:
    return "-" if result is None else f"{result['memory']['bytes'] / 2**30:.2f} GiB"


def format_table(record: dict) -> str:
    c, sides = record["config"], (record["ours"], record["torch_eager"], record["torch_compiled"])
    vs_eager, vs_compiled = record["speedup"]["vs_eager"], record["speedup"]["vs_compiled"] or {}
    rows = [["", "ours", "torch eager", "torch compiled", "speed-up vs eager", "vs compiled"]]
    for phase, label, key, fmt in (("rollout", "rollout images/s", "images_per_s", ".3g"),
                                   ("update_grpo", "update GRPO s/step", "median_s", ".4g"),
                                   ("update_nft", "update NFT s/step", "median_s", ".4g")):
        rows.append([label, *(_cell(side and side[phase], key, fmt) for side in sides),
                     _ratio(vs_eager[phase]), _ratio(vs_compiled.get(phase))])
        rows.append(["  compile (ours) / first call (torch) s",
                     _cell(sides[0][phase], "compile_s", ".3g"),
                     *(_cell(side and side[phase], "first_call_s", ".3g") for side in sides[1:]), "", ""])
    rows.append(["peak memory", *(_memory(side) for side in sides), "", ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{c['family']} {c['size']} on {record['device']['kind']} (torch on {record['device']['torch_device']}): "
             f"{c['steps']} steps, batch {c['batch']}, {c['resolution']}px, {c['dtype']}, median of {c['repeats']}; "
             f"denoiser params ours {record['params']['ours']:,} / torch {record['params']['torch']:,}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    memory_sources = {side["memory"]["source"] for side in sides if side is not None}
    lines.append("memory: " + "; ".join(sorted(memory_sources)))
    peak = record["peak_matmul"]
    for phase, value in record["mfu"].items():
        if value is not None:
            update = record["ours"][phase]
            lines.append(f"MFU ours {phase}: {100 * value:.2f}% = {update['flops'] / 1e9:.4g} GFLOP/step "
                         f"({update['flops_source']}) / {update['median_s']:.4g} s / measured {peak['dtype']} "
                         f"{peak['size']}^3 matmul peak {peak['flops_per_s'] / 1e12:.4g} TFLOP/s")
    return "\n".join(lines)


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = run(args)
    print(format_table(record))
    append_record(args.out, record)
    print(f"appended to {args.out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
