"""Tests for shardgen/datasets/nuclei.py: the assumed Cellpose nuclei layout (datasets.md 2.2)."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from shardgen.base import ItemError
from shardgen.datasets import nuclei
from tests.shardgen.datasets.helpers import (
    assert_layout_error, build_and_read, damage_file, disc_labels, max_labels, n_objects, source_split_subset,
    write_image,
)

SHAPE = (36, 44)


def gray_from_labels(labels):
    return np.where(labels > 0, 200, 5).astype(np.uint8)


CENTRES = {"train/000": [(10, 10), (25, 30)], "train/001": [(18, 20)], "test/000": [(8, 8), (20, 20), (28, 36)]}


@pytest.fixture
def dataset(tmp_path):
    for name, centres in CENTRES.items():
        labels = disc_labels(centres, SHAPE)
        write_image(tmp_path / f"{name}_img.png", gray_from_labels(labels))
        write_image(tmp_path / f"{name}_masks.png", labels)
    return tmp_path


def test_find_items(dataset):
    train = nuclei.find_items(dataset, "train")
    assert source_split_subset(train) == [
        ("train/000_img.png", "train", ""),
        ("train/001_img.png", "train", ""),
    ]
    assert [i.source for i in nuclei.find_items(dataset, "test")] == ["test/000_img.png"]


def test_load_single_channel(dataset):
    for split in ("train", "test"):
        for item in nuclei.find_items(dataset, split):
            loaded = nuclei.load(dataset, item)
            stored = np.asarray(Image.open(dataset / item.source))
            assert loaded.image.shape == SHAPE + (1,) and loaded.image.dtype == np.uint8
            np.testing.assert_array_equal(loaded.image[..., 0], stored)
            assert n_objects(loaded.labels) == len(CENTRES[item.source[:-8]])


@pytest.mark.parametrize(
    "layout, kept",
    [("rgb_equal", 0), ("green_only", 1), ("red_only", 0), ("red_green_equal_blue_empty", 0)],
)
def test_gray_packed_in_rgb_becomes_one_channel(dataset, layout, kept):
    gray = gray_from_labels(disc_labels(CENTRES["train/000"], SHAPE))
    rgb = np.zeros(SHAPE + (3,), np.uint8)
    channels = {"rgb_equal": [0, 1, 2], "green_only": [1], "red_only": [0], "red_green_equal_blue_empty": [0, 1]}
    for c in channels[layout]:
        rgb[..., c] = gray
    write_image(dataset / "train/000_img.png", rgb)
    loaded = nuclei.load(dataset, nuclei.find_items(dataset, "train")[0])
    assert loaded.image.shape == SHAPE + (1,)
    np.testing.assert_array_equal(loaded.image[..., 0], rgb[..., kept])


def test_two_different_channels_rejected(dataset):
    rgb = np.zeros(SHAPE + (3,), np.uint8)
    rgb[..., 0] = 50
    rgb[..., 1] = gray_from_labels(disc_labels(CENTRES["train/000"], SHAPE))
    write_image(dataset / "train/000_img.png", rgb)
    with pytest.raises(ItemError, match="000_img.png.*different"):
        nuclei.load(dataset, nuclei.find_items(dataset, "train")[0])


def test_tif_files_and_16bit_and_65535_background(dataset):
    labels = disc_labels([(12, 12), (24, 30)], SHAPE)
    image = (labels.astype(np.uint16) * 1000 + 3)
    tifffile.imwrite(dataset / "train/002_img.tif", image)
    masks = labels.copy()
    masks[masks == 0] = 65535
    tifffile.imwrite(dataset / "train/002_masks.tif", masks)
    item = nuclei.find_items(dataset, "train")[2]
    assert item.source == "train/002_img.tif"
    loaded = nuclei.load(dataset, item)
    assert loaded.image.dtype == np.uint16 and loaded.image.shape == SHAPE + (1,)
    assert set(np.unique(loaded.labels)) == {0, 1, 2}


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_files_raise_naming_the_file(dataset, damage):
    damage_file(dataset / "train/001_masks.png", damage, junk=b"\x00garbage")
    item = nuclei.find_items(dataset, "train")[1]
    with pytest.raises(ValueError, match="001_masks.png"):
        nuclei.load(dataset, item)


def test_missing_partner_and_orphan(dataset):
    (dataset / "train/000_masks.png").unlink()
    (dataset / "test/000_img.png").unlink()
    train = nuclei.find_items(dataset, "train")
    test = nuclei.find_items(dataset, "test")
    assert [i.source for i in train] == ["train/000_img.png", "train/001_img.png"]
    assert [i.source for i in test] == ["test/000_masks.png"]
    with pytest.raises(ItemError, match="train/000_img.png has no mask"):
        nuclei.load(dataset, train[0])
    with pytest.raises(ItemError, match="test/000_masks.png has no image"):
        nuclei.load(dataset, test[0])


def test_wrong_folder(tmp_path):
    (tmp_path / "Training-labeled").mkdir()
    assert_layout_error(nuclei.find_items, tmp_path, "train", match="nuclei layout")


def test_build_end_to_end(dataset, shards_dir):
    built = build_and_read("nuclei", dataset, shards_dir)
    assert built.summary["written"] == 3 and built.summary["rejected"] == 0
    for image, _, _, meta, _ in built.samples:
        assert image.shape[2] == 1 and meta.channel_names == ("nucleus",)
    counts = max_labels(built.samples)
    assert counts == {f"{k}_img.png": len(v) for k, v in CENTRES.items()}
