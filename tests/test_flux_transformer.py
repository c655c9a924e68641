"""Flux transformer: parity with diffusers' FluxTransformer2DModel per variant, the converter (diffusers and
original single-file layouts, bf16, export round trip, key errors), and the full-size parameter counts."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jax_inpaint_rl.models.flux import transformer as ft
from jax_inpaint_rl.models.params_io import load_params
from tests.sd15_fixtures import randomize_norms, relative_error
from tools.convert_weights import common
from tools.convert_weights import flux as convert

TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
CONFIGS = {  # name -> (diffusers config, guidance scale, reference tokens appended Kontext-style)
    "dev": (dict(TINY, in_channels=64, guidance_embeds=True), 3.5, False),
    "fill": (dict(TINY, in_channels=384, out_channels=64, guidance_embeds=True), 30.0, False),
    "kontext": (dict(TINY, in_channels=64, guidance_embeds=True), 2.5, True),
    "no_guidance": (dict(num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
                         joint_attention_dim=24, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), in_channels=16,
                         guidance_embeds=False), None, False),
}
GRID, TEXT_LEN, BATCH = (4, 3), 5, 2


def torch_transformer(config: dict, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return randomize_norms(FluxTransformer2DModel(**config).eval())


def grid_ids(h: int, w: int, first: float = 0.0) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 0], ids[..., 1], ids[..., 2] = first, np.arange(h)[:, None], np.arange(w)[None, :]
    return ids.reshape(-1, 3)


def example(config: dict, guidance, reference: bool, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    img_ids = grid_ids(*GRID)
    tokens = len(img_ids)
    if reference:  # Kontext: the reference image's tokens follow the noisy ones, first id 1
        img_ids = np.concatenate([img_ids, grid_ids(2, 3, first=1.0)])
    inputs = dict(
        hidden=rng.standard_normal((BATCH, len(img_ids), config["in_channels"]), np.float32),
        text=rng.standard_normal((BATCH, TEXT_LEN, config["joint_attention_dim"]), np.float32),
        pooled=rng.standard_normal((BATCH, config["pooled_projection_dim"]), np.float32),
        timestep=np.array([1.0, 0.37], np.float32)[:BATCH],
        img_ids=img_ids, txt_ids=np.zeros((TEXT_LEN, 3), np.float32),
        guidance=None if guidance is None else np.full((BATCH,), guidance, np.float32))
    return inputs, tokens


def torch_forward(model, inputs) -> np.ndarray:
    t = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
    with torch.no_grad():
        return model(hidden_states=t(inputs["hidden"]), encoder_hidden_states=t(inputs["text"]),
                     pooled_projections=t(inputs["pooled"]), timestep=t(inputs["timestep"]),
                     img_ids=t(inputs["img_ids"]), txt_ids=t(inputs["txt_ids"]),
                     guidance=t(inputs["guidance"])).sample.numpy()


def flax_forward(config: ft.FluxConfig, params, inputs, dtype=jnp.float32, remat: bool = False) -> np.ndarray:
    model = ft.FluxTransformer(config, dtype, remat)
    inputs = {k: None if v is None else jnp.asarray(v) for k, v in inputs.items()}
    return np.asarray(jax.jit(model.apply)({"params": params}, **inputs), np.float32)


def build_converted(name: str, folder):
    """(name, torch model, converted Flax params, folder with diffusers/ and out/)."""
    model = torch_transformer(CONFIGS[name][0])
    model.save_pretrained(folder / "diffusers")
    convert.convert_component(convert.transformer_component(str(folder / "diffusers")), str(folder / "out"),
                              "transformer")
    return name, model, load_params(folder / "out" / "params")["transformer"], folder


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    return build_converted(request.param, tmp_path_factory.mktemp(f"flux_{request.param}"))


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return build_converted("fill", tmp_path_factory.mktemp("flux_fill_only"))


def test_parity_with_diffusers(converted):
    name, model, params, _ = converted
    config, guidance, reference = CONFIGS[name]
    inputs, tokens = example(config, guidance, reference)
    ref = torch_forward(model, inputs)
    got = flax_forward(ft.FluxConfig.from_diffusers(model.config), params, inputs)
    assert got.shape == ref.shape
    # Kontext keeps only the noisy tokens' outputs; the reference tokens must still have been attended to.
    assert relative_error(got[:, :tokens], ref[:, :tokens]) < 1e-4, name
    assert relative_error(got, ref) < 1e-4, name


def test_params_are_stacked_per_block_kind(converted):
    name, model, params, _ = converted
    assert params["double_blocks"]["attn"]["to_q"]["kernel"].shape[0] == model.config.num_layers
    assert params["single_blocks"]["proj_out"]["kernel"].shape[0] == model.config.num_single_layers
    last = model.config.num_layers - 1
    torch_q = model.transformer_blocks[last].attn.to_q.weight.detach().numpy()
    np.testing.assert_array_equal(params["double_blocks"]["attn"]["to_q"]["kernel"][last], torch_q.T)


def test_remat_and_bf16_compute(fill):
    name, model, params, _ = fill
    config, guidance, reference = CONFIGS[name]
    inputs, _ = example(config, guidance, reference)
    flax_config = ft.FluxConfig.from_diffusers(model.config)
    ref = torch_forward(model, inputs)
    assert relative_error(flax_forward(flax_config, params, inputs, jnp.bfloat16), ref) < 5e-2
    assert relative_error(flax_forward(flax_config, params, inputs, remat=True), ref) < 1e-4
    arrays = {k: jnp.asarray(v) for k, v in inputs.items()}
    loss = lambda p: jnp.sum(ft.FluxTransformer(flax_config, remat=True).apply({"params": p}, **arrays))  # noqa: E731
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(params)), "remat=True did not rematerialise"


def original_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers keys -> Black Forest Labs' single-file keys (fused qkv / linear1, final (shift, scale)),
    written out independently of the converter's table."""
    out, n_double = {}, 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    n_single = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks."))
    for p in ("weight", "bias"):
        for src, dst in [("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
                         ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                         ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                         ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                         ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                         ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                         ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")]:
            if f"{src}.{p}" in state:
                out[f"{dst}.{p}"] = state[f"{src}.{p}"]
        scale, shift = np.split(state[f"norm_out.linear.{p}"], 2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = np.concatenate([shift, scale])
        for i in range(n_double):
            b, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
            out[f"{o}.img_mod.lin.{p}"] = state[f"{b}.norm1.linear.{p}"]
            out[f"{o}.txt_mod.lin.{p}"] = state[f"{b}.norm1_context.linear.{p}"]
            out[f"{o}.img_attn.qkv.{p}"] = np.concatenate([state[f"{b}.attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{o}.txt_attn.qkv.{p}"] = np.concatenate([state[f"{b}.attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{o}.img_attn.proj.{p}"] = state[f"{b}.attn.to_out.0.{p}"]
            out[f"{o}.txt_attn.proj.{p}"] = state[f"{b}.attn.to_add_out.{p}"]
            for stream, ff in (("img", "ff"), ("txt", "ff_context")):
                out[f"{o}.{stream}_mlp.0.{p}"] = state[f"{b}.{ff}.net.0.proj.{p}"]
                out[f"{o}.{stream}_mlp.2.{p}"] = state[f"{b}.{ff}.net.2.{p}"]
        for i in range(n_single):
            b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            out[f"{o}.modulation.lin.{p}"] = state[f"{b}.norm.linear.{p}"]
            out[f"{o}.linear1.{p}"] = np.concatenate([state[f"{b}.attn.to_{x}.{p}"] for x in "qkv"]
                                                     + [state[f"{b}.proj_mlp.{p}"]])
            out[f"{o}.linear2.{p}"] = state[f"{b}.proj_out.{p}"]
    for i in range(n_double):
        b, o = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        out[f"{o}.img_attn.norm.query_norm.scale"] = state[f"{b}.norm_q.weight"]
        out[f"{o}.img_attn.norm.key_norm.scale"] = state[f"{b}.norm_k.weight"]
        out[f"{o}.txt_attn.norm.query_norm.scale"] = state[f"{b}.norm_added_q.weight"]
        out[f"{o}.txt_attn.norm.key_norm.scale"] = state[f"{b}.norm_added_k.weight"]
    for i in range(n_single):
        b, o = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        out[f"{o}.norm.query_norm.scale"] = state[f"{b}.norm_q.weight"]
        out[f"{o}.norm.key_norm.scale"] = state[f"{b}.norm_k.weight"]
    return out


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_original_single_file_converts_to_the_same_params(converted, tmp_path):
    name, model, params, _ = converted
    original = {f"model.diffusion_model.{k}": v for k, v in original_layout(numpy_state(model)).items()}
    save_file(original, str(tmp_path / "flux1-tiny.safetensors"))
    component = convert.transformer_component(str(tmp_path / "flux1-tiny.safetensors"),
                                              axes_dims_rope=model.config.axes_dims_rope)
    for key in ("in_channels", "num_layers", "num_single_layers", "num_attention_heads", "guidance_embeds"):
        assert component.config[key] == model.config[key], key
    convert.convert_component(component, str(tmp_path / "out"), "transformer")
    jax.tree.map(np.testing.assert_array_equal, load_params(tmp_path / "out" / "params")["transformer"], params)


def test_export_round_trip_is_exact(converted, tmp_path):
    from diffusers import FluxTransformer2DModel

    name, model, _, folder = converted
    convert.export_transformer(str(folder / "out"), str(tmp_path / "exported"))
    back = FluxTransformer2DModel.from_pretrained(str(tmp_path / "exported"))
    original, exported = numpy_state(model), numpy_state(back)
    assert original.keys() == exported.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


def test_bfloat16_output_and_verify(fill, tmp_path):
    name, model, params, folder = fill
    component = convert.transformer_component(str(folder / "diffusers"))
    convert.convert_component(component, str(tmp_path), "transformer", dtype="bfloat16")
    half = load_params(tmp_path / "params")["transformer"]
    kernel = half["double_blocks"]["attn"]["to_q"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel, params["double_blocks"]["attn"]["to_q"]["kernel"].astype(jnp.bfloat16))
    assert convert.verify_component(component, str(tmp_path), "transformer") == len(model.state_dict())


def test_conversion_errors_list_every_bad_key(fill, tmp_path):
    name, model, _, _ = fill
    state = numpy_state(model)
    del state["transformer_blocks.1.attn.norm_added_k.weight"]
    state["transformer_blocks.0.attn.to_q.weight"] = state["transformer_blocks.0.attn.to_q.weight"][:, :8]
    state["transformer_blocks.0.attn.lora_A.weight"] = np.zeros((2, 2), np.float32)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text(json.dumps(dict(model.config)))
    with pytest.raises(common.ConversionError) as err:
        convert.convert_component(convert.transformer_component(str(tmp_path / "bad")), str(tmp_path / "out"),
                                  "transformer")
    message = str(err.value)
    assert "transformer_blocks.0.attn.lora_A.weight" in message
    assert "double_blocks/1/attn/norm_added_k/scale" in message
    assert "transformer_blocks.0.attn.to_q.weight -> double_blocks/0/attn/to_q/kernel: got (8, 32)" in message
    assert str(tmp_path / "bad") in message
    assert not os.path.exists(tmp_path / "out" / "params" / "transformer.safetensors"), "partial output left behind"


def test_bad_inputs_are_named():
    config = ft.FluxConfig.from_diffusers(CONFIGS["fill"][0])
    inputs, _ = example(CONFIGS["dev"][0], 3.5, False)  # 64 channels into the 384-channel Fill model
    with pytest.raises(ValueError, match=r"hidden states \(2, 12, 64\): expected \(B, L, 384\)"):
        jax.eval_shape(lambda: ft.FluxTransformer(config).init(jax.random.key(0), **inputs))
    inputs, _ = example(CONFIGS["fill"][0], None, False)
    with pytest.raises(ValueError, match="embeds the guidance scale"):
        jax.eval_shape(lambda: ft.FluxTransformer(config).init(jax.random.key(0), **inputs))
    with pytest.raises(ValueError, match="unknown Flux transformer config keys.*'qk_norm'"):
        ft.FluxConfig.from_diffusers(dict(CONFIGS["fill"][0], qk_norm="rms_norm"))
    with pytest.raises(FileNotFoundError, match="no_such_file.safetensors"):
        convert.transformer_component("/nonexistent/no_such_file.safetensors")


REAL = {  # the published transformer configs (diffusers' config.json of each repository)
    "fill": dict(in_channels=384, out_channels=64, guidance_embeds=True),
    "dev": dict(in_channels=64, guidance_embeds=True),
    "kontext": dict(in_channels=64, guidance_embeds=True),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_full_size_parameter_count_matches_diffusers(name):
    from diffusers import FluxTransformer2DModel

    config = dict(REAL[name], num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        reference = sum(p.numel() for p in FluxTransformer2DModel(**config).parameters())
    shapes = ft.param_shapes(ft.FluxConfig.from_diffusers(config))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == reference
    assert 11.8e9 < reference < 12.0e9
