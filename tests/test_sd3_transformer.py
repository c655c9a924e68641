"""SD3 / SD3.5 transformer: parity with diffusers' SD3Transformer2DModel on tiny configs in the styles of SD3,
SD3.5-Medium and SD3.5-Large (plus one mixing the knobs), non-square latents cropped from a larger position
table; the converter (blocks stacked per run, the position-table check, bf16, every bad key named); the `sd3`
command on a tiny pipeline with --verify (and without the T5); the full-size parameter counts."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jax_inpaint_rl.models.layers import vae as vae_lib
from jax_inpaint_rl.models.params_io import load_params, read_json
from jax_inpaint_rl.models.sd3 import transformer as st
from tests.sd15_fixtures import clip_tokenizer, randomize_norms, relative_error
from tests.test_flux_family import T5, t5_tokenizer
from tools.convert_weights import common, flux, sd3, sd3_verify
from tools.convert_weights.flux_verify import VerificationError

CONFIGS = {  # name -> (diffusers config, latent (h, w): non-square, smaller than patch_size x pos_embed_max_size)
    "sd3": (dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
                 pos_embed_max_size=8), (6, 10)),
    "sd35_medium": (dict(sample_size=12, patch_size=2, in_channels=8, out_channels=8, num_layers=4,
                         attention_head_dim=8, num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
                         pooled_projection_dim=14, pos_embed_max_size=10, dual_attention_layers=(0, 1),
                         qk_norm="rms_norm"), (8, 14)),
    "sd35_large": (dict(sample_size=16, patch_size=2, in_channels=6, out_channels=None, num_layers=2,
                        attention_head_dim=4, num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=16,
                        pooled_projection_dim=12, pos_embed_max_size=9, qk_norm="rms_norm"), (10, 4)),
    # dual attention on non-adjacent blocks and on the last one, without QK norm; 1 x 1 patches
    "mixed": (dict(sample_size=6, patch_size=1, in_channels=3, out_channels=5, num_layers=4, attention_head_dim=4,
                   num_attention_heads=2, joint_attention_dim=6, caption_projection_dim=8, pooled_projection_dim=4,
                   pos_embed_max_size=7, dual_attention_layers=(0, 2, 3)), (5, 3)),
}
RUNS = {  # name -> the scanned stacks: (first, last, dual attention, context pre-only)
    "sd3": [(0, 1, False, False), (2, 2, False, True)],
    "sd35_medium": [(0, 1, True, False), (2, 2, False, False), (3, 3, False, True)],
    "sd35_large": [(0, 0, False, False), (1, 1, False, True)],
    "mixed": [(0, 0, True, False), (1, 1, False, False), (2, 2, True, False), (3, 3, True, True)],
}
TEXT_LEN, TIMESTEPS = 5, np.array([930.0, 250.0], np.float32)  # batch 2, a timestep each (pipeline scale)
TOLERANCE = 1e-4


def torch_transformer(config: dict, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return randomize_norms(SD3Transformer2DModel(**config).eval())


def example(name: str, seed: int = 1) -> dict:
    config, (height, width) = CONFIGS[name]
    rng = np.random.default_rng(seed)
    return dict(latents=rng.standard_normal((2, height, width, config["in_channels"]), np.float32),
                timestep=TIMESTEPS,
                text=rng.standard_normal((2, TEXT_LEN, config["joint_attention_dim"]), np.float32),
                pooled=rng.standard_normal((2, config["pooled_projection_dim"]), np.float32))


def torch_forward(model, inputs) -> np.ndarray:
    """diffusers' output, channels-last."""
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(inputs["latents"].transpose(0, 3, 1, 2).copy()),
                    encoder_hidden_states=torch.from_numpy(inputs["text"]),
                    pooled_projections=torch.from_numpy(inputs["pooled"]),
                    timestep=torch.from_numpy(inputs["timestep"])).sample
    return out.numpy().transpose(0, 2, 3, 1)


def flax_forward(config: st.SD3Config, params, inputs, dtype=jnp.float32, remat: bool = False) -> np.ndarray:
    """One compile per call, XLA's backend optimisation off (these tests are compile-bound on CPU)."""
    apply = jax.jit(st.SD3Transformer(config, dtype, remat).apply)
    args = ({"params": params}, *(jnp.asarray(inputs[k]) for k in ("latents", "timestep", "text", "pooled")))
    compiled = apply.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(compiled(*args), np.float32)


def build_converted(name: str, folder):
    """(name, torch model, converted Flax params, folder with diffusers/ and out/)."""
    model = torch_transformer(CONFIGS[name][0])
    model.save_pretrained(folder / "diffusers")
    sd3.convert_transformer(sd3.transformer_component(str(folder / "diffusers")), str(folder / "out"))
    return name, model, load_params(folder / "out" / "params")["transformer"], folder


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    return build_converted(request.param, tmp_path_factory.mktemp(f"sd3_{request.param}"))


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    return build_converted("sd35_medium", tmp_path_factory.mktemp("sd3_medium_only"))


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_parity_with_diffusers(converted):
    name, model, params, _ = converted
    inputs = example(name)
    ref = torch_forward(model, inputs)
    got = flax_forward(st.SD3Config.from_diffusers(model.config), params, inputs)
    assert got.shape == ref.shape == inputs["latents"].shape[:3] + (model.out_channels,)
    assert relative_error(got, ref) <= TOLERANCE, name
    assert relative_error(got[1], ref[1]) <= TOLERANCE, name  # the second sample (its own timestep) too


def test_blocks_are_stacked_per_run_of_equal_blocks(converted):
    name, model, params, _ = converted
    runs = st.block_runs(st.SD3Config.from_diffusers(model.config))
    assert [(r.first, r.last, r.dual_attention, r.context_pre_only) for r in runs] == RUNS[name]
    stacks = sorted(k for k in params if k.startswith("blocks_"))
    assert stacks == sorted(r.name for r in runs)
    for run in runs:
        stack = params[run.name]
        assert ("attn2" in stack) == run.dual_attention and ("ff_context" in stack) != run.context_pre_only
        assert ("to_add_out" in stack["attn"]) != run.context_pre_only
        torch_q = model.transformer_blocks[run.last].attn.to_q.weight.detach().numpy()
        np.testing.assert_array_equal(stack["attn"]["to_q"]["kernel"][run.length - 1], torch_q.T)


def test_position_table_is_diffusers_buffer_and_crop(converted):
    name, model, _, _ = converted
    config = st.SD3Config.from_diffusers(model.config)
    size, (height, width) = config.pos_embed_max_size, CONFIGS[name][1]
    np.testing.assert_allclose(st.position_embedding(config, size, size), model.pos_embed.pos_embed[0].numpy(),
                               rtol=0, atol=1e-6)
    crop = model.pos_embed.cropped_pos_embed(height, width)[0].numpy()
    p = config.patch_size
    np.testing.assert_allclose(st.position_embedding(config, height // p, width // p), crop, rtol=0, atol=1e-6)


def test_remat_and_bf16_compute(medium):
    name, model, params, _ = medium
    inputs, config = example(name), st.SD3Config.from_diffusers(model.config)
    ref = torch_forward(model, inputs)
    assert relative_error(flax_forward(config, params, inputs, jnp.bfloat16), ref) < 5e-2
    assert relative_error(flax_forward(config, params, inputs, remat=True), ref) <= TOLERANCE
    arrays = [jnp.asarray(inputs[k]) for k in ("latents", "timestep", "text", "pooled")]
    loss = lambda p: jnp.sum(st.SD3Transformer(config, remat=True).apply({"params": p}, *arrays))  # noqa: E731
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(params)), "remat=True did not rematerialise"


def test_bfloat16_output_and_tensor_check(medium, tmp_path):
    _, model, params, folder = medium
    component = sd3.transformer_component(str(folder / "diffusers"))
    sd3.convert_transformer(component, str(tmp_path), dtype="bfloat16")
    half = load_params(tmp_path / "params")["transformer"]
    kernel = half["blocks_0_to_1"]["attn2"]["to_q"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel, params["blocks_0_to_1"]["attn2"]["to_q"]["kernel"].astype(jnp.bfloat16))
    assert sd3.verify_transformer(component, str(tmp_path)) == len(model.state_dict()) - 1  # all but the table


def write_checkpoint(folder, state: dict, config: dict) -> str:
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_conversion_errors_list_every_bad_key(medium, tmp_path):
    _, model, _, _ = medium
    state = numpy_state(model)
    del state["transformer_blocks.2.attn.norm_added_k.weight"]
    state["transformer_blocks.0.attn2.to_q.weight"] = state["transformer_blocks.0.attn2.to_q.weight"][:, :8]
    state["transformer_blocks.1.attn.lora_A.weight"] = np.zeros((2, 2), np.float32)
    src = write_checkpoint(tmp_path / "bad", state, dict(model.config))
    with pytest.raises(common.ConversionError) as err:
        sd3.convert_transformer(sd3.transformer_component(src), str(tmp_path / "out"))
    message = str(err.value)
    assert src in message and "transformer_blocks.1.attn.lora_A.weight" in message
    assert "missing keys (the model needs them): 1\n    transformer_blocks/2/attn/norm_added_k/scale" in message
    assert "transformer_blocks.0.attn2.to_q.weight -> transformer_blocks/0/attn2/to_q/kernel: got (8, 24)" in message
    assert not os.path.exists(tmp_path / "out" / "params" / "transformer.safetensors"), "partial output left behind"

    # SD3.5-Medium weights under a config without its dual attention: every attn2 tensor is named
    no_dual = write_checkpoint(tmp_path / "no_dual", numpy_state(model), dict(model.config, dual_attention_layers=[]))
    with pytest.raises(common.ConversionError) as err:
        sd3.convert_transformer(sd3.transformer_component(no_dual), str(tmp_path / "out"))
    assert ("transformer_blocks.1.attn2.to_out.0.weight -> transformer_blocks/1/attn2/to_out/kernel (not a parameter "
            "of the model)") in str(err.value)
    assert "transformer_blocks.0.norm1.linear.weight -> transformer_blocks/0/norm1/linear/kernel: got (24, 216), " \
           "expected (24, 144)" in str(err.value)


def test_position_table_is_checked(medium, tmp_path):
    name, model, _, _ = medium
    state = numpy_state(model)
    other = torch_transformer(dict(CONFIGS[name][0], sample_size=16))  # another scale of the same table
    src = write_checkpoint(tmp_path / "other", dict(state, **{"pos_embed.pos_embed": numpy_state(other)[
        "pos_embed.pos_embed"]}), dict(model.config))
    with pytest.raises(common.ConversionError, match=r"other/diffusion_pytorch_model.safetensors: "
                                                     r"pos_embed.pos_embed differs from the sin-cos table"):
        sd3.convert_transformer(sd3.transformer_component(src), str(tmp_path / "out"))
    del state["pos_embed.pos_embed"]
    src = write_checkpoint(tmp_path / "none", state, dict(model.config))
    with pytest.raises(common.ConversionError, match="none: pos_embed.pos_embed missing"):
        sd3.convert_transformer(sd3.transformer_component(src), str(tmp_path / "out"))


def test_bad_inputs_and_configs_are_named():
    config = st.SD3Config.from_diffusers(CONFIGS["sd3"][0])
    init = lambda **inputs: jax.eval_shape(lambda: st.SD3Transformer(config).init(jax.random.key(0), **inputs))  # noqa
    inputs = st.example_inputs(config, batch=2)
    with pytest.raises(ValueError, match=r"latents \(2, 4, 4, 8\): expected \(B, h, w, 4\)"):
        init(**dict(inputs, latents=jnp.zeros((2, 4, 4, 8))))
    with pytest.raises(ValueError, match=r"latents \(2, 5, 4, 4\): h and w must be multiples of patch_size 2"):
        init(**dict(inputs, latents=jnp.zeros((2, 5, 4, 4))))
    with pytest.raises(ValueError, match=r"latents \(2, 4, 18, 4\): h and w at most .* = 16"):
        init(**dict(inputs, latents=jnp.zeros((2, 4, 18, 4))))
    with pytest.raises(ValueError, match=r"timestep \(1,\): expected \(2,\)"):
        init(**dict(inputs, timestep=jnp.zeros((1,))))
    with pytest.raises(ValueError, match="unknown SD3 transformer config keys.*'guidance_embeds'"):
        st.SD3Config.from_diffusers(dict(CONFIGS["sd3"][0], guidance_embeds=True))
    with pytest.raises(ValueError, match=r"qk_norm='layer_norm', supported: \[None, 'rms_norm'\]"):
        st.SD3Config.from_diffusers(dict(CONFIGS["sd3"][0], qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="caption_projection_dim 12 must equal .* = 16"):
        st.SD3Config.from_diffusers(dict(CONFIGS["sd3"][0], caption_projection_dim=12))
    with pytest.raises(ValueError, match=r"dual_attention_layers \[3\] outside 0..2"):
        st.SD3Config.from_diffusers(dict(CONFIGS["sd3"][0], dual_attention_layers=[0, 3]))


# --- the `sd3` command on a whole (tiny) pipeline ------------------------------------------------------

VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=58, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=16, projection_dim=16, hidden_act="quick_gelu", eos_token_id=2)
CLIP_G = dict(CLIP_L, intermediate_size=40, num_attention_heads=4, projection_dim=24, hidden_act="gelu")
# as in the real pipelines: the CLIPs' hidden states side by side fill the T5 width, the projections the pooled one
PIPE_TRANSFORMER = dict(CONFIGS["sd35_medium"][0], in_channels=16, out_channels=16, joint_attention_dim=T5["d_model"],
                        pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"])
REPORT_GROUPS = {
    ("transformer", "pos_embed"), ("transformer", "context_embedder"), ("transformer", "time_text_embed"),
    ("transformer", "transformer_blocks"), ("transformer", "norm_out + proj_out"),
    ("vae", "encode mean"), ("vae", "decode"),
    *((clip, group) for clip in ("text_encoder", "text_encoder_2")
      for group in ("hidden states", "penultimate hidden states", "text_embeds")),
}


def torch_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    models = dict(transformer=torch_transformer(PIPE_TRANSFORMER),
                  vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                  text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
                  text_encoder_3=T5EncoderModel(T5Config(**T5)))
    models = {k: randomize_norms(m.eval()) for k, m in models.items()}
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tokenizer(),
                                    tokenizer_2=clip_tokenizer(), tokenizer_3=t5_tokenizer(), **models)


def report(output: str) -> dict[tuple[str, str], tuple[str, float]]:
    """(component, group) -> (the group's label, relative error) from the model check's printout."""
    import re

    lines = re.findall(r"^(\S+)\s+(.+?)\s+max\|diff\| (\S+)\s+relative (\S+)$", output, re.M)
    return {(component, label.split(" (worst")[0]): (label, float(rel)) for component, label, _, rel in lines}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(diffusers folder, converted folder, the command's printout)."""
    import contextlib
    import io

    from tools.convert_weights.__main__ import main as cli

    root = tmp_path_factory.mktemp("sd3_pipeline")
    src, dst = str(root / "diffusers"), str(root / "converted")
    torch_pipeline().save_pretrained(src)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli(["sd3", "--src", src, "--dst", dst, "--verify"])
    return src, dst, printed.getvalue()


def test_cli_converts_and_verifies_every_component(pipeline):
    src, dst, printed = pipeline
    components = sd3.pipeline_components(src)
    assert sorted(components) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]
    for name, component in components.items():  # every stored tensor but the position table (checked, not kept)
        expected = sum(len(flux.read_header(path)[0]) for path in component.files) - (name == "transformer")
        assert f"verified {name}: {expected} tensors equal their source" in printed, printed
    lines = report(printed)
    assert set(lines) == REPORT_GROUPS, printed
    assert all(relative < TOLERANCE for _, relative in lines.values()), printed
    assert lines[("transformer", "transformer_blocks")][0].startswith("transformer_blocks (worst of 4: ")
    assert "text_encoder_3  tensor check only" in printed
    vae = vae_lib.VAEConfig.from_diffusers(read_json(os.path.join(dst, "vae", "config.json")))
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert read_json(os.path.join(dst, "sd3.json"))["family"] == "sd3"
    assert {"tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"} <= set(os.listdir(dst))
    params = load_params(os.path.join(dst, "params"))
    assert sorted(params) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]
    assert params["text_encoder_2"]["text_projection"]["kernel"].shape == (16, 24)


def test_tampered_block_is_named_and_fails(pipeline, tmp_path, capsys):
    src, dst, _ = pipeline
    tampered = str(tmp_path / "tampered")
    shutil.copytree(dst, tampered)
    path = flux.params_file(tampered, "transformer")
    params = load_file(path)
    params["transformer/blocks_0_to_1/attn2/to_v/kernel"][1] *= 1.01  # 1% on block 1's second attention
    save_file(params, path)
    with pytest.raises(VerificationError) as err:
        sd3_verify.check_models({"transformer": sd3.pipeline_components(src)["transformer"]}, tampered, TOLERANCE)
    assert "transformer transformer_blocks/1 (" in str(err.value) and tampered in str(err.value)
    assert "transformer_blocks/0 " not in str(err.value) and "transformer_blocks/2" not in str(err.value)
    label, relative = report(capsys.readouterr().out)[("transformer", "transformer_blocks")]
    assert label == "transformer_blocks (worst of 4: transformer_blocks/1)" and relative > 10 * TOLERANCE


def test_pipeline_without_t5(pipeline, tmp_path):
    src, _, _ = pipeline
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(src, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = read_json(no_t5 / "model_index.json")
    (no_t5 / "model_index.json").write_text(json.dumps(dict(index, text_encoder_3=[None, None],
                                                            tokenizer_3=[None, None])))
    sd3.convert_pipeline(str(no_t5), str(tmp_path / "out"))
    assert sorted(load_params(tmp_path / "out" / "params")) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert "tokenizer_3" not in os.listdir(tmp_path / "out")
    (no_t5 / "model_index.json").write_text(json.dumps(index))  # the T5 listed, but its folder gone
    with pytest.raises(FileNotFoundError, match="no_t5/text_encoder_3"):
        sd3.convert_pipeline(str(no_t5), str(tmp_path / "out2"))


# --- full size ---------------------------------------------------------------------------------------

FULL = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048)
REAL = {  # the published transformer/config.json of each release, and diffusers' parameter count (meta device)
    "sd3_medium": (dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
                   2_028_328_000),
    "sd35_medium": (dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         dual_attention_layers=list(range(13)), qk_norm="rms_norm"), 2_243_171_520),
    "sd35_large": (dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        dual_attention_layers=[], qk_norm="rms_norm"), 8_056_627_520),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_full_size_parameter_count_matches_diffusers(name):
    from diffusers import SD3Transformer2DModel

    config, count = dict(FULL, **REAL[name][0]), REAL[name][1]
    with torch.device("meta"):
        assert sum(p.numel() for p in SD3Transformer2DModel(**config).parameters()) == count
    shapes = st.param_shapes(st.SD3Config.from_diffusers(config))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count
