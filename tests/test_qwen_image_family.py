"""Qwen-Image families against diffusers' pipelines, fp32, on a tiny pipeline folder built offline (tiny MMDiT, VAE
and Qwen2.5-VL, the byte-level BPE tokenizer of tests/qwen_fixtures.py, transformers' PIL image processor) and
converted by `python -m tools.convert_weights qwen-image-edit`'s code:
- QwenImageEditPipeline (batch 2, uneven prompts, true CFG 4 with the norm rescale, 3 steps) and
  QwenImageEditPlusPipeline (its 384 x 384 condition image): prompt embeddings and latents;
- QwenImageEditInpaintPipeline and QwenImageInpaintPipeline (text to image) at strength 1 and 0.6 (the source
  pasted outside the mask after every step).
How the reference is built offline:
- the processor: Qwen2_5_VLProcessor's class check refuses the PIL image processor and a missing video processor
  (torchvision is not installed), so it is built with `ProcessorMixin.check_argument_for_proper_class` replaced by a
  no-op for the duration of the constructor;
- the pipelines resize inputs to about 1024 x 1024 pixels (calculate_dimensions(1024 * 1024, ratio)); the tests
  make that area 64 x 64 so the tiny models run in seconds (the 384 x 384 condition area is kept);
- multimodal RoPE: transformers 5 computes the 3-D image positions only when the forward receives
  `mm_token_type_ids`, which the processor returns and diffusers 0.42 does not pass on, so the pipelines' text
  encoder numbers every token 0..L-1 on all three axes. Qwen2.5-VL was trained with the 3-D positions (what
  transformers 4 computed), and so do we: the tests hand the text encoder its mm_token_type_ids
  (`test_the_pipelines_drop_the_image_positions` shows the difference).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from jax_inpaint_rl import programs
from jax_inpaint_rl.diffusion import rollout as rollout_lib
from jax_inpaint_rl.diffusion import schedules
from jax_inpaint_rl.diffusion.steps import Sampler
from jax_inpaint_rl.models.flux import family as flux
from jax_inpaint_rl.models.qwen_image import family as qwen
from tests import qwen_fixtures
from tests.sd15_fixtures import randomize_norms, relative_error
from tools.convert_weights import qwen_image

PROMPTS = ["replace the sky with a sunset", "make the cat red"]
SIDE, STEPS, SCALE, TOLERANCE = 64, 3, 4.0, 1e-4
SMALL_AREA = SIDE * SIDE  # stands in for the pipelines' 1024 x 1024 (module docstring)
VL = "gqa"  # tests/qwen_fixtures.py: GQA 2:1, vision patch 4, merge 2, two frames per patch
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                 shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)  # Qwen-Image's


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=24 * 24, patch_size=4, merge_size=2,
                                    temporal_patch_size=2)


def processor(tokenizer):
    """Qwen2_5_VLProcessor over the PIL image processor, its class check bypassed (module docstring)."""
    from transformers import Qwen2_5_VLProcessor, processing_utils

    check = processing_utils.ProcessorMixin.check_argument_for_proper_class
    processing_utils.ProcessorMixin.check_argument_for_proper_class = lambda self, name, argument: None
    try:
        return Qwen2_5_VLProcessor(image_processor=image_processor(), tokenizer=tokenizer, video_processor=None)
    finally:
        processing_utils.ProcessorMixin.check_argument_for_proper_class = check


def with_image_positions(text_encoder):
    """Hand the text encoder the mm_token_type_ids the pipelines drop (module docstring)."""
    forward, image_id = text_encoder.forward, text_encoder.config.image_token_id

    def forward_with_types(*args, input_ids=None, **kwargs):
        return forward(*args, input_ids=input_ids, mm_token_type_ids=(input_ids == image_id).int(), **kwargs)

    text_encoder.forward = forward_with_types
    return text_encoder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """(torch components, the diffusers folder, our converted folder)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    root = tmp_path_factory.mktemp("qwen_edit")
    folder, converted = root / "diffusers", str(root / "converted")
    text_encoder = qwen_fixtures.save_tiny_vl(folder / "text_encoder", VL)
    tokenizer = qwen_fixtures.tiny_tokenizer(folder / "tokenizer")
    image_processor().save_pretrained(folder / "processor")
    torch.manual_seed(1)
    transformer = randomize_norms(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 6, 6)).eval())
    vae = randomize_norms(AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                                 temperal_downsample=[False, True]).eval())
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    for name, component in (("transformer", transformer), ("vae", vae), ("scheduler", scheduler)):
        component.save_pretrained(folder / name)
    qwen_image.convert_pipeline(str(folder), converted, check_tensors=True)
    components = dict(transformer=transformer, vae=vae, text_encoder=with_image_positions(text_encoder),
                      tokenizer=tokenizer, processor=processor(tokenizer), scheduler=scheduler)
    return components, folder, converted


def small_dimensions(monkeypatch, module):
    original = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: original(
        SMALL_AREA if area == 1024 * 1024 else area, ratio))


def examples(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, SIDE, SIDE, 3), np.uint8)
    masks = np.zeros((batch, SIDE, SIDE), np.uint8)
    masks[:, 8:40, 16:56] = 255
    masks[-1, 40:60, 4:20] = 200
    return images, masks


def encode(family, params, prompts, images, masks=None):
    inputs = {"image": jnp.asarray(images, jnp.float32) / 127.5 - 1.0}
    if masks is not None:
        inputs["mask"] = jnp.asarray(masks[..., None], jnp.float32) / 255.0
    negatives = [family.negative_prompt] * len(prompts)
    return programs.make_encode(family)(params, family.tokenize(prompts, inputs), family.tokenize(negatives, inputs),
                                        inputs, {}), inputs


def euler(family, params, cond, noise):
    """The pipelines' loop: x += (sigma_next - sigma) * guided velocity, from the family's schedule."""
    guided = jax.jit(family.guidance.guided(family.denoise, SCALE))
    schedule = family.schedule(STEPS, noise.shape[1:])
    x = jnp.asarray(noise)
    for sigma, sigma_next in zip(schedule["sigma"], schedule["sigma_next"]):
        x = x + (sigma_next - sigma) * guided(params, x, jnp.full((len(noise),), sigma), cond)
    return x


def packed_noise(batch: int, seed: int = 2) -> np.ndarray:
    h2 = SIDE // 4 // 2  # the tiny VAE's 4x, then 2x2 packing
    return np.random.default_rng(seed).standard_normal((batch, h2, h2, 64)).astype(np.float32)


def check_embeddings(cond, reference, mask):
    """Our static-length text states hold the pipeline's per-row valid states first, then masked padding."""
    ours, ours_mask = np.asarray(cond["text"]), np.asarray(cond["text_mask"]).astype(bool)
    mask = np.ones(reference.shape[:2], bool) if mask is None else mask.numpy().astype(bool)
    for row in range(len(ours)):
        valid = reference[row][mask[row]].numpy()
        assert ours_mask[row].sum() == len(valid) and ours_mask[row][:len(valid)].all()
        assert relative_error(ours[row, :len(valid)], valid) <= TOLERANCE


@pytest.mark.parametrize("variant", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_edit_pipelines_parity(variant, pipeline_folder, monkeypatch):
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    components, _, converted = pipeline_folder
    plus = variant == "qwen_image_edit_plus"
    small_dimensions(monkeypatch, pipeline_qwenimage_edit_plus if plus else pipeline_qwenimage_edit)
    pipe = (QwenImageEditPlusPipeline if plus else QwenImageEditPipeline)(**components)
    batch = 1 if plus else 2  # Edit Plus reads a list of images as Pictures 1, 2, ... of every prompt
    prompts, (images, _) = PROMPTS[:batch], examples(batch)
    family, params = qwen.load(converted, variant)
    cond, _ = encode(family, params, prompts, images)
    pil = [Image.fromarray(i) for i in images]
    with torch.no_grad():
        vlm_images = [pipe.image_processor.resize(i, *qwen.condition_size(qwen.CONDITION_AREA, SIDE, SIDE))
                      for i in pil] if plus else pil
        reference, mask = pipe.encode_prompt(prompt=prompts, image=vlm_images)
    check_embeddings(cond["positive"], reference, mask)

    noise = packed_noise(batch)
    got = euler(family, params, cond, noise)
    with torch.no_grad():
        ref = pipe(image=pil if not plus else pil[0], prompt=prompts, negative_prompt=[" "] * batch,
                   true_cfg_scale=SCALE, num_inference_steps=STEPS, latents=torch.from_numpy(noise.reshape(batch, -1, 64)),
                   output_type="latent").images.numpy()
    assert relative_error(np.asarray(flux.tokens(got)), ref) <= TOLERANCE, variant
    assert relative_error(np.asarray(got), noise) > 1e-2, "the steps moved the latents"


def encode_with_the_mean(monkeypatch, module):
    """Our conditioning encodes images with the VAE's posterior mean; make the inpainting pipeline do the same."""
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"))


INPAINT_PIPELINES = {  # variant -> (diffusers pipeline, its module, reads the processor)
    "qwen_image_edit_inpaint": ("QwenImageEditInpaintPipeline", "pipeline_qwenimage_edit_inpaint", True),
    "qwen_image_inpaint": ("QwenImageInpaintPipeline", "pipeline_qwenimage_inpaint", False),
}


@pytest.mark.parametrize("variant", sorted(INPAINT_PIPELINES))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_pipelines_parity(variant, strength, pipeline_folder, monkeypatch):
    """Our rollout (ODE sampler, the family's paste_region) against QwenImageEditInpaintPipeline's and
    QwenImageInpaintPipeline's per-step paste of the re-noised source; outside the mask the result is the
    source's latents. At strength 0.6 both run the last 2 of 3 steps from the source noised with the pipeline's
    seeded draw (at strength 1, that draw is the initial noise). The pipelines' own `latents` argument fails in
    diffusers 0.42 (prepare_latents returns one value where three are unpacked), so the draw always comes from
    their seeded generator."""
    import importlib

    import diffusers

    pipeline_class, module_name, reads_processor = INPAINT_PIPELINES[variant]
    module = importlib.import_module(f"diffusers.pipelines.qwenimage.{module_name}")
    components, _, converted = pipeline_folder
    if reads_processor:
        small_dimensions(monkeypatch, module)
    else:
        components = {k: v for k, v in components.items() if k != "processor"}
    encode_with_the_mean(monkeypatch, module)
    pipe = getattr(diffusers, pipeline_class)(**components)
    family, params = qwen.load(converted, variant)
    images, masks = examples(2)
    cond, _ = encode(family, params, PROMPTS, images, masks)
    schedule = schedules.from_strength(family.schedule(STEPS, packed_noise(2).shape[1:]), strength)
    policy = programs.make_policy(family, schedule, Sampler("flow_grpo", 0.7), SCALE)
    steps = schedules.num_steps(schedule)
    assert steps == (STEPS if strength == 1 else 2)
    draw = torch.randn((2, 1, 16, SIDE // 4, SIDE // 4), generator=torch.Generator().manual_seed(0)).numpy()
    noise = np.asarray(flux.pack(jnp.asarray(draw[:, 0].transpose(0, 2, 3, 1))))  # as prepare_latents packs it
    trajectory = jax.jit(lambda p, c, x: rollout_lib.rollout(
        policy.guided, p, c, x, policy.schedule, policy.sampler, jax.random.key(0), jnp.zeros(steps),
        paste=policy.paste(c)))(params["transformer"], cond, jnp.asarray(noise))
    got = np.asarray(trajectory.latents[:, -1])

    with torch.no_grad():
        ref = pipe(image=[Image.fromarray(i) for i in images], mask_image=[Image.fromarray(m) for m in masks],
                   prompt=PROMPTS, negative_prompt=[" "] * 2, true_cfg_scale=SCALE, num_inference_steps=STEPS,
                   height=SIDE, width=SIDE, strength=strength, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images.numpy()
    assert relative_error(np.asarray(flux.tokens(jnp.asarray(got))), ref) <= TOLERANCE
    region, source = (np.asarray(a) for a in family.paste_region(cond["positive"]))
    outside = region == 0
    assert outside.any() and (~outside).any()
    np.testing.assert_allclose(got[outside], source[outside], rtol=0, atol=1e-6)


def test_the_pipelines_drop_the_image_positions(pipeline_folder):
    """Without mm_token_type_ids transformers 5 numbers image tokens like text: the hidden states differ (why the
    tests pass them, module docstring)."""
    components, folder, _ = pipeline_folder
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    inputs = components["processor"](text=["<|vision_start|><|image_pad|><|vision_end|>make it red"],
                                     images=[Image.fromarray(examples(1)[0][0])], padding=True, return_tensors="pt")
    del tokenizer
    with torch.no_grad():
        kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                      output_hidden_states=True)
        with_positions = text_encoder(**kwargs).hidden_states[-1]
        text_encoder_plain = type(text_encoder).forward.__get__(text_encoder)
        plain = text_encoder_plain(**kwargs).hidden_states[-1]
    assert relative_error(plain.numpy(), with_positions.numpy()) > 1e-3
    assert os.path.isdir(folder / "processor")


def test_prompts_longer_than_the_sequence_are_refused():
    family, _ = qwen.tiny("qwen_image_edit")
    image = {"image": np.zeros((1, 32, 32, 3), np.float32)}
    with pytest.raises(ValueError, match="longer than the 8 tokens"):
        family.tokenize(["one two three four five six seven eight nine"], image)
    assert family.tokenize(["one two three four five six seven eight"], image)["mask"].sum() > 0
