"""The calligrapher family: the whole tiny sampling loop against a torch reference (diffusers' FluxFillPipeline
on the release's canvas, a torch SigLIP, the torch projection and image-prompt processors of
test_calligrapher_adapter.py; same weights through our converter CLI, same noise, 3 Euler steps at guidance 30)
on square and non-square sources; the canvas and its mask; the strip's stopped gradient; the converter's other
sources (a converted flux-fill folder, an earlier Calligrapher folder); the tiny family and bad inputs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from jax_inpaint_rl.algorithms import trainable
from jax_inpaint_rl.diffusion.guidance import EmbeddedGuidance
from jax_inpaint_rl.models import family as family_lib
from jax_inpaint_rl.models.calligrapher import family as calligrapher
from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.params_io import load_params
from tests import test_calligrapher_adapter as reference
from tests import test_flux_family as flux_tests
from tests.sd15_fixtures import randomize_norms, relative_error
from tools.convert_weights.__main__ import main as convert_cli

STEPS, BATCH, GUIDANCE = 3, 2, 30.0
SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=48,
              patch_size=12)
ADAPTER = dict(num_tokens=4, qformer_heads=2, qformer_query_tokens=3)
SIZES = {"square": (32, 32), "wide": (32, 48), "tall": (48, 32)}  # source (H, W); the strip is W x W


def torch_calligrapher(folder, seed: int = 0):
    """The torch reference, saved for the converter: FluxFillPipeline (saved before the processors are set),
    SigLIP, and the adapter as the release stores it (calligrapher.bin). Returns (pipe, siglip, mlp, qformer)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    pipe = flux_tests.torch_pipeline("flux_fill", seed)
    pipe.save_pretrained(folder / "diffusers")
    torch.manual_seed(seed + 1)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(**SIGLIP))
    with torch.no_grad():
        image_encoder.head.probe.normal_()
    image_encoder = randomize_norms(image_encoder.eval())
    image_encoder.save_pretrained(folder / "siglip")
    width = pipe.transformer.config.joint_attention_dim
    embed = SIGLIP["hidden_size"]
    mlp = randomize_norms(reference.TorchMLPProjection(embed, width, ADAPTER["num_tokens"]))
    qformer = randomize_norms(reference.TorchQFormerProjection(
        embed, width, ADAPTER["num_tokens"], ADAPTER["qformer_heads"], ADAPTER["qformer_query_tokens"]))
    processors = reference.attach_processors(pipe.transformer, width, seed=seed + 2)
    torch.save(reference.adapter_state(mlp, qformer, processors, "released"), folder / "calligrapher.bin")
    return pipe, image_encoder, mlp.eval(), qformer.eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calligrapher_pipeline")
    torch_parts = torch_calligrapher(folder)
    convert_cli(["calligrapher", "--flux", str(folder / "diffusers"), "--siglip", str(folder / "siglip"),
                 "--adapter", str(folder / "calligrapher.bin"), "--qformer-heads", str(ADAPTER["qformer_heads"]),
                 "--dst", str(folder / "jax"), "--verify"])
    return folder, torch_parts, calligrapher.load(str(folder / "jax"), t5_length=flux_tests.T5_LENGTH)


def inputs(height: int, width: int, seed: int = 0):
    """uint8 source (H, W), mask (H, W) (a text-line box), style (W, W) (the letterboxed reference)."""
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4:height // 2, width // 8:width - 4] = 255
    style = np.zeros((width, width, 3), np.uint8)
    style[width // 4:3 * width // 4] = rng.integers(0, 256, (width // 2, width, 3), np.uint8)  # a wide crop
    return source, mask, style


def as_unit(image: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.repeat(image[None], BATCH, 0), jnp.float32) / 127.5 - 1.0


def run_ours(family, params, source, mask, style, noise):
    batch_inputs = {"image": as_unit(source), "mask": jnp.asarray(np.repeat(mask[None, ..., None], BATCH, 0)) / 255.0,
                    "style_image": as_unit(style)}
    prompts = flux_tests.PROMPTS
    cond = {**family.encode_prompt(params, family.tokenize(prompts), batch_inputs, {}),
            **jax.jit(family.prepare_condition)(params, batch_inputs), "guidance": jnp.full((BATCH,), GUIDANCE)}
    shape = family.latent_shape(*source.shape[:2])
    schedule = family.schedule(STEPS, shape)
    return flux_tests.euler_sample(family, params, cond, jnp.asarray(noise).reshape(BATCH, *shape), schedule), cond


def run_torch(torch_parts, modules, source, mask, style, noise, monkeypatch):
    """The release's procedure: the reference above the source, a zero mask over it (sized strip + H rows: the
    release's strip + W is right only for square sources), Fill on the canvas, ip tokens from SigLIP's pooled
    output through MLP + Q-Former."""
    import diffusers.pipelines.flux.pipeline_flux_fill as fill_module

    pipe, image_encoder, mlp, qformer = torch_parts
    original = fill_module.retrieve_latents  # our conditioning encodes with the posterior mean
    monkeypatch.setattr(fill_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"))
    height, width = source.shape[:2]
    canvas = np.concatenate([style, source], axis=0)  # style is W x W: the strip as it is
    canvas_mask = np.concatenate([np.zeros((width, width), np.uint8), mask], axis=0)
    pixels = np.array(calligrapher.encoder_pixels(modules, as_unit(style)[:1]))  # SigLIP's input (resized)
    with torch.no_grad():
        pooled = image_encoder(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
        tokens = (mlp(pooled) + qformer(pooled)).repeat(BATCH, 1, 1)
        out = pipe(prompt=[calligrapher.template(p) for p in flux_tests.PROMPTS], image=Image.fromarray(canvas),
                   mask_image=Image.fromarray(canvas_mask), height=width + height, width=width,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise),
                   output_type="latent", max_sequence_length=flux_tests.T5_LENGTH,
                   joint_attention_kwargs={"image_emb": tokens})
    return out.images.numpy(), tokens.numpy()


@pytest.mark.parametrize("size", sorted(SIZES))
def test_sampling_loop_matches_the_torch_reference(pipeline, size, monkeypatch):
    _, torch_parts, (family, params) = pipeline
    height, width = SIZES[size]
    source, mask, style = inputs(height, width)
    shape = family.latent_shape(height, width)
    assert shape == ((width + height) // 4, width // 4, 64)
    noise = np.random.default_rng(1).standard_normal((BATCH, shape[0] * shape[1], 64)).astype(np.float32)
    modules = calligrapher.folder_family(str(pipeline[0] / "jax"))[1]
    ref, ref_tokens = run_torch(torch_parts, modules, source, mask, style, noise, monkeypatch)
    got, cond = run_ours(family, params, source, mask, style, noise)
    tokens = calligrapher.image_tokens(modules, params["denoiser"], cond["image_embeds"])
    assert relative_error(tokens, ref_tokens) < 1e-5
    got = np.asarray(got).reshape(ref.shape)
    error = relative_error(got, ref)
    print(f"{size}: loop relative error {error:.2e}, image tokens {relative_error(tokens, ref_tokens):.2e}")
    assert error < 1e-4, (size, error)
    assert relative_error(got, noise) > 1e-2, "the steps moved the latents"
    images = jax.jit(family.decode)(params, jnp.asarray(got).reshape(BATCH, *shape))
    assert images.shape == (BATCH, height, width, 3), "decode crops the strip off"


def test_canvas_and_its_mask_for_a_non_square_source():
    """The mask canvas is zeros over the strip (W x W) and the mask below it: (W + H) x W, not the release's
    strip + W rows; the image canvas holds the strip and the source."""
    height, width = 24, 40
    source, mask, style = inputs(height, width)
    image, mask_canvas = calligrapher.canvas(as_unit(source), jnp.asarray(mask[None, ..., None] / 255.0),
                                             as_unit(style))
    assert image.shape == (BATCH, width + height, width, 3) and mask_canvas.shape == (1, width + height, width, 1)
    np.testing.assert_array_equal(mask_canvas[0, :width], 0)
    np.testing.assert_array_equal(mask_canvas[0, width:, :, 0], mask / 255.0)
    np.testing.assert_allclose(image[0, :width], as_unit(style)[0], atol=0)
    np.testing.assert_allclose(image[0, width:], as_unit(source)[0], atol=0)
    family, params = calligrapher.tiny()
    big_style = jnp.zeros((1, 64, 64, 3)).at[:, 16:48].set(0.5)  # resized to the source width
    cond = jax.jit(family.prepare_condition)(params, {"image": as_unit(source)[:1], "style_image": big_style,
                                                      "mask": jnp.asarray(mask[None, ..., None] / 255.0)})
    f = 4  # the tiny VAE (2x) with 2x2 packing
    assert cond["fill"].shape == (1, (width + height) // f, width // f, 64 + 16)
    mask_tokens = np.asarray(cond["fill"][..., 64:])
    np.testing.assert_array_equal(mask_tokens[0, :width // f], 0)  # nothing to fill in the strip
    assert mask_tokens[0, width // f:].max() == 1


def test_tiny_family_contract_and_the_strips_gradient():
    family, params = family_lib.factory("calligrapher")("calligrapher", path=None, seed=0)
    assert family.name == "calligrapher" and family.inputs == ("image", "mask", "style_image")
    assert family.style_resolution == calligrapher.TINY_STYLE_RESOLUTION and family.denoiser_key == "denoiser"
    assert isinstance(family.guidance, EmbeddedGuidance) and family.parameterization.name == "velocity"
    assert set(params) == {"denoiser", "vae", "text_encoder", "text_encoder_2", "image_encoder"}
    assert set(params["denoiser"]) == {"transformer", "image_proj", "ip_attention"}
    assert family.latent_shape(32, 32) == (16, 8, 64)
    images = jnp.zeros((2, 32, 32, 3)).at[:, 8:].set(0.4)
    x0 = jax.jit(family.encode_image)(params, images)
    assert x0.shape == (2, 16, 8, 64) and float(jnp.abs(x0[:, :8]).max()) == 0.0  # strip rows: zeros
    assert jax.jit(family.decode)(params, x0).shape == images.shape
    batch = {"image": images, "mask": jnp.zeros((2, 32, 32, 1)).at[:, 4:12, 2:30].set(1.0),
             "style_image": jnp.full((2, 32, 32, 3), 0.2)}
    tokens = family.tokenize(["Hello", "The text is 'x'."])
    cond = jax.jit(lambda p, b: {**family.encode_prompt(p, tokens, b, {}), **family.prepare_condition(p, b)})(
        params, batch)
    cond = {**cond, "guidance": jnp.full((2,), 30.0)}
    x = jax.random.normal(jax.random.key(0), x0.shape)

    @jax.jit
    def grads(adapter):
        def rows(adapter, part):
            denoiser = {**params["denoiser"], **adapter}
            velocity = family.denoise({**params, "denoiser": denoiser}, x, jnp.full((2,), 0.6), cond)
            return jnp.sum(velocity[:, :8] if part == "strip" else velocity[:, 8:])

        return jax.grad(rows)(adapter, "strip"), jax.grad(rows)(adapter, "image")

    strip, image = grads({name: params["denoiser"][name] for name in ("image_proj", "ip_attention")})
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(strip))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(image))


def test_template_and_trainable_patterns():
    assert calligrapher.template("Delia") == "The text is 'Delia'."
    assert calligrapher.template("The text is 'x'.") == "The text is 'x'."
    family, params = calligrapher.tiny()
    tokens = family.tokenize(["Delia"])
    np.testing.assert_array_equal(tokens["t5"], flux.hash_tokenize(["The text is 'Delia'."])["t5"])
    train = dict(trainable_pattern="/(image_proj|ip_attention)/", lora_pattern="", lora_rank=2, lora_alpha=2.0)
    subset = type("Train", (), dict(train, trainable="subset"))
    merge, base, tree = trainable.build(subset, params["denoiser"], jax.random.key(0))
    assert set(tree) == {"image_proj", "ip_attention"}
    both = type("Train", (), dict(train, trainable="subset+lora"))
    _, _, tree = trainable.build(both, params["denoiser"], jax.random.key(0))
    assert set(tree) == {"image_proj", "ip_attention", "transformer"}, "the default LoRA targets are Flux's"


def test_bad_inputs_are_named():
    family, params = calligrapher.tiny()
    good = {"image": jnp.zeros((1, 32, 32, 3)), "mask": jnp.zeros((1, 32, 32, 1)),
            "style_image": jnp.zeros((1, 32, 32, 3))}
    with pytest.raises(ValueError, match=r"style_image \(1, 32, 16, 3\).*letterboxed onto a square"):
        family.prepare_condition(params, {**good, "style_image": jnp.zeros((1, 32, 16, 3))})
    with pytest.raises(ValueError, match=r"mask \(1, 16, 16, 1\): expected \(1, 32, 32, 1\)"):
        family.prepare_condition(params, {**good, "mask": jnp.zeros((1, 16, 16, 1))})
    with pytest.raises(ValueError, match="30x32 is not a multiple of 4"):
        family.latent_shape(30, 32)
    with pytest.raises(ValueError, match="builds 'calligrapher'"):
        calligrapher.build("flux_fill", path=None)


def test_converter_reuses_converted_flux_and_calligrapher_folders(pipeline, tmp_path):
    """--flux may be a flux-fill output (hard-linked) or an earlier Calligrapher folder (swap the adapter, keep
    SigLIP); the results load to the same parameters."""
    folder, _, (_, params) = pipeline
    convert_cli(["flux-fill", "--src", str(folder / "diffusers"), "--dst", str(tmp_path / "fill")])
    std = tmp_path / "ip-adapter.bin"
    convert_cli(["export-calligrapher", "--src", str(folder / "jax"), "--dst", str(std)])
    convert_cli(["calligrapher", "--flux", str(tmp_path / "fill"), "--siglip", str(folder / "siglip"), "--adapter",
                 str(std), "--qformer-heads", "2", "--dst", str(tmp_path / "a")])
    linked = [os.stat(p / "params" / "transformer.safetensors").st_ino for p in (tmp_path / "fill", tmp_path / "a")]
    assert linked[0] == linked[1], "the Flux files are hard links, not copies"
    convert_cli(["calligrapher", "--flux", str(tmp_path / "a"), "--adapter", str(folder / "calligrapher.bin"),
                 "--qformer-heads", "2", "--dst", str(tmp_path / "b")])
    for other in ("a", "b"):
        _, loaded = calligrapher.load(str(tmp_path / other), t5_length=flux_tests.T5_LENGTH)
        jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert not (tmp_path / "b" / "flux_fill.json").exists() and (tmp_path / "b" / "calligrapher.json").exists()
    with pytest.raises(ValueError, match="asked to load it as flux_fill"):
        flux.load(str(tmp_path / "b"), name="flux_fill")
    with pytest.raises(ValueError, match="--siglip is required"):
        convert_cli(["calligrapher", "--flux", str(tmp_path / "fill"), "--adapter", str(std), "--dst",
                     str(tmp_path / "c")])
    assert "image_encoder" in load_params(tmp_path / "b" / "params")
    torch.save({"image_proj_mlp": {}, "attn_adapter": {}}, tmp_path / "empty.bin")
    with pytest.raises(Exception, match=r"missing.*image_proj_mlp\.proj\.0\.weight"):
        convert_cli(["calligrapher", "--flux", str(tmp_path / "fill"), "--siglip", str(folder / "siglip"),
                     "--adapter", str(tmp_path / "empty.bin"), "--dst", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists(), "a bad adapter is refused before anything is written"
