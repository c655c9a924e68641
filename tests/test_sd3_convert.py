"""SD3 / SD3.5 from Stability's original single files, and export-sd3 back to diffusers.

Tiny random diffusers transformers in the styles of SD3 (no QK norm), SD3.5-Medium (dual attention) and SD3.5-Large
(tests/test_sd3_transformer.py's configs) are written in the original layout by this file's own inverse mapping
(`original_layout`, written from the layout, not from the converter); diffusers' `from_single_file` reading each
written file back to the same weights is the independent proof that the layout is right. The `sd3` command then
converts the file: parameters must equal those converted from the diffusers folder, outputs must match torch's,
`export-sd3` must give diffusers the same tensors bit for bit. A tiny whole pipeline in one file (MM-DiT, LDM VAE,
CLIP-L, CLIP-G, T5) converts with --components-from and --verify, equal to diffusers' own single-file loading;
every bad key is named."""
import contextlib
import dataclasses
import io
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jax_inpaint_rl.models.params_io import flatten, load_params, read_json
from jax_inpaint_rl.models.sd3 import transformer as st
from tests.sd15_fixtures import clip_tokenizer, randomize_norms, relative_error
from tests.test_flux_family import T5, t5_tokenizer
from tests.test_sd3_transformer import (CLIP_G, CLIP_L, CONFIGS, VAE, example, flax_forward, numpy_state,
                                        torch_forward, torch_transformer)
from tools.convert_weights import common, flux, sd3
from tools.convert_weights.__main__ import main as cli

NAMES = ("sd3", "sd35_medium", "sd35_large")
FLAGS = {"sd3": ["--attention-head-dim", "8"]}  # no QK norm: the head dim is not in the file (64 by default)
TOLERANCE = 1e-4
PREFIX = "model.diffusion_model."


# --- Stability's layout, written from diffusers' names (the inverse of what the converter reads) -----------------

def _cat(*parts):
    return np.concatenate(parts, axis=0)


def _swap(x):
    """diffusers' (scale, shift) halves -> Stability's (shift, scale)."""
    scale, shift = np.split(x, 2, axis=0)
    return _cat(shift, scale)


def original_layout(state: dict, num_layers: int, prefix: str = PREFIX) -> dict:
    """A diffusers SD3Transformer2DModel state dict -> the MM-DiT's keys in Stability's single files."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for end in ("weight", "bias"):
        out[f"x_embedder.proj.{end}"] = state[f"pos_embed.proj.{end}"]
        out[f"context_embedder.{end}"] = state[f"context_embedder.{end}"]
        for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
            out[f"{ours}.mlp.0.{end}"] = state[f"time_text_embed.{theirs}.linear_1.{end}"]
            out[f"{ours}.mlp.2.{end}"] = state[f"time_text_embed.{theirs}.linear_2.{end}"]
        out[f"final_layer.linear.{end}"] = state[f"proj_out.{end}"]
        out[f"final_layer.adaLN_modulation.1.{end}"] = _swap(state[f"norm_out.linear.{end}"])
        for i in range(num_layers):
            d, x, ctx, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", \
                f"joint_blocks.{i}.context_block.", i == num_layers - 1
            for attn in ("attn", "attn2"):
                if f"{d}{attn}.to_q.{end}" in state:
                    out[f"{x}{attn}.qkv.{end}"] = _cat(*(state[f"{d}{attn}.to_{p}.{end}"] for p in "qkv"))
                    out[f"{x}{attn}.proj.{end}"] = state[f"{d}{attn}.to_out.0.{end}"]
            out[f"{ctx}attn.qkv.{end}"] = _cat(*(state[f"{d}attn.add_{p}_proj.{end}"] for p in "qkv"))
            out[f"{x}adaLN_modulation.1.{end}"] = state[f"{d}norm1.linear.{end}"]
            out[f"{x}mlp.fc1.{end}"] = state[f"{d}ff.net.0.proj.{end}"]
            out[f"{x}mlp.fc2.{end}"] = state[f"{d}ff.net.2.{end}"]
            context = state[f"{d}norm1_context.linear.{end}"]
            out[f"{ctx}adaLN_modulation.1.{end}"] = _swap(context) if last else context
            if not last:
                out[f"{ctx}attn.proj.{end}"] = state[f"{d}attn.to_add_out.{end}"]
                out[f"{ctx}mlp.fc1.{end}"] = state[f"{d}ff_context.net.0.proj.{end}"]
                out[f"{ctx}mlp.fc2.{end}"] = state[f"{d}ff_context.net.2.{end}"]
    for i in range(num_layers):
        d, x, ctx = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        for p in "qk":
            for attn in ("attn", "attn2"):
                if f"{d}{attn}.norm_{p}.weight" in state:
                    out[f"{x}{attn}.ln_{p}.weight"] = state[f"{d}{attn}.norm_{p}.weight"]
            if f"{d}attn.norm_added_{p}.weight" in state:
                out[f"{ctx}attn.ln_{p}.weight"] = state[f"{d}attn.norm_added_{p}.weight"]
    return {prefix + k: v for k, v in out.items()}


def ldm_vae_layout(state: dict, up_blocks: int) -> dict:
    """A diffusers AutoencoderKL state dict -> the LDM keys of first_stage_model.* (decoder blocks numbered from
    the bottom, mid attention as 1 x 1 convolutions, nin_shortcut, norm_out)."""
    subs = [(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2"),
            (r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample"),
            (r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"up.{up_blocks - 1 - int(m[1])}.block.{m[2]}"),
            (r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{up_blocks - 1 - int(m[1])}.upsample"),
            (r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}"),
            (r"mid_block\.attentions\.0\.group_norm", "mid.attn_1.norm"),
            (r"mid_block\.attentions\.0\.to_(q|k|v)", r"mid.attn_1.\1"),
            (r"mid_block\.attentions\.0\.to_out\.0", "mid.attn_1.proj_out"),
            (r"conv_shortcut", "nin_shortcut"), (r"conv_norm_out", "norm_out")]
    out = {}
    for key, value in state.items():
        for pattern, replacement in subs:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    return out


def write_original(path, model, prefix: str = PREFIX) -> str:
    save_file(original_layout(numpy_state(model), model.config.num_layers, prefix), str(path))
    return str(path)


def run_cli(*argv) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli([str(a) for a in argv])
    return printed.getvalue()


def assert_trees_equal(got: dict, expected: dict) -> None:
    got, expected = flatten(got), flatten(expected)
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def assert_states_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# --- the transformer alone, three styles -----------------------------------------------------------------------

@pytest.fixture(scope="module", params=NAMES)
def single(request, tmp_path_factory):
    """(name, torch model, folder with diffusers/, original.safetensors and converted/ (from the file))."""
    name, folder = request.param, tmp_path_factory.mktemp(f"sd3_single_{request.param}")
    model = torch_transformer(CONFIGS[name][0])
    model.save_pretrained(folder / "diffusers")
    run_cli("sd3", "--src", write_original(folder / "original.safetensors", model), "--dst", folder / "converted",
            *FLAGS.get(name, []))
    return name, model, folder


def test_written_file_is_what_diffusers_reads_as_stabilitys_layout(single):
    """The test's own writer, checked by diffusers' single-file loader (offline, its config from our folder)."""
    from diffusers import SD3Transformer2DModel

    _, model, folder = single
    loaded = SD3Transformer2DModel.from_single_file(str(folder / "original.safetensors"),
                                                    config=str(folder / "diffusers"), local_files_only=True)
    assert_states_equal(numpy_state(loaded), numpy_state(model))


def test_params_and_inferred_config_equal_the_folder_conversion(single, tmp_path):
    _, model, folder = single
    sd3.convert_transformer(sd3.transformer_component(str(folder / "diffusers")), str(tmp_path))
    assert_trees_equal(load_params(folder / "converted" / "params"), load_params(tmp_path / "params"))
    inferred = st.SD3Config.from_diffusers(read_json(folder / "converted" / "transformer" / "config.json"))
    source = st.SD3Config.from_diffusers(model.config)
    assert inferred == dataclasses.replace(source, out_channels=source.output_channels)  # None: as many as in
    assert os.listdir(folder / "converted" / "params") == ["transformer.safetensors"]
    assert not os.path.exists(folder / "converted" / "sd3.json")  # the transformer only: not a loadable family


def test_parity_with_torch(single):
    name, model, folder = single
    params = load_params(folder / "converted" / "params")["transformer"]
    config = st.SD3Config.from_diffusers(read_json(folder / "converted" / "transformer" / "config.json"))
    inputs = example(name)
    ref = torch_forward(model, inputs)
    got = flax_forward(config, params, inputs)
    assert relative_error(got, ref) <= TOLERANCE, name
    assert relative_error(got[1], ref[1]) <= TOLERANCE, name


def test_export_round_trip_is_bit_exact(single, tmp_path):
    """original file -> ours -> diffusers: every tensor (the position table too) equals the torch model's."""
    from diffusers import SD3Transformer2DModel

    _, model, folder = single
    run_cli("export-sd3", "--src", folder / "converted", "--dst", tmp_path / "diffusers")
    assert sorted(os.listdir(tmp_path / "diffusers")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    exported = SD3Transformer2DModel.from_pretrained(str(tmp_path / "diffusers"))
    assert_states_equal(numpy_state(exported), numpy_state(model))


# --- export-sd3: dtype, training exports, bad sources ------------------------------------------------------------

@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """(torch SD3.5-Medium-style model, folder converted from its diffusers folder)."""
    folder = tmp_path_factory.mktemp("sd3_export")
    model = torch_transformer(CONFIGS["sd35_medium"][0])
    model.save_pretrained(folder / "diffusers")
    sd3.convert_transformer(sd3.transformer_component(str(folder / "diffusers")), str(folder / "converted"))
    return model, str(folder / "converted")


def training_export(folder, converted: str, params, ema=None, family: str = "sd3") -> str:
    from ml_collections import ConfigDict

    from jax_inpaint_rl.checkpoint.export import write_export

    write_export(str(folder), ConfigDict({"model": {"family": family, "path": converted, "tiny": False}}), params, ema)
    return str(folder)


def test_export_bfloat16_and_training_export_with_ema(medium, tmp_path):
    from diffusers import SD3Transformer2DModel

    model, converted = medium
    original = numpy_state(model)
    run_cli("export-sd3", "--src", converted, "--dst", tmp_path / "bf16", "--dtype", "bfloat16")
    header, _ = flux.read_header(str(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors"))
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    half = numpy_state(SD3Transformer2DModel.from_pretrained(str(tmp_path / "bf16")))  # loaded as float32
    assert_states_equal(half, {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in original.items()})

    params = load_params(os.path.join(converted, "params"))["transformer"]
    src = training_export(tmp_path / "export", converted, params, jax.tree.map(lambda x: x * 0.5, params),
                          family="sd3_inpaint")
    for flags, scale in (([], 1.0), (["--use-ema"], 0.5)):
        out = tmp_path / f"diffusers{len(flags)}"
        run_cli("export-sd3", "--src", src, "--dst", out, *flags)
        exported = numpy_state(SD3Transformer2DModel.from_pretrained(str(out)))
        table = exported.pop("pos_embed.pos_embed")  # a buffer rebuilt from the config, not a trained parameter
        np.testing.assert_array_equal(table, original["pos_embed.pos_embed"])
        assert_states_equal(exported, {k: scale * v for k, v in original.items() if k != "pos_embed.pos_embed"})


def test_export_names_bad_leaves_and_sources(medium, tmp_path):
    _, converted = medium
    params = load_params(os.path.join(converted, "params"))["transformer"]
    del params["blocks_2_to_2"]["attn"]["norm_added_k"]
    params["blocks_0_to_1"]["attn2"]["to_q"]["kernel"] = params["blocks_0_to_1"]["attn2"]["to_q"]["kernel"][:, :, :8]
    src = training_export(tmp_path / "bad", converted, params)
    with pytest.raises(common.ConversionError) as err:
        run_cli("export-sd3", "--src", src, "--dst", tmp_path / "out")
    message = str(err.value)
    assert "missing: ['blocks_2_to_2/attn/norm_added_k/scale']" in message and os.path.join(src, "denoiser") in message
    assert "blocks_0_to_1/attn2/to_q/kernel: got (2, 24, 8), expected (2, 24, 24)" in message
    assert not os.path.exists(tmp_path / "out" / "diffusion_pytorch_model.safetensors")

    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(missing)}: neither a converted SD3 folder"):
        run_cli("export-sd3", "--src", missing, "--dst", tmp_path / "out")
    flux_run = training_export(tmp_path / "flux", converted, params, family="flux_fill")
    with pytest.raises(ValueError, match=r"model.family='flux_fill'; export-sd3 needs one of \('sd3', 'sd3_inpaint'\)"):
        run_cli("export-sd3", "--src", flux_run, "--dst", tmp_path / "out")
    with pytest.raises(ValueError, match=f"{re.escape(converted)}: --use-ema needs a training export"):
        run_cli("export-sd3", "--src", converted, "--dst", tmp_path / "out", "--use-ema")


# --- bad single files ------------------------------------------------------------------------------------------

def test_bad_single_files_are_named(medium, tmp_path):
    model, _ = medium
    good = original_layout(numpy_state(model), model.config.num_layers)

    def convert(state, *flags):
        path = tmp_path / f"case{len(os.listdir(tmp_path))}.safetensors"
        save_file(state, str(path))
        with pytest.raises((common.ConversionError, ValueError)) as err:
            run_cli("sd3", "--src", path, "--dst", tmp_path / "out", *flags)
        assert not os.path.exists(tmp_path / "out" / "params" / "transformer.safetensors"), "partial output left"
        return str(path), str(err.value)

    bad = dict(good)
    del bad[PREFIX + "joint_blocks.3.context_block.attn.ln_k.weight"]
    bad[PREFIX + "joint_blocks.1.x_block.attn.lora_A.weight"] = np.zeros((2, 2), np.float32)
    bad[PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight"] = bad[PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight"][:, :8]
    path, message = convert(bad)
    assert f"{path} ({PREFIX} MM-DiT; inferred num_layers 4, 3 heads x 8, dual attention [0, 1], qk_norm rms_norm)" \
        in message
    assert f"unknown keys (no rule maps them): 1\n    {PREFIX}joint_blocks.1.x_block.attn.lora_A.weight" in message
    assert f"missing keys (the model needs them): 1\n    {PREFIX}joint_blocks.3.context_block.attn.ln_k.weight" \
        in message
    assert f"{PREFIX}joint_blocks.0.x_block.attn2.qkv.weight: got (72, 8), expected (72, 24)" in message

    path, message = convert({**good, "cond_stage_model.transformer.foo": np.zeros(2, np.float32)})
    assert "keys outside the sections of an SD3 single file" in message and "cond_stage_model.transformer.foo" in message
    path, message = convert({k: v for k, v in good.items() if k != PREFIX + "final_layer.linear.weight"})
    assert f"cannot infer the SD3 transformer's config: missing ['{PREFIX}final_layer.linear.weight']" in message
    _, message = convert(good, "--attention-head-dim", "4")
    assert f"attention_head_dim 4 given, but {PREFIX}joint_blocks.0.context_block.attn.ln_k.weight" in message
    path, message = convert({**good, PREFIX + "pos_embed": np.zeros_like(good[PREFIX + "pos_embed"])})
    assert f"{path}: {PREFIX}pos_embed differs from the sin-cos table built from the config" in message
    _, message = convert({k.removeprefix(PREFIX): v for k, v in good.items() if k.startswith(PREFIX + "joint")})
    assert "cannot infer the SD3 transformer's config: missing ['pos_embed'" in message  # a bare file, incomplete

    no_qk_norm = torch_transformer(CONFIGS["sd3"][0])
    _, message = convert(original_layout(numpy_state(no_qk_norm), no_qk_norm.config.num_layers))
    assert "width 16 (model.diffusion_model.x_embedder.proj.weight) is not a multiple of the attention head dim 64 " \
           "(not stored without QK norm" in message
    vae_only = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": np.zeros((2, 3, 3, 3), np.float32)}, str(vae_only))
    with pytest.raises(common.ConversionError, match=f"{re.escape(str(vae_only))}: no MM-DiT"):
        run_cli("sd3", "--src", vae_only, "--dst", tmp_path / "out")


# --- a whole pipeline in one file ------------------------------------------------------------------------------

# CLIP-G wider than CLIP-L (diffusers' single-file loader tells the two apart by width) and a T5 as wide as both
PIPE_CLIP_G = dict(CLIP_G, hidden_size=24)
PIPE_T5 = dict(T5, d_model=48)
PIPE_TRANSFORMER = dict(CONFIGS["sd35_medium"][0], in_channels=16, out_channels=16, joint_attention_dim=48,
                        pooled_projection_dim=CLIP_L["projection_dim"] + PIPE_CLIP_G["projection_dim"])
SECTIONS = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer."}


def torch_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    models = dict(transformer=torch_transformer(PIPE_TRANSFORMER), vae=AutoencoderKL(**VAE),
                  text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                  text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**PIPE_CLIP_G)),
                  text_encoder_3=T5EncoderModel(T5Config(**PIPE_T5)))
    models = {k: randomize_norms(m.eval()) for k, m in models.items()}
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tokenizer(),
                                    tokenizer_2=clip_tokenizer(), tokenizer_3=t5_tokenizer(), **models)


def single_file_state(pipe, components=("vae", "text_encoder", "text_encoder_2", "text_encoder_3")) -> dict:
    """The pipeline as one file: the MM-DiT, and the `components` in their sections (CLIP-L keeps its own
    text_projection, which SD3 does not use)."""
    state = original_layout(numpy_state(pipe.transformer), pipe.transformer.config.num_layers)
    if "vae" in components:
        state.update(ldm_vae_layout(numpy_state(pipe.vae), len(pipe.vae.config.up_block_types)))
    for name in set(components) & set(SECTIONS):
        state.update({SECTIONS[name] + k: v for k, v in numpy_state(getattr(pipe, name)).items()})
    return state


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(torch pipeline, root with diffusers/ and full.safetensors, converted/ with --verify, its printout)."""
    root = tmp_path_factory.mktemp("sd3_single_pipeline")
    pipe = torch_pipeline()
    pipe.save_pretrained(str(root / "diffusers"))
    save_file(single_file_state(pipe), str(root / "full.safetensors"))
    printed = run_cli("sd3", "--src", root / "full.safetensors", "--dst", root / "converted", "--components-from",
                      root / "diffusers", "--verify")
    return pipe, root, printed


def report(output: str) -> dict[tuple[str, str], float]:
    lines = re.findall(r"^(\S+)\s+(.+?)\s+max\|diff\| (\S+)\s+relative (\S+)$", output, re.M)
    return {(component, label.split(" (worst")[0]): float(rel) for component, label, _, rel in lines}


def test_single_file_pipeline_converts_and_verifies_every_component(pipeline):
    _, root, printed = pipeline
    file, diffusers = root / "full.safetensors", root / "diffusers"
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert f"{name:15s} from {file} (" in printed and f"config from {diffusers / name}" in printed, printed
        assert re.search(rf"^verified {name}: \d+ tensors equal their source$", printed, re.M), printed
    assert "verified transformer: 158 tensors equal their source" in printed  # all but the position table
    assert (f"text_projection: identity (SD3 uses CLIP-L's unprojected pooled output); the file's "
            f"{SECTIONS['text_encoder']}text_projection.weight is not used") in printed
    lines = report(printed)
    assert {component for component, _ in lines} == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert len(lines) == 13 and all(relative < TOLERANCE for relative in lines.values()), printed
    marker = read_json(root / "converted" / "sd3.json")
    assert marker["source"] == str(file) and marker["components_from"] == str(diffusers)
    assert {"tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"} <= set(os.listdir(root / "converted"))


def test_single_file_pipeline_equals_diffusers_single_file_loading(pipeline, tmp_path):
    """Every component equals what diffusers' own single-file loader builds from the same file, converted from
    its diffusers folder: the LDM VAE keys, the CLIP sections, the identity CLIP-L projection, the T5; and the
    folder loads as the sd3 family."""
    from diffusers import StableDiffusion3Pipeline

    from jax_inpaint_rl.models.sd3 import family

    _, root, _ = pipeline
    reference = StableDiffusion3Pipeline.from_single_file(str(root / "full.safetensors"), config=str(root / "diffusers"),
                                                          local_files_only=True)
    reference.save_pretrained(str(tmp_path / "reference"))
    sd3.convert_pipeline(str(tmp_path / "reference"), str(tmp_path / "out"))
    ours = load_params(root / "converted" / "params")
    assert_trees_equal(ours, load_params(tmp_path / "out" / "params"))
    np.testing.assert_array_equal(ours["text_encoder"]["text_projection"]["kernel"], np.eye(CLIP_L["hidden_size"]))
    _, params = family.load(str(root / "converted"))
    assert sorted(params) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]


def test_transformer_from_a_bare_file_and_the_rest_from_the_folder(pipeline, tmp_path):
    """A file holding only the MM-DiT, without the model.diffusion_model. prefix: the other components, the
    tokenizers and the scheduler come from --components-from."""
    pipe, root, _ = pipeline
    bare = tmp_path / "bare.safetensors"
    save_file(original_layout(numpy_state(pipe.transformer), pipe.transformer.config.num_layers, prefix=""), str(bare))
    printed = run_cli("sd3", "--src", bare, "--dst", tmp_path / "out", "--components-from", root / "diffusers")
    assert f"transformer     from {bare} (bare keys*)" in printed
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert f"{name:15s} from {root / 'diffusers' / name}\n" in printed, printed
    sd3.convert_pipeline(str(root / "diffusers"), str(tmp_path / "folder"))
    assert_trees_equal(load_params(tmp_path / "out" / "params"), load_params(tmp_path / "folder" / "params"))


def test_without_components_from_only_the_transformer_is_converted(pipeline, tmp_path):
    _, root, _ = pipeline
    printed = run_cli("sd3", "--src", root / "full.safetensors", "--dst", tmp_path / "out")
    assert (f"not converted: {root / 'full.safetensors'} also holds vae (first_stage_model.*), text_encoder "
            "(text_encoders.clip_l.transformer.*)") in printed and "pass --components-from DIR" in printed
    assert os.listdir(tmp_path / "out" / "params") == ["transformer.safetensors"]
    assert not os.path.exists(tmp_path / "out" / "sd3.json")
    assert_trees_equal(load_params(tmp_path / "out" / "params")["transformer"],
                       load_params(root / "converted" / "params")["transformer"])
    with pytest.raises(ValueError, match="--components-from only apply to a single-file --src"):
        run_cli("sd3", "--src", root / "diffusers", "--dst", tmp_path / "x", "--components-from", root / "diffusers")


def test_fp8_t5_in_the_file_and_its_missing_config(pipeline, tmp_path):
    """sd3_medium_incl_clips_t5xxlfp8-style: the T5 stored as float8_e4m3fn, read and widened; a T5 in the file
    needs text_encoder_3/config.json in --components-from, and its absence is named."""
    from safetensors.torch import save_file as save_torch

    pipe, root, _ = pipeline
    state = {k: torch.from_numpy(v) for k, v in single_file_state(pipe, ()).items()}
    t5 = {SECTIONS["text_encoder_3"] + k: v.to(torch.float8_e4m3fn) for k, v in pipe.text_encoder_3.state_dict().items()}
    save_torch({**state, **t5}, str(tmp_path / "fp8.safetensors"))
    run_cli("sd3", "--src", tmp_path / "fp8.safetensors", "--dst", tmp_path / "out", "--components-from",
            root / "diffusers")
    got = load_params(tmp_path / "out" / "params")["text_encoder_3"]
    shared = t5[SECTIONS["text_encoder_3"] + "shared.weight"].float().numpy()
    np.testing.assert_array_equal(got["embed_tokens"]["embedding"], shared)
    assert got["embed_tokens"]["embedding"].dtype == np.float32 and not np.array_equal(
        shared, pipe.text_encoder_3.shared.weight.detach().numpy())  # really rounded to fp8

    no_t5 = tmp_path / "no_t5_config"
    shutil.copytree(root / "diffusers", no_t5, ignore=shutil.ignore_patterns("text_encoder_3"))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(no_t5 / 'text_encoder_3' / 'config.json'))}: not "
                                                r"found; .* holds the text_encoder_3 \(text_encoders.t5xxl.transformer"):
        run_cli("sd3", "--src", tmp_path / "fp8.safetensors", "--dst", tmp_path / "out2", "--components-from", no_t5)
    (no_t5 / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        run_cli("sd3", "--src", tmp_path / "fp8.safetensors", "--dst", tmp_path / "out2", "--components-from", no_t5)



# --- full size, without the weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ("sd3_medium", "sd35_medium", "sd35_large"))
def test_full_size_layout_and_table_scale(name, tmp_path):
    """The original layout's key table at the releases' sizes holds diffusers' parameter count (the table aside),
    and the sample_size is read back from the first grid row of a bfloat16 table at the releases' widths."""
    from tests.test_sd3_transformer import FULL, REAL
    from tools.convert_weights import sd3_single

    config, count = st.SD3Config.from_diffusers(dict(FULL, **REAL[name][0])), REAL[name][1]
    shapes = sd3_single.original_shapes(config)
    assert sum(int(np.prod(shape)) for key, shape in shapes.items() if key != "pos_embed") == count
    along = st.axis_embedding(config)
    first_row = np.concatenate([along, np.broadcast_to(along[0], along.shape)], axis=-1)  # grid row 0
    save_file({"pos_embed": first_row[None].astype(ml_dtypes.bfloat16)}, str(tmp_path / "row.safetensors"))
    inferred = dict(patch_size=2, pos_embed_max_size=config.pos_embed_max_size, attention_head_dim=64,
                    num_attention_heads=config.num_attention_heads)
    assert sd3_single.infer_sample_size(str(tmp_path / "row.safetensors"), "pos_embed", inferred) == 128
