"""Tests for shardgen/datasets/cyto2.py: the Cellpose cyto / cyto2 layout (datasets.md 2.1)."""

import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from shardgen.base import ItemError
from shardgen.datasets import cyto2
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, damage_file, disc_labels, max_labels,
    n_objects, write_image,
)

SHAPE = (40, 48)


def rgb_from_labels(labels, dtype=np.uint8):
    """RGB as published: G = cytoplasm (whole cell), R = nucleus (cell centre), B = 0."""
    high = np.iinfo(dtype).max
    image = np.zeros(labels.shape + (3,), dtype)
    image[..., 1] = np.where(labels > 0, high // 2, 10)
    # the inner part of each cell stands in for its nucleus
    image[..., 0] = np.where(binary_erosion(labels > 0, iterations=3), high, 0)
    return image


CENTRES = {
    "train/000": [(10, 10), (25, 30)],
    "train/001": [(8, 8), (20, 20), (32, 40)],
    "train_cyto2/000": [(15, 15)],
    "test/000": [(12, 30), (30, 12)],
}


@pytest.fixture
def dataset(tmp_path):
    """The three unpacked zips; train/001 is 16-bit with 65535 as background in its mask."""
    for name, centres in CENTRES.items():
        labels = disc_labels(centres, SHAPE)
        dtype = np.uint16 if name == "train/001" else np.uint8
        write_image(tmp_path / f"{name}_img.png", rgb_from_labels(labels, dtype))
        if name == "train/001":
            labels[labels == 0] = 65535
        write_image(tmp_path / f"{name}_masks.png", labels)
    return tmp_path


def test_find_items_lists_splits_and_subsets_in_order(dataset):
    train = cyto2.find_items(dataset, "train")
    assert [i.source for i in train] == ["train/000_img.png", "train/001_img.png", "train_cyto2/000_img.png"]
    assert [i.subset for i in train] == ["cyto", "cyto", "cyto2"]
    assert all(i.split == "train" for i in train)
    test = cyto2.find_items(dataset, "test")
    assert [(i.source, i.split, i.subset) for i in test] == [("test/000_img.png", "test", "cyto")]
    assert cyto2.find_items(dataset, "train") == train  # deterministic


def test_load_reorders_to_cytoplasm_nucleus(dataset):
    item = cyto2.find_items(dataset, "train")[0]
    loaded = cyto2.load(dataset, item)
    stored = np.asarray(Image.open(dataset / "train/000_img.png"))
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == SHAPE + (2,)
    np.testing.assert_array_equal(loaded.image[..., 0], stored[..., 1])  # G = cytoplasm
    np.testing.assert_array_equal(loaded.image[..., 1], stored[..., 0])  # R = nucleus
    assert n_objects(loaded.labels) == len(CENTRES["train/000"])
    assert (loaded.channel_names or cyto2.INFO.channel_names) == ("cytoplasm", "nucleus")


def test_16bit_image_kept_and_65535_is_background(dataset):
    item = cyto2.find_items(dataset, "train")[1]
    loaded = cyto2.load(dataset, item)
    assert loaded.image.dtype == np.uint16 and loaded.image.max() == 65535
    assert 65535 not in loaded.labels
    assert set(np.unique(loaded.labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(loaded.labels > 0, disc_labels(CENTRES["train/001"], SHAPE) > 0)


def test_cyto2_subset_and_test_split_load(dataset):
    for split in ("train", "test"):
        for item in cyto2.find_items(dataset, split):
            loaded = cyto2.load(dataset, item)
            key = item.source.removesuffix("_img.png")
            assert loaded.labels.max() == len(CENTRES[key])


def test_gray_single_channel_file_is_one_channel(dataset):
    write_image(dataset / "train/002_img.png", np.full(SHAPE, 7, np.uint8))
    write_image(dataset / "train/002_masks.png", disc_labels([(20, 20)], SHAPE))
    item = next(i for i in cyto2.find_items(dataset, "train") if i.source == "train/002_img.png")
    loaded = cyto2.load(dataset, item)
    assert loaded.image.shape == SHAPE + (1,) and loaded.channel_names == ("cytoplasm",)


def test_blue_signal_is_rejected_not_dropped(dataset):
    image = rgb_from_labels(disc_labels([(20, 20)], SHAPE))
    image[..., 2] = 3
    write_image(dataset / "train/003_img.png", image)
    write_image(dataset / "train/003_masks.png", disc_labels([(20, 20)], SHAPE))
    item = next(i for i in cyto2.find_items(dataset, "train") if i.source == "train/003_img.png")
    with pytest.raises(ItemError, match="003_img.png.*blue"):
        cyto2.load(dataset, item)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_image_or_mask_raises_naming_the_file(dataset, damage):
    for name in ("train/000_img.png", "train/001_masks.png"):
        damage_file(dataset / name, damage, junk=b"not a png at all")
    items = by_source(cyto2.find_items(dataset, "train"))
    assert set(items) == {"train/000_img.png", "train/001_img.png", "train_cyto2/000_img.png"}
    assert_load_errors(cyto2.load, dataset, items, {
        "train/000_img.png": "000_img.png",
        "train/001_img.png": "001_masks.png",
    })


def test_missing_mask_orphan_mask_and_stray_file_are_items_that_fail(dataset):
    (dataset / "train/001_masks.png").unlink()
    (dataset / "test/000_img.png").unlink()
    write_image(dataset / "train/notes.png", np.zeros(SHAPE, np.uint8))
    train = by_source(cyto2.find_items(dataset, "train"))
    test = by_source(cyto2.find_items(dataset, "test"))
    assert "train/001_img.png" in train and "train/notes.png" in train
    assert list(test) == ["test/000_masks.png"]
    assert_load_errors(cyto2.load, dataset, {**train, **test}, {
        "train/001_img.png": "train/001_img.png has no mask.*001_masks",
        "test/000_masks.png": "test/000_masks.png has no image",
        "train/notes.png": "train/notes.png: cannot pair",
    }, error=ItemError)


def test_size_mismatch_names_both_files(dataset):
    write_image(dataset / "train/000_masks.png", disc_labels([(5, 5)], (20, 20)))
    with pytest.raises(ItemError, match="000_masks.png.*000_img.png"):
        cyto2.load(dataset, cyto2.find_items(dataset, "train")[0])


def test_only_one_zip_unpacked(dataset):
    shutil.rmtree(dataset / "train")
    shutil.rmtree(dataset / "train_cyto2")
    assert cyto2.find_items(dataset, "train") == []
    assert len(cyto2.find_items(dataset, "test")) == 1


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(cyto2.find_items, tmp_path, "train", match="NNN_img.png")
    assert_layout_error(cyto2.find_items, tmp_path / "missing", "train")
    with pytest.raises(ValueError, match="splits"):
        cyto2.find_items(tmp_path, "val")


def test_real_sample_object_counts(shared_data):
    root = shared_data / "cellpose_cyto"
    items = cyto2.find_items(root, "train")
    assert len(items) == 20
    for item in items:
        loaded = cyto2.load(root, item)
        # Expected count: distinct non-zero values of the mask PNG read independently with Pillow.
        stored = np.asarray(Image.open(root / item.source.replace("_img", "_masks")))
        expected = len(np.setdiff1d(np.unique(stored), [0, 65535]))
        assert n_objects(loaded.labels) == expected, item.source
        assert loaded.image.shape == stored.shape + (2,) and loaded.image.dtype == np.uint16


def test_build_end_to_end(dataset, shards_dir):
    built = build_and_read("cyto2", dataset, shards_dir)
    assert built.summary["written"] == 4 and built.summary["rejected"] == 0
    for image, _, _, meta, _ in built.samples:
        assert image.shape[2] == 2 and meta.channel_names == ("cytoplasm", "nucleus")
    counts = max_labels(built.samples)
    assert counts == {f"{k}_img.png": len(v) for k, v in CENTRES.items()}
