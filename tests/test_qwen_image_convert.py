"""Qwen-Image converter CLI: the model-level --verify (passes on a faithful conversion in float32 and bfloat16, on
zero_cond_t and on the three tiny Qwen2.5-VLs in both checkpoint layouts; names a tampered transformer block,
vision block or decoder layer and fails), export-qwen-image of the converted folder back to diffusers bit for bit,
and the family loading the converted folder.

One tiny Qwen-Image-Edit pipeline folder (transformer, VAE, the Qwen2.5-VL text encoder of tests/qwen_fixtures.py
with window and full-attention vision blocks, tokenizer, processor, scheduler; the fixture ideas of
tests/test_qwen_image_family.py) is saved and converted once by the CLI with --verify, in process; the other
tests reuse the folders."""
import contextlib
import io
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jax_inpaint_rl.models.params_io import read_json
from jax_inpaint_rl.models.qwen_image import family as qwen
from tests import qwen_fixtures
from tests.sd15_fixtures import randomize_norms
from tests.test_flux_convert_cli import report
from tests.test_qwen_image_family import SCHEDULER, image_processor
from tests.test_qwen_image_transformer import numpy_state
from tests.test_qwen_vl_text import layout_b, write_folder
from tools.convert_weights import flux, qwen_image, qwen_image_vae, qwen_vl
from tools.convert_weights.__main__ import main as cli
from tools.convert_weights.flux_verify import VerificationError
from tools.convert_weights.qwen_image_verify import check_models

TOLERANCE = 1e-4
VL = "gqa"  # tests/qwen_fixtures.py: 2 decoder layers; 2 vision blocks, block 1 full attention; merge 2
TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=12,
                   num_attention_heads=2, axes_dims_rope=(2, 4, 6))  # joint_attention_dim: the VL's width
# Qwen-Image-Edit-2511's zero_cond_t, every other knob different too (a transformer alone: no VAE to fit)
ZERO_COND = dict(patch_size=1, in_channels=16, out_channels=8, num_layers=3, attention_head_dim=8,
                 num_attention_heads=3, axes_dims_rope=(2, 2, 4), joint_attention_dim=20, zero_cond_t=True)
EXPECTED_LINES = {
    ("transformer", "img_in"), ("transformer", "txt_norm + txt_in"), ("transformer", "time_text_embed"),
    ("transformer", "transformer_blocks"), ("transformer", "norm_out + proj_out"),
    ("vae", "encode mean"), ("vae", "decode"),
    ("text_encoder", "visual/patch_embed"), ("text_encoder", "visual/blocks"), ("text_encoder", "visual/merger"),
    ("text_encoder", "language_model/embed_tokens"), ("text_encoder", "language_model/layers"),
    ("text_encoder", "language_model/norm"),
}


def run_cli(*argv) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli([str(a) for a in argv])
    return printed.getvalue()


def save_transformer(folder, config: dict, seed: int = 1):
    """A random QwenImageTransformer2DModel (norms and biases perturbed) saved to `folder`; returns it."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = randomize_norms(QwenImageTransformer2DModel(**config).eval())
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch transformer, diffusers folder, converted folder, the `qwen-image-edit --verify` printout)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("qwen_convert")
    src, dst = root / "diffusers", root / "converted"
    text_encoder = qwen_fixtures.save_tiny_vl(src / "text_encoder", VL)
    qwen_fixtures.tiny_tokenizer(src / "tokenizer")
    image_processor().save_pretrained(src / "processor")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(src / "scheduler")
    transformer = save_transformer(src / "transformer", dict(
        TRANSFORMER, joint_attention_dim=text_encoder.config.text_config.hidden_size))
    torch.manual_seed(2)
    randomize_norms(AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                           temperal_downsample=[True])).save_pretrained(src / "vae")
    printed = run_cli("qwen-image-edit", "--src", src, "--dst", dst, "--verify")
    return transformer, str(src), str(dst), printed


def components(src: str, names=("transformer", "vae", "text_encoder")) -> dict[str, flux.Component]:
    makers = {"transformer": qwen_image.transformer_component, "vae": qwen_image_vae.vae_component,
              "text_encoder": qwen_vl.text_encoder_component}
    return {name: makers[name](f"{src}/{name}") for name in names}


def test_cli_verify_reports_every_piece_within_tolerance(converted):
    _, _, dst, printed = converted
    for name in ("transformer", "vae", "text_encoder"):
        assert re.search(rf"^verified {name}: \d+ tensors equal their source$", printed, re.M), printed
    lines = report(printed)
    assert set(lines) == EXPECTED_LINES, printed
    assert all(relative < TOLERANCE for _, relative in lines.values()), printed
    assert lines[("transformer", "transformer_blocks")][0].startswith("transformer_blocks (worst of 2: ")
    assert lines[("text_encoder", "visual/blocks")][0].startswith("visual/blocks (worst of 2: ")
    assert lines[("text_encoder", "language_model/layers")][0].startswith("language_model/layers (worst of 2: ")
    assert printed.rstrip().endswith(f"wrote {dst}")


def tamper(folder: str, name: str, key: str, layer: int) -> None:
    """Scale one layer of one stacked tensor of a converted file by 1.01."""
    path = flux.params_file(folder, name)
    params = load_file(path)
    params[f"{name}/{key}"][layer] *= 1.01
    save_file(params, path)


@pytest.mark.parametrize("name, tampered_layers", [
    ("transformer", {"transformer_blocks/img_mlp/net_2/kernel": ("transformer_blocks", 1)}),
    ("text_encoder", {"visual/blocks/attn/qkv/kernel": ("visual/blocks", 1),
                      "language_model/layers/mlp/down_proj/kernel": ("language_model/layers", 0)}),
])
def test_tampered_blocks_are_named_and_fail(converted, tmp_path, name, tampered_layers):
    """Each tampered layer fails alone: every piece is fed the torch reference's activations."""
    _, src, dst, _ = converted
    tampered = str(tmp_path / "tampered")
    shutil.copytree(dst, tampered)
    for key, (_, layer) in tampered_layers.items():
        tamper(tampered, name, key, layer)
    with pytest.raises(VerificationError) as err, contextlib.redirect_stdout(io.StringIO()) as printed:
        check_models(components(src, (name,)), tampered, TOLERANCE)
    expected = {f"{group}/{layer}" for group, layer in tampered_layers.values()}
    failed = re.findall(rf"{name} (\S+) \(", str(err.value))
    assert set(failed) == expected and len(failed) == len(expected) and tampered in str(err.value), str(err.value)
    lines = report(printed.getvalue())
    for group, layer in tampered_layers.values():
        label, relative = lines[(name, group)]
        assert label == f"{group} (worst of 2: {group}/{layer})" and relative > TOLERANCE


def test_bfloat16_conversion_verifies_against_a_reference_rounded_the_same_way(converted, tmp_path):
    _, src, _, _ = converted
    dst = tmp_path / "bf16"
    printed = run_cli("qwen-image-edit", "--src", src, "--dst", dst, "--dtype", "bfloat16", "--verify")
    assert "transformer, vae, text_encoder: stored as bfloat16, upcast to float32" in printed, printed
    lines = report(printed)
    assert set(lines) == EXPECTED_LINES and all(relative < TOLERANCE for _, relative in lines.values()), printed
    header, _ = flux.read_header(flux.params_file(str(dst), "transformer"))
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}


def test_zero_cond_t_transformer_verifies(tmp_path):
    """Edit-2511's zero_cond_t: the reference image's tokens modulated at timestep 0 on both sides."""
    src = tmp_path / "transformer"
    save_transformer(src, ZERO_COND, seed=3)
    component = qwen_image.transformer_component(str(src))
    flux.convert_component(component, str(tmp_path / "converted"), "transformer")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        check_models({"transformer": component}, str(tmp_path / "converted"), TOLERANCE)
    lines = report(printed.getvalue())
    assert set(lines) == {line for line in EXPECTED_LINES if line[0] == "transformer"}
    assert all(relative < TOLERANCE for _, relative in lines.values())


@pytest.mark.parametrize("vl, layout", [("mha", "model.layers"), ("mqa", "model.language_model.layers")])
def test_other_text_encoders_verify(vl, layout, tmp_path):
    """The other tiny Qwen2.5-VLs of tests/qwen_fixtures.py: 'mha' (tied embedding, one-frame patches, no
    full-attention block, 3 layers), 'mqa' (merge 3, a full-attention first block, one kv head, one layer) stored
    in transformers 4.52 - 4.57's key layout (model.language_model.*, model.visual.*)."""
    qwen_fixtures.save_tiny_vl(tmp_path / "hf", vl)
    src = str(tmp_path / "hf")
    if layout != "model.layers":
        src = write_folder(tmp_path / "b", layout_b(load_file(f"{src}/model.safetensors")),
                           read_json(f"{src}/config.json"))
    component = qwen_vl.convert_text_encoder(src, str(tmp_path / "converted"))
    assert component.layout == layout
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        check_models({"text_encoder": component}, str(tmp_path / "converted"), TOLERANCE)
    lines = report(printed.getvalue())
    assert set(lines) == {line for line in EXPECTED_LINES if line[0] == "text_encoder"}
    assert all(relative < TOLERANCE for _, relative in lines.values()), printed.getvalue()


def test_export_of_the_converted_folder_is_exact(converted, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    transformer, _, dst, _ = converted
    cli(["export-qwen-image", "--src", dst, "--dst", str(tmp_path / "exported")])
    original = numpy_state(transformer)
    exported = numpy_state(QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "exported")))
    assert exported.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


def test_the_family_loads_the_converted_folder(converted):
    transformer, _, dst, _ = converted
    family, params = qwen.load(dst, "qwen_image_edit")
    assert family.name == "qwen_image_edit" and set(params) == {"transformer", "vae", "text_encoder"}
    kernel = params["transformer"]["transformer_blocks"]["img_mlp"]["net_2"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel[1]),
                                  transformer.transformer_blocks[1].img_mlp.net[2].weight.detach().numpy().T)


def test_lm_head_is_converted_on_request(converted, tmp_path):
    """`--lm-head` writes the VLM's head (the VLM policy's logits): the family loads it with lm_head=True, and a
    plain load (the DiT's text encoder, e.g. rebuilding a VLM policy's export) leaves it out."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, src, _, _ = converted
    dst = str(tmp_path / "with_head")
    run_cli("qwen-image-edit", "--src", src, "--dst", dst, "--lm-head")
    _, params = qwen.load(dst, "qwen_image_edit", lm_head=True)
    head = params["text_encoder"]["language_model"]["lm_head"]["kernel"]
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{src}/text_encoder").lm_head.weight
    np.testing.assert_array_equal(np.asarray(head), reference.detach().numpy().T)
    _, plain = qwen.load(dst, "qwen_image_edit")
    assert "lm_head" not in plain["text_encoder"]["language_model"]
    np.testing.assert_array_equal(np.asarray(plain["text_encoder"]["language_model"]["norm"]["scale"]),
                                  np.asarray(params["text_encoder"]["language_model"]["norm"]["scale"]))
