"""CLIP vision tower parity with transformers on tiny random configs, converter checks, CLIP rewards."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jax_inpaint_rl.models.layers.clip_text import CLIPTextConfig, CLIPTextTransformer  # noqa: E402
from jax_inpaint_rl.models.layers.clip_vision import ClipVision, ClipVisionConfig  # noqa: E402
from jax_inpaint_rl.models.params_io import save_params  # noqa: E402
from jax_inpaint_rl.rewards import get_reward  # noqa: E402
from jax_inpaint_rl.rewards.clip_score import preprocess  # noqa: E402
from tools.convert_weights.clip import convert_text, convert_vision, verify, write_folder  # noqa: E402
from tools.convert_weights.common import ConversionError  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
BOS, EOS = 2 * len(CHARS), 2 * len(CHARS) + 1  # ids of <|startoftext|>, <|endoftext|> in the tiny vocab
TINY_TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=80,
                 max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, projection_dim=16)


def randomize(model, seed: int):
    """Default init leaves LayerNorms at identity and biases at 0: randomise them so the test can fail."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def tiny_tower(seed: int, **overrides):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**{**TINY, **overrides})
    return randomize(transformers.CLIPVisionModelWithProjection(config), seed), config.to_dict()


def tiny_tokenizer(folder):
    """A character-level CLIP tokenizer (no merges) small enough to build offline."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", model_max_length=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel and its converted folder."""
    tmp = tmp_path_factory.mktemp("clip")
    torch.manual_seed(3)
    config = transformers.CLIPConfig(vision_config=TINY, text_config=TINY_TEXT, projection_dim=16)
    model = randomize(transformers.CLIPModel(config), 3)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    write_folder(str(tmp / "out"), tensors, config.to_dict(), tiny_tokenizer(tmp), "tiny")
    return model, str(tmp / "out")


def state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(act):
    model, config = tiny_tower(0, hidden_act=act)
    params = convert_vision(state_dict(model), config)
    pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels))
    embeds, hidden = ClipVision(ClipVisionConfig.from_dict(config)).apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    for got, want in ((embeds, expected.image_embeds), (hidden, expected.last_hidden_state)):
        want = want.numpy()
        assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()


def test_text_tower_matches_transformers(clip_folder):
    model, _ = clip_folder
    params = convert_text({k: v.numpy() for k, v in model.state_dict().items()}, model.config.to_dict())
    ids = np.array([[BOS, 3, 40, 7, EOS, EOS, EOS, EOS], [BOS, 1, 2, 3, 4, 5, 6, EOS]], np.int32)
    text = transformers.CLIPTextModelWithProjection(model.config.text_config).eval()
    text.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("text_model.", "text_projection."))})
    with torch.no_grad():
        expected = text(input_ids=torch.from_numpy(ids.astype(np.int64))).text_embeds.numpy()
    config = CLIPTextConfig.from_transformers(model.config.text_config.to_dict())
    pooled = CLIPTextTransformer(config).apply({"params": params["encoder"]}, jnp.asarray(ids))["pooled"]
    got = np.asarray(pooled @ params["projection"]["kernel"])
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_converted_folder_matches_clip_model_cosines(clip_folder):
    model, folder = clip_folder
    assert verify(model, folder) <= 1e-4


def test_converter_names_unknown_missing_and_misshaped_keys():
    model, config = tiny_tower(0)
    tensors = state_dict(model)
    tensors["vision_model.embeddings.extra.weight"] = np.zeros(3, np.float32)
    del tensors["vision_model.post_layernorm.bias"]
    tensors["visual_projection.weight"] = np.zeros((8, 32), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_vision(tensors, config, source="tiny.safetensors")
    message = str(err.value)
    assert "tiny.safetensors" in message and "vision_model.embeddings.extra.weight" in message
    assert "post_layernorm/bias" in message and "visual_projection/kernel: got (32, 8), expected (32, 16)" in message


def test_preprocess_resizes_short_side_and_centre_crops():
    image = np.zeros((1, 40, 80, 3), np.uint8)
    image[:, :, 30:50] = 255  # a white stripe in the middle columns
    out = preprocess(image, 20)
    assert out.shape == (1, 20, 20, 3) and out.dtype == np.float32
    white = (1.0 - 0.48145466) / 0.26862954
    assert out[0, :, 10, 0] == pytest.approx(white, rel=1e-3)  # stripe lands in the centre of the crop
    assert out[0, :, 0, 0] == pytest.approx(-0.48145466 / 0.26862954, rel=1e-3)


def test_clip_rewards_from_a_converted_folder(clip_folder, tmp_path):
    model, folder = clip_folder
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 48, 48, 3), dtype=np.uint8)
    reference = np.stack([images[0], 255 - images[1]])
    scores = get_reward("clip_score", path=folder, target="reference")(images, ["a", "b"], {"reference": reference})
    assert scores["cosine"][0] == pytest.approx(1.0, abs=1e-5)
    assert scores["score"][0] == pytest.approx(2.5, abs=1e-4)
    assert scores["cosine"][1] < 0.999

    prompts = ["a cat", "open 24"]
    by_prompt = get_reward("clip_score", path=folder)(images, prompts, {})
    by_target = get_reward("clip_score", path=folder, target="target_text")(images, ["x", "y"], {"target_text": prompts})
    np.testing.assert_allclose(by_prompt["cosine"], by_target["cosine"], atol=1e-6)
    pixels = torch.from_numpy(preprocess(images, 32).transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(tiny_tokenizer(tmp_path)(prompts, padding="max_length", max_length=16, return_tensors="np")["input_ids"])
    with torch.no_grad():
        expected = np.diag((model(input_ids=ids, pixel_values=pixels).logits_per_image / model.logit_scale.exp()).numpy())
    np.testing.assert_allclose(by_prompt["cosine"], expected, atol=1e-4)

    head = {"layers_0": {"kernel": np.ones((16, 4), np.float32), "bias": np.zeros(4, np.float32)},
            "layers_1": {"kernel": np.ones((4, 1), np.float32), "bias": np.full(1, 3.0, np.float32)}}
    save_params(str(tmp_path / "head.safetensors"), head)
    aesthetic = get_reward("clip_head", path=folder, head_path=str(tmp_path / "head.safetensors"))
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=pixels)
    embeds = getattr(embeds, "pooler_output", embeds).numpy()
    embeds = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)
    np.testing.assert_allclose(aesthetic(images, ["a", "b"], {})["score"], 4 * embeds.sum(-1) + 3, rtol=1e-4)
