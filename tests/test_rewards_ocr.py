"""OCR reward on text rendered with PIL: right text near 1, wrong text lower, blank 0."""
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.ocr import levenshtein, normalize_text, text_similarity

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SIZE = 256
BOX = (40, 100, 216, 156)  # left, top, right, bottom of the mask, in pixels


def render(text: str) -> np.ndarray:
    """White image with `text` in black inside BOX; '' gives a blank image."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(image).text((BOX[0] + 6, BOX[1] + 10), text, fill="black", font=ImageFont.truetype(FONT, 28))
    return np.asarray(image)


def batch(texts, targets):
    images = np.stack([render(t) for t in texts])
    mask = np.zeros((len(texts), SIZE, SIZE, 1), np.uint8)
    mask[:, BOX[1] : BOX[3], BOX[0] : BOX[2]] = 1
    return images, ["write the sign"] * len(texts), {"mask": mask, "target_text": list(targets)}


def test_levenshtein_matches_hand_counts():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2
    assert text_similarity("", "") == 1.0
    assert text_similarity("", "abcd") == 0.0
    assert text_similarity("abcd", "abce") == pytest.approx(0.75)


def test_normalization_rules():
    assert normalize_text(" Hello  World\n", case_sensitive=False, whitespace="ignore") == "helloworld"
    assert normalize_text(" Hello  World\n", case_sensitive=True, whitespace="collapse") == "Hello World"
    with pytest.raises(ValueError, match="whitespace"):
        normalize_text("a", True, "strip")


@pytest.mark.parametrize("mode", ["crop", "full"])
def test_ocr_scores_rendered_text(mode):
    reward = get_reward("ocr", mode=mode)
    images, prompts, meta = batch(["OPEN 24", "CLOSED", ""], ["open 24", "open 24", "open 24"])
    scores = reward(images, prompts, meta)["score"]
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert scores[0] > 0.9, reward.read_texts(images, meta)
    assert scores[1] < 0.5
    assert scores[2] == 0.0


def test_case_sensitive_mode_penalises_case():
    images, prompts, meta = batch(["Coffee"], ["COFFEE"])
    assert get_reward("ocr")(images, prompts, meta)["score"][0] > 0.9
    assert get_reward("ocr", case_sensitive=True)(images, prompts, meta)["score"][0] < 0.5


def test_bad_inputs_name_the_field():
    reward = get_reward("ocr")
    images, prompts, meta = batch(["A"], ["A"])
    with pytest.raises(KeyError, match="target_text"):
        reward(images, prompts, {"mask": meta["mask"]})
    with pytest.raises(ValueError, match="mask"):
        reward(images, prompts, {**meta, "mask": meta["mask"][:, :10]})
    with pytest.raises(ValueError, match="uint8"):
        reward(images.astype(np.float32), prompts, meta)
    with pytest.raises(ValueError, match="mask'] is empty for samples \\[0\\]"):
        reward(images, prompts, {**meta, "mask": np.zeros_like(meta["mask"])})
    with pytest.raises(ValueError, match="mode"):
        get_reward("ocr", mode="fast")


def test_quoted_target_reads_the_prompts_quotes():
    """Flow-GRPO's OCR prompts carry the text in double quotes; target='quoted' scores against it, full image."""
    reward = get_reward("ocr", mode="full", target="quoted")
    images = np.stack([render("OPEN 24"), render("CLOSED")])
    prompts = ['A shop sign that reads "open 24" at night', 'A door with "OPEN 24" painted on it']
    scores = reward(images, prompts, {})["score"]
    assert scores[0] > 0.9 and scores[1] < 0.5
    with pytest.raises(ValueError, match="the prompt 'a sign' has no text in double quotes"):
        reward(images[:1], ["a sign"], {})
    with pytest.raises(ValueError, match="target must be one of"):
        get_reward("ocr", target="caption")
