"""SD3 families: whole-pipeline parity with diffusers on the folders the converter CLI writes (same weights, same
initial noise, 3 flow Euler steps with CFG 5, a batch of 2 prompts, non-square images):
- StableDiffusion3Pipeline vs `sd3`: an SD3.5-Medium-style transformer (QK norm, dual attention) with the T5,
  and an SD3-style one without text_encoder_3 (the T5 part zeros, the CLIP part padded, another shift); the
  prompt embeddings (positive and the "" negative), the latents and the decoded images;
- StableDiffusion3InpaintPipeline (strength 1) with a 33-channel transformer vs `sd3_inpaint`: the mask and
  masked-image latents against the pipeline's own preprocessing (grey mask pixels on both sides of 0.5), and
  the latents; with a 16-channel transformer, our rollout pasting the re-noised source outside the mask after
  every step against the pipeline's; the pasted rollout's log-probs (the region only, NumPy) and their re-scoring;
then the tiny families through the trainer's call chain, and bad inputs named."""
import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from jax_inpaint_rl import programs
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.guidance import BatchedCFG
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models import family as family_lib
from jax_inpaint_rl.models.params_io import flatten, read_json
from jax_inpaint_rl.models.sd3 import family as sd3
from tests.sd15_fixtures import clip_tokenizer, randomize_norms, relative_error
from tests.test_flux_family import T5, t5_tokenizer
from tests.test_sd3_transformer import CLIP_G, CLIP_L, CONFIGS, PIPE_TRANSFORMER, VAE, torch_transformer

HEIGHT, WIDTH, STEPS, BATCH, SCALE, T5_LENGTH = 24, 32, 3, 2, 5.0, 8  # VAE factor 2: (12, 16) latents
PROMPTS = ["a cat", "a red sign"]
TOLERANCE = 1e-4
CLIP_UNK, T5_UNK = 57, 2
# name -> (diffusers pipeline, transformer config, with a T5, scheduler shift, our family)
PIPELINES = {
    "sd35_t5": ("StableDiffusion3Pipeline", PIPE_TRANSFORMER, True, 3.0, "sd3"),
    # the CLIPs' 16 + 16 features padded to 40; no T5: its 8 tokens are zeros of width 40
    "sd3_no_t5": ("StableDiffusion3Pipeline", dict(CONFIGS["sd3"][0], in_channels=16, out_channels=16,
                                                   joint_attention_dim=40, pooled_projection_dim=40), False, 2.0,
                  "sd3"),
    "inpaint": ("StableDiffusion3InpaintPipeline", dict(PIPE_TRANSFORMER, in_channels=33), True, 3.0, "sd3_inpaint"),
    # a plain SD3.5 transformer: the pipeline pastes the noised source outside the mask after every step
    "inpaint_paste": ("StableDiffusion3InpaintPipeline", PIPE_TRANSFORMER, True, 3.0, "sd3_inpaint"),
}


def clip_g_tokenizer():
    """The CLIP tokenizer padding with another token, as CLIP-G's pads with '!' (a mixed-up tokenizer shows)."""
    tokenizer = clip_tokenizer()
    tokenizer.pad_token = "<unused54>"
    return tokenizer


def torch_pipeline(name: str, seed: int = 0):
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    pipeline, transformer, with_t5, shift, _ = PIPELINES[name]
    torch.manual_seed(seed)
    models = dict(vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                  text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    if with_t5:
        models["text_encoder_3"] = T5EncoderModel(T5Config(**T5))
    models = {k: randomize_norms(m.eval()) for k, m in models.items()}  # eval: T5's dropout is on by default
    return getattr(diffusers, pipeline)(
        transformer=torch_transformer(transformer, seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_g_tokenizer(), tokenizer_3=t5_tokenizer() if with_t5 else None,
        **{"text_encoder_3": None, **models})


_CONVERTED = {}


def converted(name: str, tmp_path_factory):
    """(name, torch pipeline, converted folder, our (family, params) loaded from it); built once per session."""
    from tools.convert_weights.__main__ import main as convert_cli

    if name not in _CONVERTED:
        folder = tmp_path_factory.mktemp(name)
        pipe = torch_pipeline(name)
        pipe.save_pretrained(folder / "diffusers")
        convert_cli(["sd3", "--src", str(folder / "diffusers"), "--dst", str(folder / "jax")])
        family = sd3.load(str(folder / "jax"), name=PIPELINES[name][4], t5_length=T5_LENGTH)
        _CONVERTED[name] = name, pipe, folder / "jax", family
    return _CONVERTED[name]


@pytest.fixture(scope="module", params=["sd35_t5", "sd3_no_t5"])
def text_to_image(request, tmp_path_factory):
    return converted(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def no_t5(tmp_path_factory):
    return converted("sd3_no_t5", tmp_path_factory)


def examples(seed: int = 0):
    """Two different images and masks (grey pixels on both sides of 0.5), and the initial noise (NCHW)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (BATCH, HEIGHT, WIDTH, 3), np.uint8)
    masks = np.zeros((BATCH, HEIGHT, WIDTH), np.uint8)
    masks[0, 4:16, 6:26], masks[0, 4:16, 26:28], masks[0, 16:18, 6:26] = 255, 140, 120
    masks[1, 10:22, 2:14], masks[1, 2:6, 20:30] = 255, 200
    noise = rng.standard_normal((BATCH, 16, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    return images, masks, noise


def run_ours(family, params, images, masks, noise):
    """(latents (B, h, w, 16), the {'positive', 'negative'} cond) from the trainer's encode program and the
    family's guided denoiser in the Euler loop diffusers runs: x += (sigma_next - sigma) * velocity."""
    inputs = {"image": jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
              "mask": jnp.asarray(masks[..., None], jnp.float32) / 255.0}
    inputs = {name: value for name, value in inputs.items() if name in family.inputs}
    cond = programs.make_encode(family)(params, family.tokenize(PROMPTS, inputs),
                                        family.tokenize([""] * BATCH, inputs), inputs, {})
    guided = jax.jit(family.guidance.guided(family.denoise, SCALE))
    schedule = family.schedule(STEPS, family.latent_shape(HEIGHT, WIDTH))
    x = jnp.asarray(noise.transpose(0, 2, 3, 1))
    for sigma, sigma_next in zip(schedule["sigma"], schedule["sigma_next"]):
        x = x + (sigma_next - sigma) * guided(params, x, jnp.full((BATCH,), sigma), cond)
    return x, cond


def run_diffusers(pipe, noise, output_type: str, **extra):
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=SCALE,
                   latents=torch.from_numpy(noise), output_type=output_type, max_sequence_length=T5_LENGTH, **extra)
    return out.images.numpy() if output_type == "latent" else out.images


def nhwc(tensor) -> np.ndarray:
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def check_tokenizers(family):
    """The folder's tokenizers give real, distinct ids (not every word unknown), CLIP-G its own padding."""
    ids = family.tokenize(PROMPTS)
    for name in ("clip_l", "clip_g"):
        words = ids[name][:, 1:3]  # after BOS: 'a', then 'cat' / 'r'
        assert CLIP_UNK not in words and not np.array_equal(ids[name][0], ids[name][1]), (name, ids[name])
    assert not np.array_equal(ids["clip_l"], ids["clip_g"])  # pads 57 and 54
    if "t5" in ids:
        assert T5_UNK not in ids["t5"] and not np.array_equal(ids["t5"][0], ids["t5"][1]), ids["t5"]


def test_text_to_image_parity(text_to_image):
    name, pipe, folder, (family, params) = text_to_image
    check_tokenizers(family)
    shift = read_json(folder / "scheduler" / "scheduler_config.json")["shift"]
    np.testing.assert_array_equal(family.schedule(STEPS, None)["sigma"], schedules.sd3_schedule(STEPS, shift)["sigma"])
    images, masks, noise = examples()
    got, cond = run_ours(family, params, images, masks, noise)
    with torch.no_grad():
        text, negative_text, pooled, negative_pooled = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, max_sequence_length=T5_LENGTH)
    for side, (ref_text, ref_pooled) in {"positive": (text, pooled), "negative": (negative_text,
                                                                                  negative_pooled)}.items():
        assert cond[side]["text"].shape == (BATCH, 16 + T5_LENGTH, pipe.transformer.config.joint_attention_dim)
        assert relative_error(cond[side]["text"], ref_text.numpy()) <= TOLERANCE, (name, side)
        assert relative_error(cond[side]["pooled"], ref_pooled.numpy()) <= TOLERANCE, (name, side)

    ref = run_diffusers(pipe, noise, "latent")
    assert relative_error(got, ref.transpose(0, 2, 3, 1)) <= TOLERANCE, name
    assert relative_error(got, noise.transpose(0, 2, 3, 1)) > 1e-2, "the steps moved the latents"
    decoded = (np.clip(np.asarray(jax.jit(family.decode)(params, got)), -1.0, 1.0) + 1.0) / 2.0
    reference_images = run_diffusers(pipe, noise, "np")
    assert decoded.shape == reference_images.shape == (BATCH, HEIGHT, WIDTH, 3)
    assert relative_error(decoded, reference_images) <= TOLERANCE, name


def encode_with_the_mean(monkeypatch):
    """Our conditioning encodes images with the VAE's posterior mean; make the inpainting pipeline do the same."""
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint as inpaint_module

    original = inpaint_module.retrieve_latents
    monkeypatch.setattr(inpaint_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"))


def test_inpaint_parity(tmp_path_factory, monkeypatch):
    _, pipe, _, (family, params) = converted("inpaint", tmp_path_factory)
    encode_with_the_mean(monkeypatch)
    images, masks, noise = examples()
    got, cond = run_ours(family, params, images, masks, noise)

    pil_images, pil_masks = [Image.fromarray(i) for i in images], [Image.fromarray(m) for m in masks]
    mask_condition = pipe.mask_processor.preprocess(pil_masks, height=HEIGHT, width=WIDTH)
    masked = pipe.image_processor.preprocess(pil_images, height=HEIGHT, width=WIDTH) * (mask_condition < 0.5)
    with torch.no_grad():
        mask_ref, masked_ref = pipe.prepare_mask_latents(mask_condition, masked, BATCH, 1, HEIGHT, WIDTH,
                                                         torch.float32, "cpu", None, False)
    for side in ("positive", "negative"):
        np.testing.assert_array_equal(cond[side]["mask"], nhwc(mask_ref))
        assert relative_error(cond[side]["masked_latents"], nhwc(masked_ref)) <= TOLERANCE
    assert 0 < float(cond["positive"]["mask"].mean()) < 1

    ref = run_diffusers(pipe, noise, "latent", image=pil_images, mask_image=pil_masks, strength=1.0)
    assert relative_error(got, ref.transpose(0, 2, 3, 1)) <= TOLERANCE
    assert relative_error(got, noise.transpose(0, 2, 3, 1)) > 1e-2, "the steps moved the latents"


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_by_pasting_parity(tmp_path_factory, monkeypatch, strength):
    """A 16-channel transformer: our rollout (the ODE sampler, Family.paste_region) against the pipeline's
    per-step paste of the re-noised source; outside the mask the clean result is the source's latents. With
    strength 0.6 both start from the source noised to the second of 3 sigmas and run 2 steps (the pipeline draws
    its noise from a seeded generator: the same draw is our initial noise)."""
    _, pipe, _, (family, params) = converted("inpaint_paste", tmp_path_factory)
    encode_with_the_mean(monkeypatch)
    images, masks, noise = examples()
    if strength < 1:
        noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0)).numpy()
    inputs = {"image": jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
              "mask": jnp.asarray(masks[..., None], jnp.float32) / 255.0}
    cond = programs.make_encode(family)(params, family.tokenize(PROMPTS, inputs),
                                        family.tokenize([""] * BATCH, inputs), inputs, {})
    assert set(cond["positive"]) == {"text", "pooled", "mask", "source_latents"}
    schedule = schedules.from_strength(family.schedule(STEPS, None), strength)
    policy = programs.make_policy(family, schedule, Sampler("flow_grpo", 0.7), SCALE)
    steps = schedules.num_steps(schedule)
    assert steps == (STEPS if strength == 1 else 2)
    x_init = jnp.asarray(noise.transpose(0, 2, 3, 1))
    trajectory = jax.jit(lambda p, c, x: rollout_lib.rollout(
        policy.guided, p, c, x, policy.schedule, policy.sampler, jax.random.key(0), jnp.zeros(steps),
        paste=policy.paste(c)))(params["transformer"], cond, x_init)
    got = trajectory.latents[:, -1]

    pil_images, pil_masks = [Image.fromarray(i) for i in images], [Image.fromarray(m) for m in masks]
    generated = dict(latents=torch.from_numpy(noise)) if strength == 1 else dict(
        latents=None, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=SCALE,
                   output_type="latent", max_sequence_length=T5_LENGTH, image=pil_images, mask_image=pil_masks,
                   strength=strength, **generated).images.numpy()
    assert relative_error(got, ref.transpose(0, 2, 3, 1)) <= TOLERANCE
    region, source = cond["positive"]["mask"], cond["positive"]["source_latents"]
    outside = np.broadcast_to(np.asarray(region) == 0, got.shape)
    np.testing.assert_allclose(np.asarray(got)[outside], np.asarray(source)[outside], rtol=0, atol=1e-6)
    assert relative_error(np.asarray(got)[~outside], noise.transpose(0, 2, 3, 1)[~outside]) > 1e-2


def test_pasted_log_probs_cover_the_region_and_are_on_policy():
    """The SDE rollout's log-probs are the Gaussian density averaged over the region only (NumPy), and
    re-scoring each stored transition gives them back (GRPO's first ratio is 1)."""
    family, params = sd3.tiny("sd3_inpaint", seed=3)
    assert family.paste_region is not None
    rng = np.random.default_rng(1)
    inputs = {"image": jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32),
              "mask": jnp.zeros((2, 32, 32, 1)).at[0, 4:20, 8:28].set(1.0).at[1, 16:32, 0:12].set(1.0)}
    cond = programs.make_encode(family)(params, family.tokenize(["a", "b"], inputs), family.tokenize(["", ""], inputs),
                                        inputs, {})
    policy = programs.make_policy(family, family.schedule(3, None), Sampler("flow_grpo", 0.7), 4.0)
    x_init = jax.random.normal(jax.random.key(1), (2, *family.latent_shape(32, 32)))
    trajectory = rollout_lib.rollout(policy.guided, params["transformer"], cond, x_init, policy.schedule,
                                     policy.sampler, jax.random.key(2), paste=policy.paste(cond))
    region = np.broadcast_to(np.asarray(cond["positive"]["mask"], np.float64), trajectory.means.shape[:1] +
                             trajectory.means.shape[2:])
    for step in range(3):
        x_next = np.asarray(trajectory.latents[:, step + 1], np.float64)
        mean, std = np.asarray(trajectory.means[:, step], np.float64), np.asarray(trajectory.stds[:, step], np.float64)
        std = std.reshape(-1, 1, 1, 1)
        density = -((x_next - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
        want = (region * density).sum(axis=(1, 2, 3)) / region.sum(axis=(1, 2, 3))
        np.testing.assert_allclose(trajectory.log_probs[:, step], want, rtol=1e-4)
        scored = rollout_lib.score_transitions(
            policy.guided, params["transformer"], cond, trajectory.latents[:, step], trajectory.latents[:, step + 1],
            jnp.full((2,), step), policy.schedule, policy.sampler, jnp.ones(3), region=policy.paste(cond)[0])
        np.testing.assert_allclose(scored.log_prob, trajectory.log_probs[:, step], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sd3.VARIANTS)
def test_tiny_family_runs_the_trainer_chain(name):
    family, params = family_lib.factory(name)(name, path=None, seed=1)
    assert family.name == name and family.inputs == sd3.INPUTS[name] and family.denoiser_key == "transformer"
    assert family.parameterization.name == "velocity" and isinstance(family.guidance, BatchedCFG)
    assert family.text_encoders == ("text_encoder", "text_encoder_2", "text_encoder_3") and not family.text_embeddings
    assert set(params) == {"transformer", "vae", *family.text_encoders}
    paths = ["/" + path for path in flatten(params["transformer"])]
    for pattern, _ in family.tensor_rules:  # every rule names real layers
        assert any(re.search(pattern, path) for path in paths), pattern
    np.testing.assert_array_equal(family.schedule(2, None)["sigma"], schedules.sd3_schedule(2, 3.0)["sigma"])
    shape = family.latent_shape(32, 24)
    assert shape == (16, 12, 16)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 24, 3)), jnp.float32)
    inputs = {"image": images, "mask": jnp.zeros((2, 32, 24, 1)).at[:, 8:20, 4:16].set(1.0)}
    inputs = {k: v for k, v in inputs.items() if k in family.inputs}
    cond = programs.make_encode(family)(params, family.tokenize(["a cat", "a red sign"], inputs),
                                        family.tokenize(["", ""], inputs), inputs, {})
    text = cond["positive"]["text"]
    assert text.shape == (2, 77 + sd3.TINY_T5_LENGTH, 32) and cond["positive"]["pooled"].shape == (2, 32)
    assert not np.allclose(text, cond["negative"]["text"]), "the prompt reaches the embedding"
    if "mask" in family.inputs:  # the tiny sd3_inpaint has a 16-channel transformer: it pastes the source
        assert cond["positive"]["mask"].shape == (2, 16, 12, 1) and cond["positive"]["source_latents"].shape == (
            2, *shape)
        assert family.paste_region is not None
    x0 = jax.jit(family.encode_image)(params, images)
    assert x0.shape == (2, *shape)
    velocity = jax.jit(family.guidance.guided(family.denoise, 5.0))(params, x0, jnp.full((2,), 0.5), cond)
    assert velocity.shape == x0.shape and bool(jnp.all(jnp.isfinite(velocity)))
    assert jax.jit(family.decode)(params, x0).shape == images.shape
    assert family_lib.factory(name)(name, path=None, weights=False)[1] is None


def test_bad_inputs_are_named(no_t5, tmp_path):
    _, _, folder, _ = no_t5
    with pytest.raises(ValueError, match=r"jax: components do not fit together: transformer in_channels=20, "
                                         r"sd3_inpaint with this VAE needs 16 or 33"):
        sd3.build_modules("sd3_inpaint", dataclasses.replace(sd3.tiny_configs()[0], in_channels=20),
                          *sd3.tiny_configs()[1:], source="jax")
    with pytest.raises(ValueError, match=r"in_channels=33, sd3 with this VAE needs 16 \(a transformer for "
                                         r"sd3_inpaint\)"):
        sd3.build_modules("sd3", dataclasses.replace(sd3.tiny_configs()[0], in_channels=33),
                          *sd3.tiny_configs()[1:])
    with pytest.raises(ValueError, match="unknown SD3 variant 'sd3_edit'"):
        sd3.build_modules("sd3_edit", *sd3.tiny_configs())

    def broken(name: str, change) -> str:
        copy = tmp_path / name
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("params"))
        change(copy)
        return str(copy)

    gone = broken("no_tokenizer_2", lambda copy: shutil.rmtree(copy / "tokenizer_2"))
    with pytest.raises(FileNotFoundError, match="no_tokenizer_2/tokenizer_2: tokenizer folder not found"):
        sd3.folder_family(gone, "sd3")
    gone = broken("no_scheduler", lambda copy: shutil.rmtree(copy / "scheduler"))
    with pytest.raises(FileNotFoundError, match="no_scheduler/scheduler/scheduler_config.json: config file not found"):
        sd3.folder_family(gone, "sd3")
    def t5_config(copy):
        (copy / "text_encoder_3").mkdir()
        (copy / "text_encoder_3" / "config.json").write_text(json.dumps(dict(T5, d_model=40)))

    t5_without_tokenizer = broken("t5_no_tokenizer", t5_config)
    with pytest.raises(FileNotFoundError, match="t5_no_tokenizer/tokenizer_3: T5 tokenizer folder not found"):
        sd3.folder_family(t5_without_tokenizer, "sd3")

    def dynamic(copy):
        path = copy / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps(dict(read_json(path), use_dynamic_shifting=True)))

    with pytest.raises(ValueError, match=r"scheduler_config.json: unsupported scheduler settings: "
                                         r"use_dynamic_shifting=True \(supported: False\)"):
        sd3.folder_family(broken("dynamic", dynamic), "sd3")

    family, params = sd3.tiny("sd3_inpaint")
    image = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"mask shape \(1, 16, 16, 1\): expected \(1, 32, 32, 1\)"):
        family.prepare_condition(params, {"image": image, "mask": jnp.zeros((1, 16, 16, 1))})
    with pytest.raises(ValueError, match=r"image size 30x32: expected multiples of 4"):
        family.prepare_condition(params, {"image": jnp.zeros((1, 30, 32, 3)), "mask": jnp.zeros((1, 30, 32, 1))})
    with pytest.raises(ValueError, match=r"sd3_inpaint: image size 132x32: expected multiples of 4 .* at most 128"):
        family.latent_shape(132, 32)
    with pytest.raises(ValueError, match=r"precomputed embeddings \['t5'\] given; the SD3 families take none"):
        sd3.build("sd3", path=None, embeddings=frozenset({"t5"}))
