"""Preservation, seam and region-only rewards against hand-built images."""
import numpy as np
import pytest

from jax_inpaint_rl.rewards import get_reward
from jax_inpaint_rl.rewards.inpaint_scores import region_only

H = W = 64


def smooth_image(seed: int) -> np.ndarray:
    """A gentle gradient with mild noise: no strong edges of its own."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = 80 + 60 * (x / W)[..., None] + 40 * (y / H)[..., None] * np.array([1.0, 0.5, 0.2])
    return np.clip(base + rng.normal(0, 2, (H, W, 3)), 0, 255).astype(np.uint8)


def square_mask(batch: int, top=20, left=16, size=24) -> np.ndarray:
    mask = np.zeros((batch, H, W, 1), np.uint8)
    mask[:, top : top + size, left : left + size] = 1
    return mask


def test_preservation_is_one_when_outside_unchanged_and_drops_with_changes():
    source = np.stack([smooth_image(0)] * 3)
    mask = square_mask(3)
    images = source.copy()
    images[0][mask[0, ..., 0] == 1] = 255  # change only inside: still perfect
    images[1] = np.clip(source[1].astype(int) + 20, 0, 255)  # everything brighter by 20
    images[2] = 255 - source[2]  # inverted
    scores = get_reward("preservation")(images, ["p"] * 3, {"mask": mask, "source": source})
    assert scores["score"][0] == pytest.approx(1.0)
    assert scores["score"][1] == pytest.approx(1 - 20 / 255, abs=5e-3)
    assert scores["score"][2] < scores["score"][1]
    assert scores["psnr"][1] > scores["psnr"][2]


def test_reference_similarity_scores_inside_the_mask_only():
    reference = np.stack([smooth_image(3)] * 2)
    mask = square_mask(2)
    images = reference.copy()
    images[0][mask[0, ..., 0] == 0] = 0  # outside differs: ignored
    images[1][mask[1, ..., 0] == 1] = np.clip(reference[1][mask[1, ..., 0] == 1].astype(int) + 51, 0, 255)
    scores = get_reward("reference_similarity")(images, ["p"] * 2, {"mask": mask, "reference": reference})
    assert scores["score"][0] == pytest.approx(1.0)
    assert scores["score"][1] == pytest.approx(0.8, abs=1e-3)
    assert scores["psnr"][1] == pytest.approx(-10 * np.log10(0.2**2), abs=0.05)


def test_seam_penalises_a_pasted_patch_but_not_a_continuous_fill():
    base = smooth_image(1)
    mask = square_mask(2)
    seamless = base.copy()  # the region continues the surrounding gradient
    pasted = base.copy()
    pasted[mask[1, ..., 0] == 1] = np.clip(base[mask[1, ..., 0] == 1].astype(int) + 60, 0, 255)
    scores = get_reward("seam")(np.stack([seamless, pasted]), ["p", "p"], {"mask": mask})
    assert scores["score"][0] > 0.8
    assert scores["score"][1] < 0.1
    assert scores["seam_step"][1] > 40


def test_empty_mask_raises_not_zero():
    images = np.stack([smooth_image(2)])
    empty = np.zeros((1, H, W, 1), np.uint8)
    with pytest.raises(ValueError, match="no boundary"):
        get_reward("seam")(images, ["p"], {"mask": empty})
    with pytest.raises(ValueError, match="empty"):
        region_only(get_reward("seam"))(images, ["p"], {"mask": empty})
    with pytest.raises(ValueError, match=r"region is empty for samples \[0\]"):
        get_reward("reference_similarity")(images, ["p"], {"mask": empty, "reference": images})
    with pytest.raises(ValueError, match=r"meta\['reference'\] must have shape"):
        get_reward("reference_similarity")(images, ["p"], {"mask": empty, "reference": images[:, :32]})


def test_region_only_crops_images_and_meta_to_the_mask_box():
    seen = {}

    def spy(images, prompts, meta):
        seen.update(images=images, meta=meta)
        return {"score": images.mean(axis=(1, 2, 3)) / 255.0}

    images = np.zeros((2, H, W, 3), np.uint8)
    mask = square_mask(2, top=8, left=8, size=16)
    images[mask[..., 0] == 1] = 255
    by_name = get_reward("region", reward="preservation", size=(32, 48), pad=4)
    changed_inside = {"mask": mask, "source": np.zeros_like(images)}
    np.testing.assert_allclose(by_name(images, ["a", "b"], changed_inside)["score"], 1.0)
    scores = region_only(spy, size=(32, 48), pad=0)(images, ["a", "b"], {"mask": mask, "target_text": ["x", "y"]})
    assert seen["images"].shape == (2, 32, 48, 3)
    assert seen["meta"]["mask"].shape == (2, 32, 48, 1)
    assert seen["meta"]["target_text"] == ["x", "y"]
    # the box is grown to the 2:3 aspect around the 16x16 square: 16 rows by 24 columns, two thirds white
    assert scores["score"] == pytest.approx([16 / 24] * 2, abs=0.05)
