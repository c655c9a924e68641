"""Qwen-Image VAE: fp32 parity with diffusers' AutoencoderKLQwenImage on single frames, on tiny configs that
differ in every knob (base_dim, z_dim, dim_mult, num_res_blocks, temperal_downsample, input_channels, latent
statistics, non-square sizes at odd multiples of the downscale; attn_scales has one runnable value, []); the
posterior, the pipelines' normalised latents and the decode with its clamp; the unused time convs; the
converter (layouts, tensor check, every bad key named); configs and inputs refused by name; the full-size
parameter count."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jax_inpaint_rl.models.params_io import load_params
from jax_inpaint_rl.models.qwen_image import vae as qv
from jax_inpaint_rl.models.random_init import random_params
from tests.sd15_fixtures import randomize_norms, relative_error, run_compiled
from tools.convert_weights import common, qwen_image_vae

CONFIGS = {  # name -> (diffusers config, image (height, width): odd multiples of the downscale, non-square)
    # Qwen-Image's pattern (2-D level first, then 3-D), no attention outside the mid blocks: 4x, 9 x 5 latents
    "qwen_like": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                       temperal_downsample=[False, True], latents_mean=[-0.7, 0.1, 0.9, -0.2],
                       latents_std=[2.8, 1.4, 0.6, 1.9]), (36, 20)),
    # four levels (8x, 3 x 5 latents), 3-D / 2-D / 3-D, odd z_dim
    "four_levels": (dict(base_dim=4, z_dim=5, dim_mult=[1, 2, 3, 2], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[True, False, True], latents_mean=[0.3, -1.2, 0.0, 0.5, 2.0],
                         latents_std=[0.5, 1.0, 3.0, 2.2, 1.1]), (24, 40)),
    # two levels (2x, 11 x 3 latents), channels narrowing (dim_mult 2, 1), 3 residual blocks a level, 4 input
    # channels, attn_scales left to its default
    "narrowing": (dict(base_dim=6, z_dim=3, dim_mult=[2, 1], num_res_blocks=3,
                       temperal_downsample=[True], input_channels=4, latents_mean=[1.5, -0.4, 0.2],
                       latents_std=[1.7, 0.8, 2.4]), (22, 6)),
}
TOLERANCE = 1e-4
# the decoder's last conv scaled up per config so 10-40% of the decoded pixels pass +-1 (the clamp is exercised)
DECODER_GAIN = {"qwen_like": 4.0, "four_levels": 24.0, "narrowing": 8.0}
# the published Qwen-Image vae/config.json (diffusers' defaults); diffusers counts 126,892,531 on the meta device
FULL = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0, latents_mean=list(qv.QWEN_IMAGE_LATENTS_MEAN),
            latents_std=list(qv.QWEN_IMAGE_LATENTS_STD))
FULL_PARAMETERS = 126_892_531


def torch_vae(config: dict, seed: int = 0, decoder_gain: float = 1.0):
    """Random weights, norms perturbed, the decoder's last conv weights times `decoder_gain`."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    model = randomize_norms(AutoencoderKLQwenImage(**config).eval())
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(decoder_gain)
    return model


def example(name: str, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Batch-2 images in [-1, 1] and normalised latents (what the denoiser hands the decoder)."""
    config, (height, width) = CONFIGS[name]
    scale = 2 ** (len(config["dim_mult"]) - 1)
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, height, width, config.get("input_channels", 3))).astype(np.float32)
    return images, rng.standard_normal((2, height // scale, width // scale, config["z_dim"]), np.float32)


def frame(array: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) -> diffusers' one-frame video (B, C, 1, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))[:, :, None]


def unframe(tensor: torch.Tensor) -> np.ndarray:
    return tensor[:, :, 0].numpy().transpose(0, 2, 3, 1)


def torch_outputs(model, images: np.ndarray, latents: np.ndarray) -> dict[str, np.ndarray]:
    """The posterior, the pipeline's normalised latents (_encode_vae_image, sample_mode='argmax') and its decode
    of normalised latents (latents / (1 / std) + mean, vae.decode, frame 0)."""
    shape = (1, model.config.z_dim, 1, 1, 1)
    mean, std = (torch.tensor(model.config[k]).view(shape) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():
        posterior = model.encode(frame(images)).latent_dist
        decoded = model.decode(frame(latents) / (1.0 / std) + mean).sample
    return dict(mean=unframe(posterior.mean), logvar=unframe(posterior.logvar),
                latents=unframe((posterior.mode() - mean) / std), decoded=unframe(decoded))


def compile_outputs(config: qv.QwenVAEConfig, params, images, latents, raw_latents):
    """One compiled program (XLA's backend optimisation off: these tests are compile-bound on CPU) of
    (params, images, normalised latents, raw latents) -> the posterior, encode_latents, decode_latents and the
    module's own decode of the raw latents, as numpy."""
    module = qv.QwenImageVAE(config)

    def run(p, x, z, raw):
        mean, logvar = module.apply({"params": p}, x, method=qv.QwenImageVAE.encode)
        return dict(mean=mean, logvar=logvar, latents=qv.encode_latents(module, p, x),
                    decoded=qv.decode_latents(module, p, z),
                    raw_decoded=module.apply({"params": p}, raw, method=qv.QwenImageVAE.decode))

    args = (params, *(jnp.asarray(a) for a in (images, latents, raw_latents)))
    compiled = jax.jit(run).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return lambda p: {k: np.asarray(v) for k, v in compiled(p, *args[1:]).items()}


def stats(config: qv.QwenVAEConfig) -> tuple[np.ndarray, np.ndarray]:
    return np.array(config.latents_mean, np.float32), np.array(config.latents_std, np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    """name, torch model, config, converted Flax params, converted folder, component, the inputs and the
    compiled Flax program (params -> outputs)."""
    name = request.param
    folder = tmp_path_factory.mktemp(f"qwen_vae_{name}")
    model = torch_vae(CONFIGS[name][0], decoder_gain=DECODER_GAIN[name])
    model.save_pretrained(folder / "diffusers")
    component = qwen_image_vae.convert_vae(str(folder / "diffusers"), str(folder / "out"))
    params = load_params(folder / "out" / "params")["vae"]
    config = qv.QwenVAEConfig.from_diffusers(model.config)
    images, latents = example(name)
    mean, std = stats(config)
    run = compile_outputs(config, params, images, latents, latents * std + mean)
    return dict(name=name, model=model, config=config, params=params, out=folder / "out", component=component,
                images=images, latents=latents, run=run)


def test_parity_with_diffusers(converted):
    name, model, images = converted["name"], converted["model"], converted["images"]
    ref = torch_outputs(model, images, converted["latents"])
    got = converted["run"](converted["params"])
    scale = converted["config"].downscale
    assert got["mean"].shape == (2, images.shape[1] // scale, images.shape[2] // scale, model.config.z_dim)
    assert got["decoded"].shape == images.shape
    errors = {k: relative_error(got[k], ref[k]) for k in ref}
    print(f"{name}: max relative errors " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE, (name, errors)
    # the decode clamps like diffusers', and the parity is not only over clamped values
    inside = np.abs(ref["decoded"]) < 1
    print(f"{name}: {1 - inside.mean():.0%} of the decoded pixels clamped")
    assert 0.6 < inside.mean() < 0.9 and np.abs(got["decoded"]).max() == 1.0, (name, inside.mean())


def test_normalisation_is_the_pipelines(converted):
    """encode_latents is the posterior mean normalised per channel and decode_latents decodes latents * std +
    mean: checked against numpy's normalisation of the raw posterior and the module's decode of numpy's raw
    latents, so a swapped or missing mean / std cannot pass."""
    got = converted["run"](converted["params"])
    mean, std = stats(converted["config"])
    np.testing.assert_allclose(got["latents"], (got["mean"] - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["decoded"], got["raw_decoded"], rtol=1e-5, atol=1e-6)
    assert relative_error(got["latents"], got["mean"]) > 0.1  # the statistics are far from (0, 1)


def test_time_convs_do_not_touch_a_frame(converted):
    """The Resample time convs exist (diffusers' shapes) but one frame never runs them: changing them changes
    no output. (Every other conv's last temporal tap matters: a kernel[0] port could not pass the parity.)"""
    model, params = converted["model"], converted["params"]

    def is_time_conv(path) -> bool:
        return any(getattr(p, "key", None) == "time_conv" for p in path)

    leaves = [path for path, _ in jax.tree_util.tree_leaves_with_path(params) if is_time_conv(path)]
    assert len(leaves) == 2 * 2 * sum(model.config.temperal_downsample)  # encoder and decoder, kernel and bias
    base = converted["run"](params)
    poked = converted["run"](jax.tree_util.tree_map_with_path(lambda path, x: x + 1.0 if is_time_conv(path) else x,
                                                              params))
    for k, v in poked.items():
        np.testing.assert_array_equal(v, base[k])


def test_converter_layouts_and_tensor_check(converted):
    model, params, out = converted["model"], converted["params"], converted["out"]
    conv_in = model.encoder.conv_in.weight.detach().numpy()  # (out, in, 3, 3, 3)
    np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"], conv_in.transpose(2, 3, 4, 1, 0))
    gamma = model.decoder.norm_out.gamma.detach().numpy()  # (C, 1, 1, 1)
    np.testing.assert_array_equal(params["decoder"]["norm_out"]["scale"], gamma.reshape(-1))
    qkv = model.decoder.mid_block.attentions[0].to_qkv.weight.detach().numpy()  # (3C, C, 1, 1)
    np.testing.assert_array_equal(params["decoder"]["mid_block"]["attentions_0"]["to_qkv"]["kernel"],
                                  qkv.transpose(2, 3, 1, 0))
    assert qwen_image_vae.verify_vae(converted["component"], str(out)) == len(model.state_dict())
    assert json.loads((out / "vae" / "config.json").read_text())["z_dim"] == model.config.z_dim


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def write_checkpoint(folder, state: dict, config: dict) -> str:
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_conversion_errors_list_every_bad_key(tmp_path):
    model = torch_vae(CONFIGS["four_levels"][0])
    state = numpy_state(model)
    del state["decoder.up_blocks.0.upsamplers.0.time_conv.bias"]
    state["encoder.down_blocks.3.norm1.gamma"] = state["encoder.down_blocks.3.norm1.gamma"][:2]
    state["encoder.down_blocks.0.lora_A.weight"] = np.zeros((2, 2), np.float32)
    src = write_checkpoint(tmp_path / "bad", state, dict(model.config))
    with pytest.raises(common.ConversionError) as err:
        qwen_image_vae.convert_vae(src, str(tmp_path / "out"))
    message = str(err.value)
    assert src in message and "unknown keys (no rule maps them): 1\n    encoder.down_blocks.0.lora_A.weight" in message
    assert "missing keys (the model needs them): 1\n    decoder/up_blocks_0/upsamplers_0/time_conv/bias" in message
    assert "encoder.down_blocks.3.norm1.gamma -> encoder/down_blocks_3/norm1/scale: got (2,), expected (4,)" in message
    assert not (tmp_path / "out" / "params" / "vae.safetensors").exists(), "partial output left behind"

    # one residual block a level: the flat encoder list shifts, so index 2 (a Resample in the checkpoint) is a
    # residual block in the model
    fewer = write_checkpoint(tmp_path / "fewer", numpy_state(model), dict(model.config, num_res_blocks=1))
    with pytest.raises(common.ConversionError, match=r"encoder.down_blocks.2.resample.1.weight -> "
                                                     r"encoder/down_blocks_2/resample_1/kernel \(not a parameter"):
        qwen_image_vae.convert_vae(fewer, str(tmp_path / "out"))


def test_bad_configs_and_inputs_are_named():
    config = dict(CONFIGS["qwen_like"][0])
    with pytest.raises(ValueError, match=r"unknown Qwen-Image VAE config keys \['decoder_base_dim'\]"):
        qv.QwenVAEConfig.from_diffusers(dict(config, decoder_base_dim=8))
    with pytest.raises(ValueError, match=r"temperal_downsample \(False, True, True\) must have one flag per "
                                         r"downsampling level, len\(dim_mult\) - 1 = 2"):
        qv.QwenVAEConfig.from_diffusers(dict(config, temperal_downsample=[False, True, True]))
    with pytest.raises(ValueError, match="latents_std has 3 values for z_dim 4"):
        qv.QwenVAEConfig.from_diffusers(dict(config, latents_std=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"attn_scales \(1.0,\) is not supported"):
        qv.QwenVAEConfig.from_diffusers(dict(config, attn_scales=[1.0]))
    with pytest.raises(TypeError):  # why: diffusers cannot encode with down-block attention either
        torch_vae(dict(config, attn_scales=[1.0])).encode(frame(np.zeros((1, 4, 4, 3), np.float32)))
    made = qv.QwenVAEConfig.from_diffusers(dict(config, _class_name="AutoencoderKLQwenImage"), "vae/config.json")
    assert (made.downscale, made.latent_channels, made.dim_mult) == (4, 4, (1, 2, 2))
    module = qv.QwenImageVAE(made)
    params = jax.eval_shape(lambda: qv.init_params(made, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"images \(1, 36, 22, 3\): expected \(B, H, W, 3\), H and W positive "
                                         r"multiples of 4"):
        jax.eval_shape(lambda p: qv.encode_latents(module, p, jnp.zeros((1, 36, 22, 3))), params)
    with pytest.raises(ValueError, match=r"latents \(1, 9, 5, 16\): expected \(B, H, W, 4\)"):
        jax.eval_shape(lambda p: qv.decode_latents(module, p, jnp.zeros((1, 9, 5, 16))), params)


def test_tiny_config_round_trip_shapes():
    """The tiny family's VAE at 32 x 32, with the random weights every tiny family draws (random_params: Flax's
    own init compiles each initialiser eagerly, ~30 s on a small CPU)."""
    config = qv.tiny_config()
    module = qv.QwenImageVAE(config)
    params = random_params(qv.param_shapes(config))
    images = jnp.zeros((1, 32, 32, 3))
    latents = run_compiled(lambda p, x: qv.encode_latents(module, p, x), params, images)
    assert latents.shape == (1, 32 // config.downscale, 32 // config.downscale, 16)
    decoded = run_compiled(lambda p, z: qv.decode_latents(module, p, z), params, latents)
    assert decoded.shape == images.shape and np.isfinite(np.asarray(decoded)).all()


def test_full_size_parameter_count_matches_diffusers():
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        model = AutoencoderKLQwenImage(**FULL)
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMETERS
    config = qv.QwenVAEConfig.from_diffusers(FULL)
    assert config == qv.QwenVAEConfig() and config.downscale == 8 == model.spatial_compression_ratio
    shapes = qv.param_shapes(config)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == FULL_PARAMETERS
    assert len(jax.tree.leaves(shapes)) == len(model.state_dict())
    # the key table maps every full-size diffusers key onto exactly the Flax parameters
    mapping, unknown = common.map_keys(qwen_image_vae.VAE_RULES, model.state_dict())
    flat = {"/".join(str(p.key) for p in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    assert not unknown and sorted(path for path, _ in mapping.values()) == sorted(flat)
