"""Qwen-Image transformer: fp32 parity with diffusers' QwenImageTransformer2DModel on tiny configs that differ
in every knob (zero_cond_t, guidance_embeds, axes_dims_rope, non-square and reference-image grids, masked and
uneven text, batch 2 with a timestep each, remat); the converter (blocks stacked, tensor check, every bad key
named); the RoPE positions; the full-size parameter count."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jax_inpaint_rl.models.params_io import load_params
from jax_inpaint_rl.models.qwen_image import transformer as qt
from tests.sd15_fixtures import randomize_norms, relative_error
from tools.convert_weights import common, qwen_image

CONFIGS = {  # name -> (diffusers config, img_shapes (target first, then references), text mask of the 2 samples)
    # Qwen-Image: one non-square image; the second prompt padded (4 of 6 tokens)
    "t2i": (dict(patch_size=2, in_channels=8, out_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4)),
            ((1, 3, 5),), [[1] * 6, [1] * 4 + [0] * 2]),
    # Qwen-Image-Edit: a reference image after the target; a mask with a hole; guidance_embeds, which adds no
    # parameter (diffusers 0.42's forward fails when given a guidance, so such a checkpoint runs without one)
    "edit": (dict(patch_size=2, in_channels=12, out_channels=None, num_layers=3, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=10, axes_dims_rope=(4, 6, 6), guidance_embeds=True),
             ((1, 4, 2), (1, 2, 3)), [[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
    # Qwen-Image-Edit-2511: zero_cond_t with two references; 1 x 1 patches; run with remat
    "edit_zero_cond": (dict(patch_size=1, in_channels=16, out_channels=2, num_layers=2, attention_head_dim=12,
                            num_attention_heads=3, joint_attention_dim=8, axes_dims_rope=(2, 4, 6), zero_cond_t=True),
                       ((1, 2, 4), (1, 3, 3), (1, 1, 2)), [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]),
}
REMAT = {"edit_zero_cond"}
SIGMAS = np.array([0.93, 0.25], np.float32)  # batch 2, a timestep each, as the pipeline passes it (t / 1000)
TOLERANCE = 1e-4
# diffusers' QwenImageTransformer2DModel with the published Qwen-Image transformer/config.json (meta device)
FULL = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
FULL_PARAMETERS = 20_430_401_088


def torch_transformer(config: dict, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return randomize_norms(QwenImageTransformer2DModel(**config).eval())


def example(name: str, seed: int = 1) -> dict:
    config, shapes, mask = CONFIGS[name]
    rng = np.random.default_rng(seed)
    return dict(hidden=rng.standard_normal((2, qt.image_tokens(shapes), config["in_channels"]), np.float32),
                timestep=SIGMAS, text=rng.standard_normal((2, len(mask[0]), config["joint_attention_dim"]), np.float32),
                text_mask=np.array(mask, np.int32), img_shapes=shapes)


def torch_forward(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(hidden_states=torch.from_numpy(inputs["hidden"]), timestep=torch.from_numpy(inputs["timestep"]),
                     encoder_hidden_states=torch.from_numpy(inputs["text"]),
                     encoder_hidden_states_mask=torch.from_numpy(inputs["text_mask"]),
                     img_shapes=[list(inputs["img_shapes"])] * 2).sample.numpy()


def flax_forward(config: qt.QwenImageConfig, params, inputs, remat: bool = False) -> np.ndarray:
    """One compile per call, XLA's backend optimisation off (these tests are compile-bound on CPU)."""
    model = qt.QwenImageTransformer(config, remat=remat)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a, img_shapes=inputs["img_shapes"]))
    args = (params, *(jnp.asarray(inputs[k]) for k in ("hidden", "timestep", "text", "text_mask")))
    compiled = apply.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(compiled(*args), np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    """(name, torch model, converted Flax params, diffusers folder, converted folder, component)."""
    folder = tmp_path_factory.mktemp(f"qwen_{request.param}")
    model = torch_transformer(CONFIGS[request.param][0])
    model.save_pretrained(folder / "diffusers")
    component = qwen_image.convert_transformer(str(folder / "diffusers"), str(folder / "out"))
    params = load_params(folder / "out" / "params")["transformer"]
    return request.param, model, params, folder / "diffusers", folder / "out", component


def test_parity_with_diffusers(converted):
    name, model, params, _, _, _ = converted
    inputs = example(name)
    ref = torch_forward(model, inputs)
    got = flax_forward(qt.QwenImageConfig.from_diffusers(model.config), params, inputs, remat=name in REMAT)
    assert got.shape == ref.shape == inputs["hidden"].shape[:2] + (model.config.patch_size ** 2 * model.out_channels,)
    error = relative_error(got, ref)
    print(f"{name}: max relative error {error:.2e}")
    assert error <= TOLERANCE, (name, error)
    assert relative_error(got[1], ref[1]) <= TOLERANCE, name  # the second sample (own timestep and mask) too


def test_parity_needs_the_mask_and_the_reference_timestep(converted):
    """The knobs the parity exercises change the output: a test that ignored them could not fail."""
    name, model, params, _, _, _ = converted
    inputs = example(name)
    config = qt.QwenImageConfig.from_diffusers(model.config)
    ref = torch_forward(model, inputs)
    if name == "edit_zero_cond":  # without zero_cond_t the references would take the sample's timestep
        changed = qt.QwenImageConfig.from_diffusers(dict(model.config, zero_cond_t=False))
        assert relative_error(torch_forward(torch_transformer(dict(model.config, zero_cond_t=False)), inputs),
                              ref) > 1e-3
        assert relative_error(flax_forward(changed, params, inputs), ref) > 1e-3
    else:  # the padding tokens are masked out
        unmasked = dict(inputs, text_mask=np.ones_like(inputs["text_mask"]))
        assert relative_error(flax_forward(config, params, unmasked), ref) > 1e-3


def test_converter_stacks_blocks_and_tensor_check(converted):
    _, model, params, _, out, component = converted
    layers = model.config.num_layers
    assert params["transformer_blocks"]["attn"]["to_q"]["kernel"].shape[0] == layers
    torch_q = model.transformer_blocks[layers - 1].attn.to_q.weight.detach().numpy()
    np.testing.assert_array_equal(params["transformer_blocks"]["attn"]["to_q"]["kernel"][layers - 1], torch_q.T)
    assert qwen_image.verify_transformer(component, str(out)) == len(model.state_dict())
    assert json.loads((out / "transformer" / "config.json").read_text())["num_layers"] == layers


def test_rope_positions_follow_diffusers():
    """Centred rows / columns, frame = image index, text after the largest half-side: diffusers' frequency
    tables, rebuilt from our positions, equal its own."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    shapes, text_len, axes = ((1, 3, 5), (1, 4, 2), (2, 1, 3)), 4, (4, 6, 6)
    rope = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
    img_freqs, txt_freqs = rope([list(shapes)], max_txt_seq_len=text_len)
    for positions, freqs in ((qt.image_positions(shapes), img_freqs), (qt.text_positions(shapes, text_len), txt_freqs)):
        cos, sin = qt.rope_tables(positions, axes)
        np.testing.assert_allclose(np.asarray(cos)[:, ::2], freqs.real.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(sin)[:, ::2], freqs.imag.numpy(), atol=1e-6)


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def write_checkpoint(folder, state: dict, config: dict) -> str:
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_conversion_errors_list_every_bad_key(tmp_path):
    model = torch_transformer(CONFIGS["edit"][0])
    state = numpy_state(model)
    del state["transformer_blocks.2.attn.norm_added_k.weight"]
    state["transformer_blocks.1.txt_mod.1.weight"] = state["transformer_blocks.1.txt_mod.1.weight"][:, :8]
    state["transformer_blocks.0.attn.lora_A.weight"] = np.zeros((2, 2), np.float32)
    src = write_checkpoint(tmp_path / "bad", state, dict(model.config))
    with pytest.raises(common.ConversionError) as err:
        qwen_image.convert_transformer(src, str(tmp_path / "out"))
    message = str(err.value)
    assert src in message and "unknown keys (no rule maps them): 1\n    transformer_blocks.0.attn.lora_A.weight" \
        in message
    assert "missing keys (the model needs them): 1\n    transformer_blocks/2/attn/norm_added_k/scale" in message
    assert ("transformer_blocks.1.txt_mod.1.weight -> transformer_blocks/1/txt_mod/linear/kernel: got (8, 192), "
            "expected (32, 192)") in message
    assert not (tmp_path / "out" / "params" / "transformer.safetensors").exists(), "partial output left behind"

    fewer = write_checkpoint(tmp_path / "fewer", numpy_state(model),
                             dict(model.config, num_layers=2))
    with pytest.raises(common.ConversionError, match=r"transformer_blocks.2.img_mod.1.weight -> "
                                                     r"transformer_blocks/2/img_mod/linear/kernel \(not a parameter"):
        qwen_image.convert_transformer(fewer, str(tmp_path / "out"))


def test_bad_inputs_and_configs_are_named():
    config = qt.QwenImageConfig.from_diffusers(CONFIGS["t2i"][0])
    inputs = qt.example_inputs(config, batch=2)
    init = lambda **kw: jax.eval_shape(lambda: qt.QwenImageTransformer(config).init(  # noqa: E731
        jax.random.key(0), **dict(inputs, **kw)))
    with pytest.raises(ValueError, match=r"hidden states \(2, 4, 8\): img_shapes \(\(1, 2, 3\),\) hold 6 tokens"):
        init(img_shapes=((1, 2, 3),))
    with pytest.raises(ValueError, match=r"text mask \(2, 3\): expected \(2, 2\)"):
        init(text_mask=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"timestep \(1,\): expected \(2,\)"):
        init(timestep=jnp.zeros((1,)))
    with pytest.raises(ValueError, match="unknown Qwen-Image transformer config keys.*'pooled_projection_dim'"):
        qt.QwenImageConfig.from_diffusers(dict(CONFIGS["t2i"][0], pooled_projection_dim=4))
    with pytest.raises(ValueError, match=r"axes_dims_rope \(2, 2, 2\) must be 3 sizes summing to .* 8"):
        qt.QwenImageConfig.from_diffusers(dict(CONFIGS["t2i"][0], axes_dims_rope=[2, 2, 2]))
    with pytest.raises(ValueError, match="use_layer3d_rope=True is not supported"):
        qt.QwenImageConfig.from_diffusers(dict(CONFIGS["t2i"][0], use_layer3d_rope=True))


def test_remat_rematerialises():
    config = qt.QwenImageConfig.from_diffusers(CONFIGS["t2i"][0])
    inputs = qt.example_inputs(config)
    params = jax.eval_shape(lambda: qt.init_params(config, jax.random.key(0)))
    loss = lambda p: jnp.sum(qt.QwenImageTransformer(config, remat=True).apply({"params": p}, **inputs))  # noqa
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(params))


def test_full_size_parameter_count_matches_diffusers():
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        assert sum(p.numel() for p in QwenImageTransformer2DModel(**FULL).parameters()) == FULL_PARAMETERS
    shapes = qt.param_shapes(qt.QwenImageConfig.from_diffusers(FULL))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == FULL_PARAMETERS
