"""Flux converter CLI: the model-level --verify (passes on a faithful conversion, names a tampered block and
fails), export-flux from a converted folder and from a training export (EMA), and bad --src errors.

One tiny Flux Fill pipeline (tests/test_flux_family.py) is saved and converted once, by the CLI in a
subprocess so its real exit status is checked; the other tests reuse the folders."""
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from ml_collections import ConfigDict
from safetensors.numpy import load_file, save_file

from jax_inpaint_rl.checkpoint.export import write_export
from jax_inpaint_rl.models.params_io import load_params
from tests.test_flux_family import torch_pipeline
from tests.test_flux_transformer import numpy_state
from tools.convert_weights import flux
from tools.convert_weights.__main__ import main as cli
from tools.convert_weights.common import ConversionError
from tools.convert_weights.flux_verify import VerificationError, check_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
REPORT_LINE = re.compile(r"^(\S+)\s+(.+?)\s+max\|diff\| (\S+)\s+relative (\S+)$", re.M)
EXPECTED_LINES = {
    ("transformer", "x_embedder"), ("transformer", "context_embedder"), ("transformer", "time_text_embed"),
    ("transformer", "double_blocks"), ("transformer", "single_blocks"), ("transformer", "norm_out + proj_out"),
    ("vae", "encode mean"), ("vae", "decode"), ("text_encoder", "hidden states"), ("text_encoder", "pooled"),
    ("text_encoder_2", "embed_tokens"), ("text_encoder_2", "position bias"), ("text_encoder_2", "blocks"),
    ("text_encoder_2", "final_norm"),
}


def report(output: str) -> dict[tuple[str, str], tuple[str, float]]:
    """(component, group) -> (the group's label, relative error) from the model check's printout."""
    return {(component, label.split(" (worst")[0]): (label, float(relative))
            for component, label, _, relative in REPORT_LINE.findall(output)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch pipeline, diffusers folder, converted folder, finished `flux-fill --verify` process)."""
    root = tmp_path_factory.mktemp("flux_cli")
    src, dst = str(root / "diffusers"), str(root / "converted")
    pipe = torch_pipeline("flux_fill")
    pipe.save_pretrained(src)
    process = subprocess.run([sys.executable, "-m", "tools.convert_weights", "flux-fill", "--src", src, "--dst", dst,
                              "--verify"], cwd=REPO, capture_output=True, text=True, timeout=300)
    return pipe, src, dst, process


def test_cli_verify_reports_every_component_within_tolerance(converted):
    _, _, _, process = converted
    assert process.returncode == 0, process.stderr[-3000:]
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert re.search(rf"^verified {component}: \d+ tensors equal their source$", process.stdout, re.M)
    lines = report(process.stdout)
    assert set(lines) == EXPECTED_LINES, process.stdout
    assert all(relative < TOLERANCE for _, relative in lines.values()), process.stdout
    assert lines[("transformer", "single_blocks")][0].startswith("single_blocks (worst of 2: single_blocks/")


def test_tampered_block_is_named_and_fails(converted, tmp_path, capsys):
    _, src, dst, _ = converted
    tampered = str(tmp_path / "tampered")
    shutil.copytree(dst, tampered)
    path = flux.params_file(tampered, "transformer")
    params = load_file(path)
    params["transformer/single_blocks/proj_mlp/kernel"][1] *= 1.01  # 1% on one layer of one stacked tensor
    save_file(params, path)
    with pytest.raises(VerificationError) as err:
        check_models({"transformer": flux.pipeline_components(src)["transformer"]}, tampered, TOLERANCE)
    assert "transformer single_blocks/1 (" in str(err.value) and tampered in str(err.value)
    assert "single_blocks/0" not in str(err.value) and "double_blocks" not in str(err.value)  # isolated
    lines = report(capsys.readouterr().out)
    label, relative = lines[("transformer", "single_blocks")]
    assert label == "single_blocks (worst of 2: single_blocks/1)" and relative > 10 * TOLERANCE
    assert lines[("transformer", "double_blocks")][1] < TOLERANCE


def test_bfloat16_output_is_checked_against_a_reference_rounded_the_same_way(converted, tmp_path, capsys):
    _, src, _, _ = converted
    component = flux.pipeline_components(src)["transformer"]
    flux.convert_component(component, str(tmp_path), "transformer", dtype="bfloat16")
    check_models({"transformer": component}, str(tmp_path), TOLERANCE)  # unrounded: ~1e-3
    output = capsys.readouterr().out
    assert "transformer: stored as bfloat16, upcast to float32" in output
    assert set(report(output)) == {line for line in EXPECTED_LINES if line[0] == "transformer"}


def test_export_flux_from_converted_folder_is_exact(converted, tmp_path):
    from diffusers import FluxTransformer2DModel

    pipe, _, dst, _ = converted
    cli(["export-flux", "--src", dst, "--dst", str(tmp_path / "fp32")])
    original, exported = numpy_state(pipe.transformer), numpy_state(FluxTransformer2DModel.from_pretrained(
        str(tmp_path / "fp32")))
    assert original.keys() == exported.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
    cli(["export-flux", "--src", dst, "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    header, _ = flux.read_header(str(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors"))
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    half = numpy_state(FluxTransformer2DModel.from_pretrained(str(tmp_path / "bf16")))  # loaded as float32
    for key in original:
        np.testing.assert_array_equal(half[key], original[key].astype(ml_dtypes.bfloat16).astype(np.float32),
                                      err_msg=key)


def training_export(folder, converted_folder: str, params, ema=None, family: str = "flux_fill") -> str:
    config = ConfigDict({"model": {"family": family, "path": converted_folder, "tiny": False}})
    write_export(str(folder), config, params, ema)
    return str(folder)


def test_export_flux_from_training_export_picks_ema(converted, tmp_path):
    from diffusers import FluxTransformer2DModel

    pipe, _, dst, _ = converted
    params = load_params(os.path.join(dst, "params"))["transformer"]
    src = training_export(tmp_path / "export", dst, params, jax.tree.map(lambda x: x * 0.5, params))
    original = numpy_state(pipe.transformer)
    for flags, scale in (([], 1.0), (["--use-ema"], 0.5)):
        out = str(tmp_path / f"diffusers{len(flags)}")
        cli(["export-flux", "--src", src, "--dst", out, *flags])
        exported = numpy_state(FluxTransformer2DModel.from_pretrained(out))
        assert exported.keys() == original.keys()
        for key in original:
            np.testing.assert_array_equal(exported[key], scale * original[key], err_msg=f"{flags} {key}")


def test_export_flux_names_missing_and_misshaped_leaves(converted, tmp_path):
    _, _, dst, _ = converted
    params = load_params(os.path.join(dst, "params"))["transformer"]
    del params["x_embedder"]["bias"]
    params["proj_out"]["kernel"] = params["proj_out"]["kernel"][:, :8]
    src = training_export(tmp_path / "export", dst, params)
    with pytest.raises(ConversionError) as err:
        cli(["export-flux", "--src", src, "--dst", str(tmp_path / "out")])
    message = str(err.value)
    assert "missing: ['x_embedder/bias']" in message and os.path.join(src, "denoiser") in message
    assert "proj_out/kernel: got (32, 8), expected (32, 64)" in message
    assert not os.path.exists(tmp_path / "out" / "diffusion_pytorch_model.safetensors")


def test_bad_src_names_the_path(converted, tmp_path):
    _, _, dst, _ = converted
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(missing)}: neither a converted Flux folder"):
        cli(["export-flux", "--src", missing, "--dst", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=f"{re.escape(missing)}: not a diffusers pipeline folder"):
        cli(["flux-fill", "--src", missing, "--dst", str(tmp_path / "out"), "--verify"])
    params = load_params(os.path.join(dst, "params"))["transformer"]
    moved = training_export(tmp_path / "moved", missing, params)
    with pytest.raises(FileNotFoundError, match=f"model.path='{re.escape(missing)}' is not a converted Flux folder"):
        cli(["export-flux", "--src", moved, "--dst", str(tmp_path / "out")])
    no_ema = training_export(tmp_path / "no_ema", dst, params)
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(no_ema, "denoiser_ema"))):
        cli(["export-flux", "--src", no_ema, "--dst", str(tmp_path / "out"), "--use-ema"])
    with pytest.raises(ValueError, match=f"{re.escape(dst)}: --use-ema needs a training export"):
        cli(["export-flux", "--src", dst, "--dst", str(tmp_path / "out"), "--use-ema"])
    sd15 = training_export(tmp_path / "sd15", dst, params, family="sd15_inpaint")
    with pytest.raises(ValueError, match="model.family='sd15_inpaint'"):
        cli(["export-flux", "--src", sd15, "--dst", str(tmp_path / "out")])
