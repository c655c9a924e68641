"""Every GPU number in one command: speed, memory and numerics of a family against PyTorch, full size.

    python -m tools.bench.gpu_suite [--family flux_fill sd15_inpaint sd3 calligrapher] [--dry] [--budget-s 480]
        [--out tools/bench/results.jsonl] [--readme tools/bench/README.md]

Per family, in one process (torch first, then ours, each phase guarded against running out of memory):
- `rl_step` with LoRA (the recipe's rank): rollout images/s, GRPO and NFT updates, ours vs torch eager and
  torch.compile, peak memory, MFU; then full fine-tuning (GRPO) where it fits;
- attention: `jax.nn.dot_product_attention` implementations on the family's shapes (attention_bench.py);
- numerics on the same weights (numerics.py): one denoiser call, a rollout's log-probs, each side's
  first-update ratio;
- memory from the compiler alone at two group sizes (memory_estimate.py), and the largest LoRA-GRPO group
  the device's memory fits by that estimate.
Each phase appends a record to --out (date, device, versions, command, results); the table between the
`gpu-suite` markers of --readme is regenerated from every suite record. Phases that would start after
--budget-s (counted from the suite's start, over all families) are recorded as skipped. `--dry` runs everything
with the tiny configs on whatever device jax has (the test suite does, so a GPU run cannot fail on a typo).
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from tools.bench import attention_bench, memory_estimate, models, numerics, rl_step  # noqa: E402

FAMILIES = ("flux_fill", "sd15_inpaint", "sd3", "calligrapher")
MARK_BEGIN, MARK_END = "<!-- gpu-suite: begin -->", "<!-- gpu-suite: end -->"
DRY = dict(size="tiny", steps=2, batch=2, resolution=32, dtype="float32", repeats=1)


def rl_args(family: str, trainable: str, dry: bool, out: Path) -> argparse.Namespace:
    flags = ["--family", family, "--trainable", trainable, "--out", str(out)]
    if dry:
        flags += ["--size", "tiny", "--steps", "2", "--batch", "2", "--repeats", "1", "--no-torch-compile",
                  "--torch-threads", "1"]
    else:
        flags += ["--size", "full"]
    return rl_step.parse_args(flags)


def phases(family: str, args) -> dict:
    """name -> () -> result dict, in the order they run."""
    size = DRY if args.dry else dict(size="full", dtype="bfloat16", repeats=5)
    recipe = rl_step.RECIPES[family]["grpo"]
    lora = rl_args(family, "lora", args.dry, args.out)
    resolution = size.get("resolution", lora.resolution)
    model = models.build(family, size["size"], resolution, size["dtype"], remat=True)
    config = rl_step.bench_config(recipe, "grpo", lora)
    device, torch_device = jax.devices()[0], rl_step.torch_device_for(jax.devices()[0])
    inputs = models.host_inputs(model, lora.batch, resolution, lora.seed)
    capacity = (device.memory_stats() or {}).get("bytes_limit")

    def memory():
        small, large = (memory_estimate.estimate(model, config, b, resolution, size["dtype"])
                        for b in (lora.batch, 2 * lora.batch))
        fit = memory_estimate.group_size_fit(small, large, capacity) if capacity else None
        return {"estimates": [small, large], "capacity_bytes": capacity, "largest_lora_grpo_group": fit}

    return {
        "rl_step_lora": lambda: rl_step.run(lora),
        "rl_step_full": lambda: rl_step.run(rl_args(family, "full", args.dry, args.out)),
        "attention": lambda: attention_bench.run(model, lora.batch, resolution, size["dtype"], size["repeats"],
                                                 device),
        "numerics": lambda: numerics.measure(model, config, inputs, lora, device, torch_device),
        "memory": memory,
    }


def run_family(family: str, args, started: float) -> list[dict]:
    records = []
    for name, phase in phases(family, args).items():
        record = {"suite": "gpu_suite", "family": family, "phase": name, "dry": args.dry,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": jax.devices()[0].device_kind, "versions": rl_step.versions(),
                  "command": " ".join(sys.argv)}
        if time.time() - started > args.budget_s:
            record["skipped"] = f"over the {args.budget_s} s budget"
        else:
            phase_start = time.time()
            try:
                record["result"] = phase()
            except Exception as error:  # one phase's failure is a result; the suite goes on
                message = str(error).splitlines()[0][:300] if str(error) else ""
                record["error"] = f"{type(error).__name__}: {message}"
            record["seconds"] = time.time() - phase_start
        rl_step.append_record(args.out, record)
        records.append(record)
    return records


def table(records: list[dict]) -> str:
    """One row per (device, family) of the latest suite run: the numbers a user compares."""
    latest = {}
    for record in records:
        if record.get("suite") == "gpu_suite":
            latest[(record["device"], record["family"], record["dry"], record["phase"])] = record
    rows = ["| device | family | rollout img/s (ours / torch.compile) | LoRA-GRPO s/step (ours / compiled) | "
            "MFU | attention | bf16 call error | first ratio dev (ours / torch) | largest LoRA group |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for device, family, dry in sorted({key[:3] for key in latest}):
        phase = lambda name: latest.get((device, family, dry, name), {}).get("result")  # noqa: E731
        rl, attention, numbers = phase("rl_step_lora"), phase("attention"), phase("numerics")
        memory = phase("memory")
        cells = [f"{device}{' (dry)' if dry else ''}", family]
        if rl:
            compiled = rl.get("torch_compiled") or {}
            for phase_name, key in (("rollout", "images_per_s"), ("update_grpo", "median_s")):
                cells.append(f"{_get(rl['ours'], phase_name, key)} / {_get(compiled, phase_name, key)}")
            cells.append(_fmt((rl.get("mfu") or {}).get("update_grpo"), ".1%"))
        else:
            cells += ["-"] * 3
        cells.append(str(attention["recommended"]) if attention else "-")
        cells.append(_fmt(numbers["denoiser_call_relative_error"], ".2e") if numbers else "-")
        cells.append(f"{_fmt(numbers['first_ratio_deviation']['ours'], '.1e')} / "
                     f"{_fmt(numbers['first_ratio_deviation']['torch'], '.1e')}" if numbers else "-")
        cells.append(str(memory["largest_lora_grpo_group"]) if memory else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _get(side: dict, phase: str, key: str) -> str:
    value = (side or {}).get(phase, {}).get(key)
    return "-" if value is None else f"{value:.3g}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def update_readme(readme: Path, results: Path) -> None:
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    text = readme.read_text()
    if MARK_BEGIN not in text:
        raise ValueError(f"{readme}: no '{MARK_BEGIN}' ... '{MARK_END}' section to write the table into")
    head, rest = text.split(MARK_BEGIN, 1)
    tail = rest.split(MARK_END, 1)[1]
    readme.write_text(f"{head}{MARK_BEGIN}\n{table(records)}\n{MARK_END}{tail}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--dry", action="store_true", help="tiny configs, on whatever device jax has")
    parser.add_argument("--budget-s", type=float, default=480.0, help="phases starting later are skipped")
    parser.add_argument("--out", type=Path, default=rl_step.DEFAULT_OUT)
    parser.add_argument("--readme", type=Path, default=Path(__file__).parent / "README.md")
    args = parser.parse_args(argv)
    if not args.dry and jax.default_backend() == "cpu":
        parser.error("the full-size suite needs an accelerator; --dry runs the tiny one here")
    started, records = time.time(), []
    for family in args.family:
        records += run_family(family, args, started)
    update_readme(args.readme, args.out)
    print(table(records))
    return records


if __name__ == "__main__":
    main()
