"""SD1.5 converter and family against diffusers: CLI --verify, pipeline parity, export round trip, bad input.

A tiny random StableDiffusionInpaintPipeline is saved once per module, converted with the CLI, and
reused by every test.
"""
import contextlib
import io
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jax_inpaint_rl.diffusion import rollout, steps
from jax_inpaint_rl.models.sd15 import family as sd15_inpaint
from tests import sd15_fixtures as fx
from tools.convert_weights import sd15
from tools.convert_weights.__main__ import main as cli
from tools.convert_weights.common import ConversionError

TOLERANCE = 1e-4  # max |flax - torch| / max |torch|, fp32


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(diffusers folder, converted folder, CLI output of `sd15-inpaint --verify`)."""
    root = tmp_path_factory.mktemp("sd15")
    src, dst = str(root / "diffusers"), str(root / "converted")
    fx.save_tiny_pipeline(src)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        cli(["sd15-inpaint", "--src", src, "--dst", dst, "--verify"])
    return src, dst, output.getvalue()


def test_cli_writes_documented_layout_and_verify_passes(converted):
    _, dst, output = converted
    for path in ("params/unet.safetensors", "params/vae.safetensors", "params/text_encoder.safetensors",
                 "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer", "scheduler",
                 "model_index.json", "sd15_inpaint.json"):
        assert os.path.exists(os.path.join(dst, path)), path
    relative = dict(re.findall(r"^(.+?)\s+max\|diff\| \S+\s+relative (\S+)$", output, re.M))
    assert set(relative) == {"text_encoder hidden", "text_encoder pooled", "unet epsilon", "vae encode mean",
                             "vae decode"}, output
    assert all(float(v) <= TOLERANCE for v in relative.values()), output


def test_pipeline_matches_diffusers(converted, monkeypatch):
    """Same weights, prompt, image, mask and initial noise; 3 DDIM steps with CFG 7.5: same images."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

    src, dst, _ = converted
    # the pipeline samples the masked-image posterior; the family uses its mean (deterministic condition)
    monkeypatch.setattr(inpaint_module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    rng = np.random.default_rng(0)
    image01 = rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, 6:22, 10:30] = 1.0
    noise = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    expected = pipe(prompt=["a red cat"], image=image01, mask_image=mask, height=32, width=32, strength=1.0,
                    num_inference_steps=3, guidance_scale=7.5, latents=fx.nchw(noise), output_type="np").images

    family, params = sd15_inpaint.load(dst)

    def generate(params, tokens, negative_tokens, image, mask, noise):
        inputs = {"image": image, "mask": mask}
        image_cond = family.prepare_condition(params, inputs)
        cond = {"positive": {**family.encode_prompt(params, tokens, inputs, {}), **image_cond},
                "negative": {**family.encode_prompt(params, negative_tokens, inputs, {}), **image_cond}}
        trajectory = rollout.rollout(family.guidance.guided(family.denoise, 7.5), params, cond, noise,
                                     family.schedule(3, noise.shape[1:]), steps.Sampler("ddim", 0.0),
                                     jax.random.key(0))
        return family.decode(params, trajectory.latents[:, -1])

    decoded = fx.run_compiled(generate, params, family.tokenize(["a red cat"]), family.tokenize([""]),
                              jnp.asarray(image01 * 2 - 1), jnp.asarray(mask), jnp.asarray(noise))
    got = np.clip(np.asarray(decoded) / 2 + 0.5, 0, 1)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max(), np.abs(got - expected).max()


def test_export_round_trip_is_exact(converted, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    src, dst, _ = converted
    cli(["export-sd15", "--src", dst, "--dst", str(tmp_path / "exported")])
    original = StableDiffusionInpaintPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    exported = StableDiffusionInpaintPipeline.from_pretrained(str(tmp_path / "exported"), safety_checker=None,
                                                              requires_safety_checker=False)
    for component in ("unet", "vae", "text_encoder"):
        before, after = getattr(original, component).state_dict(), getattr(exported, component).state_dict()
        assert before.keys() == after.keys(), component
        for key in before:
            assert torch.equal(before[key], after[key]), f"{component}: {key}"


def _broken_copy(src: str, dst: str, edit) -> str:
    """A copy of the diffusers folder whose UNet state dict went through `edit`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("diffusion_pytorch_model.safetensors"))
    for component in ("vae", "unet"):
        state = load_file(os.path.join(src, component, "diffusion_pytorch_model.safetensors"))
        if component == "unet":
            edit(state)
        save_file(state, os.path.join(dst, component, "diffusion_pytorch_model.safetensors"))
    return dst


def _rename(state):
    state["conv_in.wieght"] = state.pop("conv_in.weight")


def _drop(state):
    del state["mid_block.attentions.0.proj_in.bias"]


def _reshape(state):
    state["time_embedding.linear_1.weight"] = state["time_embedding.linear_1.weight"][:, :-1].contiguous()


@pytest.mark.parametrize("edit, named", [
    (_rename, ["unknown keys", "conv_in.wieght", "missing keys", "conv_in/kernel"]),
    (_drop, ["missing keys", "mid_block/attentions_0/proj_in/bias"]),
    (_reshape, ["wrong shapes", "time_embedding.linear_1.weight -> time_embedding_linear_1/kernel: got (31, 128), "
                                "expected (32, 128)"]),
])
def test_bad_checkpoint_names_the_key(converted, tmp_path, edit, named):
    src = _broken_copy(converted[0], str(tmp_path / "broken"), edit)
    with pytest.raises(ConversionError) as error:
        cli(["sd15-inpaint", "--src", src, "--dst", str(tmp_path / "out")])
    message = str(error.value)
    assert "diffusion_pytorch_model.safetensors" in message
    for text in named:
        assert text in message, message


def test_bfloat16_output_and_missing_tokenizer(converted, tmp_path):
    src, _, _ = converted
    cli(["sd15-inpaint", "--src", src, "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    _, params = sd15_inpaint.load(str(tmp_path / "bf16"))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        cli(["sd15-inpaint", "--src", str(single), "--dst", str(tmp_path / "x")])


def test_verify_fails_above_tolerance_naming_the_component(converted, tmp_path):
    """A tampered converted tensor fails --verify's check (exit status 1 from the CLI: an uncaught error)."""
    src, dst, _ = converted
    tampered = str(tmp_path / "tampered")
    shutil.copytree(dst, tampered)
    unet_file = os.path.join(tampered, "params", "unet.safetensors")
    state = load_file(unet_file)
    state["unet/conv_out/bias"] = state["unet/conv_out/bias"] + 0.5
    save_file(state, unet_file)
    with pytest.raises(sd15.VerificationError) as failed:
        sd15.verify(src, tampered, sd15.VERIFY_TOLERANCE)
    message = str(failed.value)
    assert message.startswith(f"{tampered}: verification against {src} failed (relative error above 1e-04): "
                              "unet epsilon ("), message
    assert not any(name in message for name in ("text_encoder", "vae")), message
    assert sd15.verify(src, dst, sd15.VERIFY_TOLERANCE).keys() == {
        "text_encoder hidden", "text_encoder pooled", "unet epsilon", "vae encode mean", "vae decode"}
    with pytest.raises(sd15.VerificationError, match=r"relative error above 0e\+00\): text_encoder hidden .*unet "
                                                     r"epsilon .*vae decode"):
        cli(["sd15-inpaint", "--src", src, "--dst", str(tmp_path / "again"), "--verify", "--tolerance", "0"])
