"""Tests for shardgen/datasets/instance_pngs.py: one binary PNG per object (DSB2018 stage1_train)."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from shardgen.base import ItemError
from shardgen.datasets import instance_pngs
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, damage_file, disc_mask, max_labels,
    n_objects, source_split_subset, write_image,
)

SHAPE = (32, 40)


def rgba(rgb):
    """RGBA with constant alpha 255, as DSB2018 ships its images."""
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)


# id -> (centres, colour image?)
IMAGES = {
    "0a1b": ([(8, 8), (20, 20), (24, 34)], False),
    "7f3c": ([(16, 20)], True),
    "c9d2": ([(10, 30), (22, 10)], False),
}


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(1)
    for image_id, (centres, colour) in IMAGES.items():
        fg = np.any([disc_mask(c, SHAPE) for c in centres], axis=0)
        if colour:
            rgb = rng.integers(0, 255, SHAPE + (3,), dtype=np.uint8)
        else:  # gray saved as RGB, like DSB2018's fluorescence images
            rgb = np.repeat(((fg * 150) + 20).astype(np.uint8)[..., None], 3, axis=-1)
        write_image(tmp_path / image_id / "images" / f"{image_id}.png", rgba(rgb))  # (H, W, 4) uint8: RGBA
        for k, centre in enumerate(centres):
            # hash-like names, so sorted order is not creation order
            name = f"{(k * 7919) % 97:02x}{k}.png"
            write_image(tmp_path / image_id / "masks" / name, (disc_mask(centre, SHAPE) * 255).astype(np.uint8))
    return tmp_path


def test_find_items_one_per_folder_in_order(dataset):
    (dataset / "__MACOSX").mkdir()
    (dataset / ".DS_Store").write_bytes(b"")
    items = instance_pngs.find_items(dataset, "all")
    assert source_split_subset(items) == [(k, "all", "") for k in sorted(IMAGES)]


def test_load_images_and_object_counts(dataset):
    for item in instance_pngs.find_items(dataset, "all"):
        loaded = instance_pngs.load(dataset, item)
        centres, colour = IMAGES[item.source]
        assert loaded.labels.shape == SHAPE
        assert n_objects(loaded.labels) == len(centres)
        stored = np.asarray(Image.open(dataset / item.source / "images" / f"{item.source}.png"))
        if colour:
            assert loaded.image.shape == SHAPE + (3,) and loaded.channel_names == ("red", "green", "blue")
            np.testing.assert_array_equal(loaded.image, stored[..., :3])
        else:
            assert loaded.image.shape == SHAPE + (1,) and loaded.channel_names == ("gray",)
            np.testing.assert_array_equal(loaded.image[..., 0], stored[..., 0])
        assert loaded.image.dtype == np.uint8


def test_ids_follow_sorted_file_order_and_later_masks_win(dataset):
    masks = dataset / "0a1b" / "masks"
    write_image(masks / "zzz_overlap.png", (disc_mask((20, 22), SHAPE, radius=4) * 255).astype(np.uint8))
    loaded = instance_pngs.load(dataset, instance_pngs.find_items(dataset, "all")[0])
    names = sorted(p.name for p in masks.iterdir())
    for index, name in enumerate(names, 1):
        mask = np.asarray(Image.open(masks / name)) > 0
        if name == "zzz_overlap.png":
            assert (loaded.labels[mask] == index).all()  # last file painted over the earlier one
        else:
            assert (loaded.labels[mask] == index).any()


def test_no_masks_gives_empty_labels(dataset):
    for mask in (dataset / "7f3c" / "masks").iterdir():
        mask.unlink()
    shutil.rmtree(dataset / "c9d2" / "masks")
    items = instance_pngs.find_items(dataset, "all")
    for item in items[1:]:  # an empty masks/ folder, and none at all
        loaded = instance_pngs.load(dataset, item)
        assert loaded.labels.shape == SHAPE and loaded.labels.max() == 0


def test_missing_image_and_stray_file(dataset):
    (dataset / "c9d2" / "images" / "c9d2.png").unlink()
    write_image(dataset / "loose.png", np.zeros(SHAPE, np.uint8))
    items = by_source(instance_pngs.find_items(dataset, "all"))
    assert set(items) == set(IMAGES) | {"loose.png"}
    assert_load_errors(instance_pngs.load, dataset, items, {
        "c9d2": "c9d2/images/ holds no image",
        "loose.png": "loose.png lies directly in the dataset folder",
    }, error=ItemError)


def test_image_not_named_after_folder_is_used_when_alone(dataset):
    (dataset / "7f3c" / "images" / "7f3c.png").rename(dataset / "7f3c" / "images" / "other.png")
    assert instance_pngs.load(dataset, instance_pngs.find_items(dataset, "all")[1]).labels.max() == 1


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_files_raise_naming_the_file(dataset, damage):
    image = dataset / "0a1b" / "images" / "0a1b.png"
    mask = sorted((dataset / "c9d2" / "masks").iterdir())[0]
    for path in (image, mask):
        damage_file(path, damage, junk=b"GIF89a........")
    items = instance_pngs.find_items(dataset, "all")
    assert len(items) == 3
    with pytest.raises(ValueError, match="0a1b.png"):
        instance_pngs.load(dataset, items[0])
    with pytest.raises(ValueError, match=mask.name):
        instance_pngs.load(dataset, items[2])


def test_mask_size_mismatch(dataset):
    write_image(dataset / "7f3c" / "masks" / "small.png", np.full((8, 8), 255, np.uint8))
    with pytest.raises(ItemError, match="7f3c/masks/small.png is 8x8"):
        instance_pngs.load(dataset, instance_pngs.find_items(dataset, "all")[1])


def test_wrong_folder(tmp_path):
    write_image(tmp_path / "a.png", np.zeros(SHAPE, np.uint8))
    (tmp_path / "sub").mkdir()
    assert_layout_error(instance_pngs.find_items, tmp_path, "all", match="<id>/images")


@pytest.mark.slow
def test_real_sample_counts_match_manifest(shared_data):
    root = shared_data / "dsb2018" / "stage1_train"
    with open(shared_data / "dsb2018" / "manifest.csv") as fh:
        n_nuclei = {row["image_id"]: int(row["n_nuclei"]) for row in csv.DictReader(fh)}
    items = instance_pngs.find_items(root, "all")
    assert len(items) == 53
    for item in items:
        loaded = instance_pngs.load(root, item)
        assert n_objects(loaded.labels) == n_nuclei[item.source], item.source
        assert loaded.image.shape[2] in (1, 3)


def test_build_end_to_end(dataset, shards_dir):
    built = build_and_read("instance_pngs", dataset, shards_dir)
    assert built.summary["written"] == len(IMAGES) and built.summary["rejected"] == 0
    counts = max_labels(built.samples)
    assert counts == {k: len(v[0]) for k, v in IMAGES.items()}
