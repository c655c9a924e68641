"""Smoke test of the benchmark harness (tools/bench): one tiny SD1.5 run of rl_step.py writes a complete record,
and the GPU suite's dry run (tiny configs on the CPU) of every family with an NFT row gives every phase a result.

No timing is asserted: the numbers only have to exist, be finite and positive. What is asserted is what the
bench's comparison rests on: both sides build the same denoiser (parameter counts, and the LoRA / full trained
counts: the same LoRA targets) and compute the same function on the same weights (float32 numerics).
"""
import json
import math

import pytest
import torch

from tools.bench import rl_step

MEASURED = ("params", "ours", "torch_eager", "speedup", "peak_matmul", "mfu")


def numbers(tree, path=""):
    """(path, value) of every int / float leaf (bools are flags, not measurements)."""
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in numbers(value, f"{path}/{key}")]
    if isinstance(tree, list):
        return [item for index, value in enumerate(tree) for item in numbers(value, f"{path}/{index}")]
    return [(path, tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.fixture
def one_torch_thread():
    """Eager torch with several OpenMP threads stalls for seconds on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_sd15_run_appends_a_complete_record(tmp_path, one_torch_thread):
    out = tmp_path / "results.jsonl"
    returned = rl_step.main(["--family", "sd15_inpaint", "--size", "tiny", "--steps", "2", "--batch", "2",
                             "--repeats", "1", "--no-torch-compile", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record == json.loads(json.dumps(returned))
    assert set(record) == {"date", "device", "versions", "config", "params", "ours", "torch_eager", "torch_compiled",
                           "speedup", "peak_matmul", "mfu"}
    assert {"jax", "torch", "diffusers"} <= set(record["versions"])
    assert record["config"] | {"steps": 2, "batch": 2, "repeats": 1, "torch_compile": False} == record["config"]
    assert record["params"]["ours"] == record["params"]["torch"]  # the same denoiser config on both sides
    assert record["params"]["trained"]["ours"] == record["params"]["trained"]["torch"] == record["params"]["ours"]
    for side in ("ours", "torch_eager"):
        assert {"median_s", "first_call_s", "images_per_s"} <= set(record[side]["rollout"])
        assert {"median_s", "first_call_s"} <= set(record[side]["update_grpo"])
        assert "skipped" in record[side]["update_nft"]  # no SD1.5 NFT recipe: the torch reference is flow-only
        assert {"bytes", "source"} == set(record[side]["memory"])
    assert {"compile_s", "flops", "flops_xla", "flops_counted", "flops_source"} <= set(record["ours"]["update_grpo"])
    assert record["torch_compiled"] is None and record["speedup"]["vs_compiled"] is None
    assert record["speedup"]["vs_eager"]["update_nft"] is None
    found = dict(numbers({key: record[key] for key in MEASURED}))
    for key in ("/speedup/vs_eager/rollout", "/speedup/vs_eager/update_grpo", "/mfu/update_grpo",
                "/peak_matmul/flops_per_s", "/ours/rollout/images_per_s", "/ours/update_grpo/flops"):
        assert key in found
    bad = {path: value for path, value in found.items() if not (math.isfinite(value) and value > 0)}
    assert not bad
    assert "rollout images/s" in rl_step.format_table(record)


def test_resolution_off_the_latent_grid_is_named():
    with pytest.raises(SystemExit, match="--resolution=30"):
        rl_step.main(["--family", "sd15_inpaint", "--size", "tiny", "--resolution", "30"])


@pytest.mark.parametrize("flags, named", [(["--steps", "0"], "--steps=0"), (["--batch", "-1"], "--batch=-1"),
                                          (["--dtype", "float16"], "float16"),
                                          (["--family", "no_such_family"], "no_such_family")])
def test_bad_flags_name_the_value(flags, named, capsys):
    with pytest.raises(SystemExit):
        rl_step.parse_args(["--family", "sd15_inpaint", "--size", "tiny", *flags])
    assert named in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux_fill", "sd3", "calligrapher"])
def test_gpu_suite_dry_run_writes_every_phase_and_the_table(family, tmp_path, one_torch_thread):
    """The whole GPU suite with tiny configs on the CPU, one family per test: every phase gives a result (none
    fails), the records are appended and the README table gets the row."""
    from tools.bench import gpu_suite

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gpu_suite.MARK_BEGIN}\nold\n{gpu_suite.MARK_END}\nrest\n")
    records = gpu_suite.main(["--dry", "--family", family, "--out", str(tmp_path / "results.jsonl"),
                              "--readme", str(readme)])
    assert [r["phase"] for r in records] == ["rl_step_lora", "rl_step_full", "attention", "numerics", "memory"]
    assert all("result" in r for r in records), [r.get("error") for r in records]
    by_phase = {r["phase"]: r["result"] for r in records}
    lora, full = by_phase["rl_step_lora"], by_phase["rl_step_full"]
    assert lora["config"]["trainable"] == "lora"
    for record in (lora, full):
        params = record["params"]
        assert params["ours"] == params["torch"] and params["trained"]["ours"] == params["trained"]["torch"]
        for side in ("ours", "torch_eager"):  # every family here has an NFT recipe (SD3: the GRPO one, by NFT)
            assert {"median_s", "first_call_s"} <= set(record[side]["update_nft"]), (side, record[side]["update_nft"])
    assert lora["params"]["trained"]["ours"] < full["params"]["trained"]["ours"] == full["params"]["ours"]
    assert by_phase["numerics"]["denoiser_call_relative_error"] < 1e-3  # float32 on the CPU
    assert by_phase["numerics"]["rollout_log_prob_relative_error"] < 1e-4
    assert by_phase["numerics"]["first_ratio_deviation"]["ours"] < 1e-5
    assert by_phase["attention"]["recommended"] in ("auto", "xla")  # cudnn: NVIDIA GPUs only
    assert "unavailable" in by_phase["attention"]["implementations"]["cudnn"]
    assert by_phase["memory"]["estimates"][1]["update_grpo"]["peak_estimate_bytes"] > by_phase["memory"][
        "estimates"][0]["update_grpo"]["peak_estimate_bytes"]
    text = readme.read_text()
    assert "old" not in text and f"| {family} |" in text and text.startswith("intro") and text.endswith("rest\n")
