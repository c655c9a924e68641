"""Flux families: packing and conditioning against diffusers' pipeline helpers, whole-pipeline parity
(FluxFillPipeline, FluxKontextPipeline: same weights, same initial noise, a few Euler steps), the converter
CLI on a pipeline folder, the tiny family, and bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.guidance import EmbeddedGuidance
from jax_inpaint_rl.models.flux import family as flux
from tests.sd15_fixtures import TEXT_CONFIGS, clip_tokenizer, randomize_norms, relative_error

SIZE, STEPS, T5_LENGTH, BATCH = 32, 3, 8, 2
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
TRANSFORMER = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
T5 = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
CLIP = dict(TEXT_CONFIGS["legacy_eos"], vocab_size=58)
IN_CHANNELS = {"flux_fill": 64 + 64 + 4 * 2 * 2, "flux_kontext": 64}
PIPELINES = {"flux_fill": "FluxFillPipeline", "flux_kontext": "FluxKontextPipeline"}
PROMPTS = ["a cat", "a red sign"]


def t5_tokenizer():
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        ("\u2581" + w, -1.0 - i) for i, w in enumerate("a cat red sign".split())]
    return T5TokenizerFast(vocab=vocab + [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz"], extra_ids=0)


def torch_pipeline(name: str, seed: int = 0):
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    models = dict(vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP)),
                  text_encoder_2=T5EncoderModel(T5Config(**T5)),
                  transformer=FluxTransformer2DModel(**TRANSFORMER, in_channels=IN_CHANNELS[name], out_channels=64))
    models = {k: randomize_norms(m.eval()) for k, m in models.items()}  # eval: T5's dropout is on by default
    return getattr(diffusers, PIPELINES[name])(scheduler=scheduler, tokenizer=clip_tokenizer(),
                                                tokenizer_2=t5_tokenizer(), **models)


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[6:22, 10:30] = 255
    noise = rng.standard_normal((BATCH, (SIZE // 4) ** 2, 64)).astype(np.float32)  # packed tokens
    return image, mask, noise


_PIPELINES = {}


def converted_pipeline(name: str, tmp_path_factory):
    """(name, torch pipeline, our (family, params) loaded from the folder the converter CLI wrote); built once."""
    from tools.convert_weights.__main__ import main as convert_cli

    if name not in _PIPELINES:
        folder = tmp_path_factory.mktemp(name)
        pipe = torch_pipeline(name)
        pipe.save_pretrained(folder / "diffusers")
        convert_cli([name.replace("_", "-"), "--src", str(folder / "diffusers"), "--dst", str(folder / "jax"),
                     "--verify"])
        _PIPELINES[name] = name, pipe, flux.load(str(folder / "jax"), name=name, t5_length=T5_LENGTH)
    return _PIPELINES[name]


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pipeline(request, tmp_path_factory):
    return converted_pipeline(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def fill_pipeline(tmp_path_factory):
    return converted_pipeline("flux_fill", tmp_path_factory)


def run_ours(family, params, image, mask, noise, guidance: float):
    images = jnp.asarray(np.repeat(image[None], BATCH, 0), jnp.float32) / 127.5 - 1.0
    masks = jnp.asarray(np.repeat(mask[None, ..., None], BATCH, 0), jnp.float32) / 255.0
    inputs = {name: value for name, value in (("image", images), ("mask", masks)) if name in family.inputs}
    cond = {**family.encode_prompt(params, family.tokenize(PROMPTS), inputs, {}),
            **family.prepare_condition(params, inputs), "guidance": jnp.full((BATCH,), guidance)}
    shape = family.latent_shape(SIZE, SIZE)
    schedule = family.schedule(STEPS, shape)
    np.testing.assert_array_equal(schedule["sigma"], schedules.shifted_schedule(STEPS, shape[0] * shape[1])["sigma"])
    return euler_sample(family, params, cond, jnp.asarray(noise).reshape(BATCH, *shape), schedule), cond


def euler_sample(family, params, cond, x, schedule):
    """The flow Euler loop diffusers' Flux pipelines run from latents x: x += (sigma_next - sigma) * velocity."""
    step = jax.jit(family.denoise)
    for sigma, sigma_next in zip(schedule["sigma"], schedule["sigma_next"]):
        t = jnp.full((x.shape[0],), sigma)
        x = x + (sigma_next - sigma) * step(params, x, t, cond)
    return x


def run_diffusers(name, pipe, image, mask, noise, guidance: float, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_fill as fill_module

    # Our conditioning encodes with the posterior mean; make the Fill pipeline do the same (Kontext already does).
    original = fill_module.retrieve_latents
    monkeypatch.setattr(fill_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"))
    extra = {"mask_image": Image.fromarray(mask)} if name == "flux_fill" else {"_auto_resize": False,
                                                                                "max_area": SIZE * SIZE}
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, image=Image.fromarray(image), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=guidance, latents=torch.from_numpy(noise), output_type="latent",
                   max_sequence_length=T5_LENGTH, **extra)
    return out.images.numpy()


def test_pipeline_parity(pipeline, monkeypatch):
    name, pipe, (family, params) = pipeline
    image, mask, noise = inputs()
    guidance = 30.0 if name == "flux_fill" else 2.5
    ref = run_diffusers(name, pipe, image, mask, noise, guidance, monkeypatch)
    got, _ = run_ours(family, params, image, mask, noise, guidance)
    got = np.asarray(got).reshape(ref.shape)
    assert relative_error(got, ref) < 1e-4, name
    assert relative_error(got, noise) > 1e-2, "the steps moved the latents"


def test_prompt_encoding_matches_the_pipeline(fill_pipeline):
    name, pipe, (family, params) = fill_pipeline
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=PROMPTS, max_sequence_length=T5_LENGTH)
    cond = family.encode_prompt(params, family.tokenize(PROMPTS), {}, {})
    assert relative_error(cond["text"], text.numpy()) < 1e-4
    assert relative_error(cond["pooled"], pooled.numpy()) < 1e-4
    # precomputed embeddings (seed 001's t5_embedding_path) stand in for the encoders
    given = {"t5": text.numpy() + 1.0, "pooled": pooled.numpy() - 1.0}
    replaced = family.encode_prompt({}, family.tokenize(PROMPTS), {}, given)
    np.testing.assert_array_equal(replaced["text"], given["t5"])
    np.testing.assert_array_equal(replaced["pooled"], given["pooled"])


def test_fill_condition_matches_prepare_mask_latents(fill_pipeline):
    name, pipe, (family, params) = fill_pipeline
    image, mask, _ = inputs()
    images = jnp.asarray(image[None], jnp.float32) / 127.5 - 1.0
    masks = jnp.asarray(mask[None, ..., None], jnp.float32) / 255.0
    cond = family.prepare_condition(params, {"image": images, "mask": masks})["fill"]
    torch_image = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    torch_mask = torch.from_numpy(np.asarray(masks)).permute(0, 3, 1, 2)
    latents = pipe.vae.encode(torch_image * (1 - torch_mask)).latent_dist.mode()
    with torch.no_grad():
        mask_ref, masked_ref = pipe.prepare_mask_latents(torch_mask, latents, 1, 16, 1, SIZE, SIZE, torch.float32,
                                                         "cpu", None)
    tokens = np.asarray(flux.tokens(cond))
    assert relative_error(tokens[..., :64], masked_ref.detach().numpy()) < 1e-4
    np.testing.assert_array_equal(tokens[..., 64:], mask_ref.numpy())


def test_packing_and_ids_follow_diffusers():
    from diffusers import FluxFillPipeline

    latents = np.random.default_rng(0).standard_normal((2, 6, 10, 16)).astype(np.float32)  # (B, h, w, C)
    ref = FluxFillPipeline._pack_latents(torch.from_numpy(latents).permute(0, 3, 1, 2), 2, 16, 6, 10).numpy()
    packed = flux.pack(jnp.asarray(latents))
    assert packed.shape == (2, 3, 5, 64)
    np.testing.assert_array_equal(flux.tokens(packed), ref)
    np.testing.assert_array_equal(flux.unpack(packed), latents)
    np.testing.assert_array_equal(flux.image_ids(3, 5), FluxFillPipeline._prepare_latent_image_ids(1, 3, 5, "cpu",
                                                                                                     torch.float32))
    np.testing.assert_array_equal(flux.image_ids(3, 5, first=1.0)[:, 0], 1.0)


def test_tiny_families_of_every_variant():
    for name in flux.VARIANTS:
        family, _ = flux.tiny(name)
        assert family.name == name and family.parameterization.name == "velocity"
        assert isinstance(family.guidance, EmbeddedGuidance) and not family.guidance.needs_negative
        assert family.denoiser_key == "transformer" and family.latent_shape(SIZE, 64) == (SIZE // 4, 16, 64)
        assert family.inputs == {"flux_fill": ("image", "mask"), "flux_kontext": ("image",), "flux_dev": ()}[name]
    family, params = flux.tiny("flux_kontext", seed=1)  # Fill and Kontext conditioning run in the parity tests
    images = jnp.zeros((1, SIZE, SIZE, 3)).at[:, :8].set(0.5)
    cond = jax.jit(lambda p, tokens, inputs: {**family.encode_prompt(p, tokens, inputs, {}),
                                              **family.prepare_condition(p, inputs)})(
        params, family.tokenize(["a cat"]), {"image": images})
    x0 = jax.jit(family.encode_image)(params, images)
    assert x0.shape == (1, *family.latent_shape(SIZE, SIZE))
    velocity = jax.jit(family.denoise)(params, x0, jnp.full((1,), 0.5), {**cond, "guidance": jnp.full((1,), 3.5)})
    assert velocity.shape == x0.shape and bool(jnp.all(jnp.isfinite(velocity)))
    assert jax.jit(family.decode)(params, x0).shape == images.shape


def test_bad_inputs_are_named(tmp_path):
    family, params = flux.tiny("flux_fill")
    images = jnp.zeros((1, SIZE, SIZE, 3))
    with pytest.raises(ValueError, match=r"mask \(1, 16, 16, 1\): expected \(1, 32, 32, 1\)"):
        family.prepare_condition(params, {"image": images, "mask": jnp.zeros((1, 16, 16, 1))})
    with pytest.raises(ValueError, match=r"image \(1, 30, 30, 3\).*multiples of 4"):
        family.prepare_condition(params, {"image": jnp.zeros((1, 30, 30, 3)), "mask": jnp.zeros((1, 30, 30, 1))})
    with pytest.raises(ValueError, match="30x32 is not a multiple of 4"):
        family.latent_shape(30, 32)
    transformer, vae, clip, t5_config = flux.tiny_configs("flux_dev")
    with pytest.raises(ValueError, match="in_channels=64, flux_fill with this VAE needs 144"):
        flux.build_modules("flux_fill", transformer, vae, clip, t5_config)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        flux.load(str(tmp_path / "no_such_folder"), name="flux_fill")


def test_load_checks_every_shape_against_the_configs(fill_pipeline, tmp_path_factory):
    """A converted folder whose config disagrees with its weights is refused, naming each parameter; a skipped
    encoder (precomputed embeddings) is not read at all."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tampered") / "jax"
    source = next(p for p in tmp_path_factory.getbasetemp().glob("flux_fill*/jax"))
    shutil.copytree(source, folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_single_layers"] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"transformer/single_blocks/.*shape \(2, .*expected \(3, "):
        flux.load(str(folder), name="flux_fill", t5_length=T5_LENGTH)
    config["num_single_layers"] -= 1
    config_path.write_text(json.dumps(config))
    _, params = flux.load(str(folder), name="flux_fill", t5_length=T5_LENGTH, skip=("text_encoder_2",))
    assert "text_encoder_2" not in params and "text_encoder" in params
