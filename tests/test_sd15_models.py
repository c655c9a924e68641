"""SD1.5 components against diffusers / transformers: UNet, AutoencoderKL, CLIP text, full-size shapes.

Parity metric (every test): max |flax - torch| <= 1e-4 * max |torch| in fp32, on three tiny random
configs per component. The full-size SD1.5 inpainting configs are checked with `jax.eval_shape` against
the torch models built on the meta device (nothing is allocated).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_inpaint_rl.models.layers import clip_text
from jax_inpaint_rl.models.layers import inpaint_utils
from jax_inpaint_rl.models.sd15 import family as sd15_inpaint
from jax_inpaint_rl.models.sd15 import unet as unet2d
from jax_inpaint_rl.models.layers import vae
from jax_inpaint_rl.models.params_io import flatten, unflatten
from tests import sd15_fixtures as fx
from tools.convert_weights import common
from tools.convert_weights.components import clip_text_rules, unet_rules, vae_rules
from tools.convert_weights.sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

TOLERANCE = 1e-4


def to_flax(state_dict, rules, abstract_params):
    shapes = {path: leaf.shape for path, leaf in flatten(abstract_params).items()}
    return unflatten(dict(common.convert("test", state_dict, rules, shapes)))


@pytest.mark.parametrize("name", sorted(fx.UNET_CONFIGS))
def test_unet_matches_diffusers(name):
    model = fx.torch_unet(name)
    config = unet2d.UNetConfig.from_diffusers(dict(model.config))
    flax_unet = unet2d.UNet2DConditionModel(config)
    rng = np.random.default_rng(0)
    size = fx.UNET_SAMPLE_SIZE[name]
    sample = rng.standard_normal((2, size, size, config.in_channels)).astype(np.float32)
    steps = np.array([981.0, 21.0], np.float32)
    context = rng.standard_normal((2, 5, config.cross_attention_dim)).astype(np.float32)
    params = to_flax(fx.state_dict_numpy(model), unet_rules(config.use_linear_projection),
                     jax.eval_shape(flax_unet.init, jax.random.key(0), sample, steps, context)["params"])
    with torch.no_grad():
        ref = fx.nhwc(model(fx.nchw(sample), torch.from_numpy(steps), torch.from_numpy(context)).sample)
    got = fx.run_compiled(flax_unet.apply, {"params": params}, sample, steps, context)
    assert got.shape == ref.shape
    assert fx.relative_error(got, ref) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(fx.VAE_CONFIGS))
def test_vae_matches_diffusers(name):
    model = fx.torch_vae(fx.VAE_CONFIGS[name])
    config = vae.VAEConfig.from_diffusers(dict(model.config))
    flax_vae = vae.AutoencoderKL(config)
    image = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    abstract = jax.eval_shape(flax_vae.init, jax.random.key(0), image)["params"]
    params = to_flax(fx.state_dict_numpy(model), vae_rules(), abstract)
    with torch.no_grad():
        posterior = model.encode(fx.nchw(image)).latent_dist
        decoded = fx.nhwc(model.decode(posterior.mean).sample)
    def encode_decode(params, image):
        mean, logvar = flax_vae.apply({"params": params}, image, method=vae.AutoencoderKL.encode)
        latents = vae.to_model_latents(config, mean)
        return mean, logvar, latents, vae.vae_decode(flax_vae, params, latents)

    mean, logvar, latents, got_decoded = fx.run_compiled(encode_decode, params, image)
    assert fx.relative_error(mean, fx.nhwc(posterior.mean)) <= TOLERANCE
    assert fx.relative_error(logvar, fx.nhwc(posterior.logvar)) <= TOLERANCE
    expected_latents = (fx.nhwc(posterior.mean) - (config.shift_factor or 0.0)) * config.scaling_factor
    assert fx.relative_error(latents, expected_latents) <= TOLERANCE
    assert fx.relative_error(got_decoded, decoded) <= TOLERANCE


def test_vae_encode_mean_or_posterior_sample():
    model = fx.torch_vae(fx.VAE_CONFIGS["sd_like"])
    config = vae.VAEConfig.from_diffusers(dict(model.config))
    flax_vae = vae.AutoencoderKL(config)
    image = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    abstract = jax.eval_shape(flax_vae.init, jax.random.key(0), image)["params"]
    params = to_flax(fx.state_dict_numpy(model), vae_rules(), abstract)
    key = jax.random.key(5)

    def encodings(params, image, key):
        mean, logvar = flax_vae.apply({"params": params}, image, method=vae.AutoencoderKL.encode)
        return (mean, logvar, vae.vae_encode(flax_vae, params, image, key=key),
                vae.vae_encode(flax_vae, params, image))

    mean, logvar, sampled, mean_latents = fx.run_compiled(encodings, params, image, key)
    expected = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)) * config.scaling_factor
    np.testing.assert_allclose(sampled, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean_latents, mean * config.scaling_factor, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(fx.TEXT_CONFIGS))
def test_clip_text_matches_transformers(name):
    model = fx.torch_text(fx.TEXT_CONFIGS[name])
    config = clip_text.CLIPTextConfig.from_transformers(model.config.to_dict())
    flax_text = clip_text.CLIPTextTransformer(config)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, config.vocab_size - 3, (3, config.max_position_embeddings))
    eos = config.vocab_size - 1 if config.eos_token_id == 2 else config.eos_token_id
    ids[0, 4:], ids[1, -1], ids[2, 1] = eos, eos, eos  # pooled position: early, last, second
    params = to_flax(fx.state_dict_numpy(model), clip_text_rules(), jax.eval_shape(
        lambda: clip_text.init_params(flax_text, jax.random.key(0))))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))
    got = fx.run_compiled(flax_text.apply, {"params": params}, ids)
    assert fx.relative_error(got["last_hidden_state"], ref.last_hidden_state.numpy()) <= TOLERANCE
    assert fx.relative_error(got["pooled"], ref.pooler_output.numpy()) <= TOLERANCE
    np.testing.assert_array_equal(np.asarray(clip_text.eos_positions(config, ids)), [4, ids.shape[1] - 1, 1])


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_full_size_parameter_counts_match_torch():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    modules = sd15_inpaint.build_modules(SD15_UNET, SD15_VAE, SD15_TEXT)
    shapes = jax.eval_shape(lambda: sd15_inpaint.init_params(modules, jax.random.key(0)))
    with torch.device("meta"):
        torch_models = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
                        "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}
    for component, model in torch_models.items():
        assert _count(shapes[component]) == sum(p.numel() for p in model.parameters()), component
    assert _count(shapes["unet"]) == 859_535_364  # runwayml/stable-diffusion-inpainting UNet
    assert modules.unet.config.num_attention_heads == (8, 8, 8, 8)
    out = jax.eval_shape(modules.unet.apply, {"params": shapes["unet"]}, jnp.zeros((1, 64, 64, 9)), jnp.zeros((1,)),
                         jnp.zeros((1, 77, 768)))
    assert out.shape == (1, 64, 64, 4)


def test_unsupported_config_names_the_key():
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        unet2d.UNetConfig.from_diffusers({**SD15_UNET, "class_embed_type": "timestep"}, "unet/config.json")
    with pytest.raises(ValueError, match="frobnicate"):
        vae.VAEConfig.from_diffusers({**SD15_VAE, "frobnicate": 1})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        clip_text.CLIPTextConfig.from_transformers({**SD15_TEXT, "hidden_act": "relu"})


def test_inpaint_utils_follow_diffusers():
    rng = np.random.default_rng(3)
    mask = (rng.uniform(size=(2, 24, 40, 1)) > 0.5).astype(np.float32)
    expected = torch.nn.functional.interpolate(fx.nchw(mask), size=(3, 5))
    np.testing.assert_array_equal(inpaint_utils.latent_mask(mask, 3, 5), fx.nhwc(expected))
    soft = rng.uniform(size=(1, 4, 4, 1)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(inpaint_utils.masked_image(image, soft), image * (soft < 0.5))
    generated = rng.uniform(-1, 1, image.shape).astype(np.float32)
    pasted = np.asarray(inpaint_utils.composite(generated, image, soft))
    np.testing.assert_allclose(pasted, generated * soft + image * (1 - soft), rtol=1e-6)


def test_prepare_condition_binarises_a_soft_mask_as_diffusers(monkeypatch):
    """Soft mask: diffusers' mask_processor binarises (>= 0.5 -> 1) before resizing to the latent grid and
    before masking the image; prepare_condition must give the same mask and masked-image latents."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

    # the pipeline samples the masked-image posterior; the family uses its mean (deterministic condition)
    monkeypatch.setattr(inpaint_module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    torch_vae = fx.torch_vae(fx.PIPE_VAE)
    pipe = StableDiffusionInpaintPipeline(vae=torch_vae, text_encoder=fx.torch_text(fx.TEXT_CONFIGS["legacy_eos"]),
                                          tokenizer=fx.clip_tokenizer(), unet=UNet2DConditionModel(**fx.PIPE_UNET),
                                          scheduler=DDIMScheduler(steps_offset=1), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    rng = np.random.default_rng(6)
    image = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    mask = rng.uniform(0.2, 0.8, (2, 32, 32, 1)).astype(np.float32)
    picked = [0.5, 0.49, 0.51, 0.0, 1.0, 0.3, 0.7]  # on the pixels nearest-resizing to 8x8 keeps
    mask[:, ::4, ::4, 0] = np.resize(picked, (2, 8, 8))
    with torch.no_grad():
        mask_condition = pipe.mask_processor.preprocess(fx.nchw(mask), height=32, width=32)
        expected_mask, expected_latents = pipe.prepare_mask_latents(
            mask_condition, fx.nchw(image) * (mask_condition < 0.5), 2, 32, 32, torch.float32, "cpu", None, False)

    family, params = sd15_inpaint.tiny(vae_config=dict(torch_vae.config))
    params["vae"] = to_flax(fx.state_dict_numpy(torch_vae), vae_rules(), params["vae"])
    cond = fx.run_compiled(family.prepare_condition, params, {"image": jnp.asarray(image), "mask": jnp.asarray(mask)})
    assert set(np.unique(fx.nhwc(expected_mask))) == {0.0, 1.0}
    np.testing.assert_array_equal(cond["mask"], fx.nhwc(expected_mask))
    assert fx.relative_error(cond["masked_latents"], fx.nhwc(expected_latents)) <= TOLERANCE


def test_tiny_family_runs_end_to_end():
    family, params = sd15_inpaint.tiny(seed=0)
    assert (family.parameterization.name, family.denoiser_key, family.inputs) == ("epsilon", "unet", ("image", "mask"))
    assert family.guidance.needs_negative and family.schedule(10, None)["model_t"][0] == 901
    tokens = family.tokenize(["a red sign", ""])
    assert tokens["input_ids"].shape == (2, 16) and tokens["input_ids"][1, 1] == 99  # BOS, then EOS
    image = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    mask = jnp.zeros((2, 32, 32, 1)).at[:, 8:24, 8:24].set(1.0)
    cond = fx.run_compiled(lambda p, t, i: {**family.encode_prompt(p, t, i, {}), **family.prepare_condition(p, i)},
                           params, tokens, {"image": image, "mask": mask})
    shape = family.latent_shape(32, 32)
    assert shape == (8, 8, 4) and cond["mask"].shape == (2, 8, 8, 1) and cond["masked_latents"].shape == (2, *shape)
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    eps = fx.run_compiled(family.denoise, params, x, jnp.array([999.0, 1.0]), cond)
    assert eps.shape == x.shape and eps.dtype == jnp.float32 and bool(jnp.isfinite(eps).all())
    assert jax.eval_shape(lambda: family.decode(params, family.encode_image(params, image))).shape == image.shape
    with pytest.raises(ValueError, match="multiples of the VAE downscale 4"):
        family.latent_shape(30, 32)
    with pytest.raises(ValueError, match="mask shape"):
        family.prepare_condition(params, {"image": image, "mask": mask[:, :16]})


def test_bfloat16_compute_and_remat_keep_parameter_names():
    """bf16 compute with fp32 params, and rematerialised blocks under grad: same tree, fp32 epsilon (traced only)."""
    family, params = sd15_inpaint.tiny(seed=0, dtype="bfloat16", remat=True)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x = jnp.zeros((2, 8, 8, 4))
    cond = {"text": jnp.zeros((2, 16, 32)), "mask": jnp.zeros((2, 8, 8, 1)), "masked_latents": x}
    t = jnp.array([10.0, 500.0])

    def loss(unet_params):
        return jnp.mean(family.denoise({**params, "unet": unet_params}, x, t, cond) ** 2)

    assert "remat" in str(jax.make_jaxpr(loss)(params["unet"]))
    grads = jax.eval_shape(jax.grad(loss), params["unet"])
    assert jax.tree.structure(grads) == jax.tree.structure(params["unet"])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert jax.eval_shape(family.denoise, params, x, t, cond).dtype == jnp.float32
