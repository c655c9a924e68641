"""Loader: per-host shards, exact resume, GRPO groups, resize / crop alignment, prefetch errors."""
import collections

import ml_collections
import numpy as np
import pytest

from jax_inpaint_rl.data import DataError, Loader, SyntheticSource, open_source
from jax_inpaint_rl.data.loader import loaders_from_config, resize_and_crop, style_crop
from tests.test_data_formats import inpaint_records, write_json_set


def valid_indices_per_epoch(loaders, epochs):
    """[Counter of example indices with valid=True taken by all loaders (hosts)] per epoch, via next()."""
    taken = [collections.Counter() for _ in range(epochs)]
    for loader in loaders:
        for step in range(epochs * loader.steps_per_epoch):
            batch = next(loader)
            taken[step // loader.steps_per_epoch].update(
                batch["example_index"][batch["valid"]][::loader.group_size].tolist())
        loader.close()
    return taken


@pytest.mark.parametrize("num_examples,drop_remainder", [(12, False), (11, False), (11, True)])
def test_two_hosts_read_disjoint_shards_covering_each_example_once(num_examples, drop_remainder):
    source = SyntheticSource(num_examples, resolution=16)
    hosts = [Loader(source, prompts_per_batch=3, group_size=2, resolution=16, process_index=p, process_count=2,
                    drop_remainder=drop_remainder, validate=False) for p in range(2)]
    assert hosts[0].steps_per_epoch == hosts[1].steps_per_epoch
    for epoch, taken in enumerate(valid_indices_per_epoch(hosts, epochs=2)):
        used = hosts[0].steps_per_epoch * 6
        expected = hosts[0].epoch_order(epoch)[:used] if drop_remainder else range(num_examples)
        assert sorted(taken) == sorted(expected) and set(taken.values()) == {1}
    first = [host.batch_at(0, 0)["example_index"] for host in hosts]
    assert not set(first[0]) & set(first[1])
    assert not np.array_equal(hosts[0].epoch_order(0), hosts[0].epoch_order(1))  # reshuffled per epoch


def test_groups_are_group_major_with_global_ids():
    source = SyntheticSource(8, resolution=16)
    batch = Loader(source, prompts_per_batch=2, group_size=3, resolution=16, process_index=1, process_count=2,
                   prefetch=0, validate=False).batch_at(0, 0)
    np.testing.assert_array_equal(batch["group_id"], [2, 2, 2, 3, 3, 3])
    assert batch["prompt"][:3] == [batch["prompt"][0]] * 3
    np.testing.assert_array_equal(batch["image"][0], batch["image"][2])
    assert batch["image"].dtype == np.float32 and -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["mask"].shape == (6, 16, 16, 1) and len(batch["id"]) == 6


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_continues_with_the_exact_next_batch(prefetch):
    source = SyntheticSource(10, resolution=16)
    options = dict(prompts_per_batch=3, group_size=2, resolution=16, seed=7, prefetch=prefetch, validate=False)
    with Loader(source, **options) as loader:
        reference = [next(loader)["example_index"] for _ in range(9)]  # crosses two epoch ends (4 per epoch)
    with Loader(source, **options) as first_run:
        for _ in range(5):
            next(first_run)
        saved = dict(first_run.state())
        next(first_run)  # prefetched and consumed past the save point: must not leak into the resume
    assert saved == {"epoch": 1, "index": 1, "num_examples": 10, "global_batch": 3, "seed": 7, "shuffle": 1}
    with Loader(source, **options) as resumed:
        resumed.restore(saved)
        resumed_indices = [next(resumed)["example_index"] for _ in range(4)]
    for expected, got in zip(reference[5:], resumed_indices):
        np.testing.assert_array_equal(expected, got)
    with pytest.raises(ValueError, match="index expected in"):
        Loader(source, **options).restore({**saved, "index": 99})
    with pytest.raises(ValueError, match="the same position would give other batches"):
        Loader(source, **{**options, "seed": 8}).restore(saved)


def test_same_seed_same_order_other_seed_other_order():
    source = SyntheticSource(10, resolution=16)

    def order(seed):
        return Loader(source, prompts_per_batch=2, resolution=16, seed=seed, prefetch=0, validate=False).epoch_order(3)

    np.testing.assert_array_equal(order(1), order(1))
    assert not np.array_equal(order(1), order(2))


def test_resize_and_crop_keeps_image_mask_and_target_aligned_and_the_mask_in_view():
    height, width = 40, 100
    mask = np.zeros((height, width, 1), np.float32)
    mask[10:30, 75:95] = 1.0  # far right: a centre crop would cut it off
    image = np.where(mask > 0, 255, 0).astype(np.uint8).repeat(3, axis=-1)
    example = {"image": image, "target": 255 - image, "mask": mask}
    fitted = resize_and_crop(example, 32, 32)
    assert fitted["image"].shape == (32, 32, 3) and fitted["mask"].shape == (32, 32, 1)
    assert set(np.unique(fitted["mask"])) == {0.0, 1.0}
    bright = fitted["image"][..., 0] > 127
    assert (bright == (fitted["mask"][..., 0] > 0)).mean() > 0.97
    assert np.abs(fitted["target"].astype(int) + fitted["image"] - 255).max() <= 1  # same scale and window
    crop = style_crop(example["target"], mask, 8)
    assert crop.shape == (8, 8, 3) and (crop == 0).all()  # the target inside the mask's box


def test_style_crop_letterboxes_the_masks_box_onto_black():
    """A wide box keeps its aspect: scaled to the square's width, centred, black above and below (Calligrapher's
    resize_img_and_pad); a tall one gets black at the sides."""
    target = np.full((60, 80, 3), 200, np.uint8)
    mask = np.zeros((60, 80, 1), np.float32)
    mask[20:30, 10:50] = 1.0  # 40 wide, 10 high: 4:1
    crop = style_crop(target, mask, 16)
    assert crop.shape == (16, 16, 3)
    rows = np.flatnonzero(crop[..., 0].max(axis=1) > 0)
    assert (rows[0], rows[-1]) == (6, 9) and (crop[6:10] == 200).all()  # 16 x 4 content, centred
    assert (crop[:6] == 0).all() and (crop[10:] == 0).all()
    mask_tall = np.zeros((60, 80, 1), np.float32)
    mask_tall[10:50, 20:30] = 1.0  # 10 wide, 40 high
    crop = style_crop(target, mask_tall, 16)
    cols = np.flatnonzero(crop[..., 0].max(axis=0) > 0)
    assert (cols[0], cols[-1]) == (6, 9) and (crop[:, :6] == 0).all() and (crop[:, 10:] == 0).all()


def test_loader_batches_style_images_and_prompt_only_sets(tmp_path):
    styled = Loader(SyntheticSource(4, resolution=32), prompts_per_batch=2, resolution=24, style_resolution=8,
                    prefetch=0)
    batch = next(styled)
    assert batch["style_image"].shape == (2, 8, 8, 3) and batch["image"].shape == (2, 24, 24, 3)
    assert styled.fields == {"prompt", "image", "mask", "target", "style_image"}
    assert Loader(SyntheticSource(4, resolution=32), prompts_per_batch=2, resolution=24).fields == {
        "prompt", "image", "mask", "target"}
    no_target = open_source(write_json_set(tmp_path / "json", inpaint_records(2)))
    with pytest.raises(ValueError, match=r"style_resolution needs a mask and a target.*lacks \['target'\]"):
        Loader(no_target, prompts_per_batch=2, resolution=16, style_resolution=8)
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    prompts = next(Loader(open_source(tmp_path / "p.txt"), prompts_per_batch=2, group_size=2, prefetch=0))
    assert set(prompts["prompt"]) <= {"a", "b", "c"} and "image" not in prompts
    assert prompts["prompt"][0] == prompts["prompt"][1] != prompts["prompt"][2]


class FailingSource(SyntheticSource):
    def __getitem__(self, index):
        if index == 3:
            raise DataError(["broken.png: cannot decode image"])
        return super().__getitem__(index)


def test_errors_in_the_prefetch_thread_reach_the_consumer():
    loader = Loader(FailingSource(4, resolution=16), prompts_per_batch=4, resolution=16, validate=False)
    with pytest.raises(DataError, match="broken.png"):
        next(loader)
    with pytest.raises(DataError, match="broken.png"):  # and validation names it before any batch
        Loader(FailingSource(4, resolution=16), prompts_per_batch=4, resolution=16)


def test_an_eval_pass_covers_every_example_once_in_order():
    loader = Loader(SyntheticSource(5, resolution=16), prompts_per_batch=2, resolution=16, shuffle=False)
    next(loader)
    for _ in range(2):  # batch_at is pure: a second pass gives the same batches
        batches = [loader.batch_at(0, index) for index in range(loader.steps_per_epoch)]
        indices = np.concatenate([b["example_index"][b["valid"]] for b in batches])
        np.testing.assert_array_equal(indices, np.arange(5))
        assert len(batches) == 3
    loader.close()


def test_loaders_from_config(tmp_path):
    data = ml_collections.ConfigDict(dict(format="synthetic", path="", eval_path="", resolution=16,
                                          num_examples=6, num_eval_examples=3, synthetic_kinds=("text",)))
    train, held_out, sft = loaders_from_config(data, prompts_per_batch=2, sft_batch_size=3, seed=1)
    first = next(train)
    assert first["image"].shape == (2, 16, 16, 3) and train.steps_per_epoch == 3
    assert all(text is not None for text in first["target_text"])  # text boxes only
    assert held_out.prompts_per_batch == 2 and not set(held_out.batch_at(0, 0)["id"]) & {
        example_id for b in (train.batch_at(0, i) for i in range(3)) for example_id in b["id"]}
    sft_batch = next(sft)  # --train_batch_size examples, over the train set in an order of its own
    assert sft_batch["image"].shape == (3, 16, 16, 3) and set(sft_batch["id"]) <= {f"synthetic-1-{i}" for i in range(6)}
    assert loaders_from_config(data, prompts_per_batch=2, seed=1)[2] is None
    train.close()
    sft.close()
    data.update(format="jsonl", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="missing.jsonl: dataset path does not exist"):
        loaders_from_config(data, prompts_per_batch=2, seed=1)
