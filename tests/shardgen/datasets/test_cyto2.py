"""Tests for shardgen/datasets/cyto2.py: the Cellpose cyto / cyto2 layout (datasets.md 2.1)."""

import glob
import shutil

import imagecodecs
import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy.ndimage import binary_erosion

from pipeline.shards import decode_sample
from shardgen.base import ItemError, LayoutError
from shardgen.datasets import cyto2

SHAPE = (40, 48)


def disc_labels(centres, radius=5, shape=SHAPE, dtype=np.uint16):
    """Label image with one disc per centre, ids 1..n."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, dtype)
    for index, (row, col) in enumerate(centres, 1):
        labels[(rows - row) ** 2 + (cols - col) ** 2 <= radius**2] = index
    return labels


def rgb_from_labels(labels, dtype=np.uint8):
    """RGB as published: G = cytoplasm (whole cell), R = nucleus (cell centre), B = 0."""
    high = np.iinfo(dtype).max
    image = np.zeros(labels.shape + (3,), dtype)
    image[..., 1] = np.where(labels > 0, high // 2, 10)
    # the inner part of each cell stands in for its nucleus
    image[..., 0] = np.where(binary_erosion(labels > 0, iterations=3), high, 0)
    return image


def save_png(path, array):
    """8-bit arrays through Pillow, 16-bit RGB through imagecodecs (Pillow cannot write it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == np.uint16 and array.ndim == 3:
        path.write_bytes(imagecodecs.png_encode(array))
    else:
        Image.fromarray(array).save(path)
    return path


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
        labels = disc_labels(centres)
        dtype = np.uint16 if name == "train/001" else np.uint8
        save_png(tmp_path / f"{name}_img.png", rgb_from_labels(labels, dtype))
        if name == "train/001":
            labels[labels == 0] = 65535
        save_png(tmp_path / f"{name}_masks.png", labels)
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
    assert len(np.unique(loaded.labels[loaded.labels > 0])) == len(CENTRES["train/000"])
    assert (loaded.channel_names or cyto2.INFO.channel_names) == ("cytoplasm", "nucleus")


def test_16bit_image_kept_and_65535_is_background(dataset):
    item = cyto2.find_items(dataset, "train")[1]
    loaded = cyto2.load(dataset, item)
    assert loaded.image.dtype == np.uint16 and loaded.image.max() == 65535
    assert 65535 not in loaded.labels
    assert set(np.unique(loaded.labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(loaded.labels > 0, disc_labels(CENTRES["train/001"]) > 0)


def test_cyto2_subset_and_test_split_load(dataset):
    for split in ("train", "test"):
        for item in cyto2.find_items(dataset, split):
            loaded = cyto2.load(dataset, item)
            key = item.source.removesuffix("_img.png")
            assert loaded.labels.max() == len(CENTRES[key])


def test_gray_single_channel_file_is_one_channel(dataset):
    save_png(dataset / "train/002_img.png", np.full(SHAPE, 7, np.uint8))
    save_png(dataset / "train/002_masks.png", disc_labels([(20, 20)]))
    item = next(i for i in cyto2.find_items(dataset, "train") if i.source == "train/002_img.png")
    loaded = cyto2.load(dataset, item)
    assert loaded.image.shape == SHAPE + (1,) and loaded.channel_names == ("cytoplasm",)


def test_blue_signal_is_rejected_not_dropped(dataset):
    image = rgb_from_labels(disc_labels([(20, 20)]))
    image[..., 2] = 3
    save_png(dataset / "train/003_img.png", image)
    save_png(dataset / "train/003_masks.png", disc_labels([(20, 20)]))
    item = next(i for i in cyto2.find_items(dataset, "train") if i.source == "train/003_img.png")
    with pytest.raises(ItemError, match="003_img.png.*blue"):
        cyto2.load(dataset, item)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_image_or_mask_raises_naming_the_file(dataset, damage):
    for name in ("train/000_img.png", "train/001_masks.png"):
        path = dataset / name
        data = path.read_bytes()
        path.write_bytes(b"not a png at all" if damage == "corrupt" else data[: len(data) // 2])
    items = {i.source: i for i in cyto2.find_items(dataset, "train")}
    assert set(items) == {"train/000_img.png", "train/001_img.png", "train_cyto2/000_img.png"}
    with pytest.raises(ValueError, match="000_img.png"):
        cyto2.load(dataset, items["train/000_img.png"])
    with pytest.raises(ValueError, match="001_masks.png"):
        cyto2.load(dataset, items["train/001_img.png"])


def test_missing_mask_orphan_mask_and_stray_file_are_items_that_fail(dataset):
    (dataset / "train/001_masks.png").unlink()
    (dataset / "test/000_img.png").unlink()
    save_png(dataset / "train/notes.png", np.zeros(SHAPE, np.uint8))
    train = {i.source: i for i in cyto2.find_items(dataset, "train")}
    test = {i.source: i for i in cyto2.find_items(dataset, "test")}
    assert "train/001_img.png" in train and "train/notes.png" in train
    assert list(test) == ["test/000_masks.png"]
    with pytest.raises(ItemError, match="train/001_img.png has no mask.*001_masks"):
        cyto2.load(dataset, train["train/001_img.png"])
    with pytest.raises(ItemError, match="test/000_masks.png has no image"):
        cyto2.load(dataset, test["test/000_masks.png"])
    with pytest.raises(ItemError, match="train/notes.png: cannot pair"):
        cyto2.load(dataset, train["train/notes.png"])


def test_size_mismatch_names_both_files(dataset):
    save_png(dataset / "train/000_masks.png", disc_labels([(5, 5)], shape=(20, 20)))
    with pytest.raises(ItemError, match="000_masks.png.*000_img.png"):
        cyto2.load(dataset, cyto2.find_items(dataset, "train")[0])


def test_only_one_zip_unpacked(dataset):
    shutil.rmtree(dataset / "train")
    shutil.rmtree(dataset / "train_cyto2")
    assert cyto2.find_items(dataset, "train") == []
    assert len(cyto2.find_items(dataset, "test")) == 1


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(LayoutError, match="NNN_img.png"):
        cyto2.find_items(tmp_path, "train")
    with pytest.raises(LayoutError):
        cyto2.find_items(tmp_path / "missing", "train")
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
        assert len(np.unique(loaded.labels[loaded.labels > 0])) == expected, item.source
        assert loaded.image.shape == stored.shape + (2,) and loaded.image.dtype == np.uint16


def test_build_end_to_end(dataset, tmp_path_factory):
    from shardgen.build import build_dataset

    out = tmp_path_factory.mktemp("shards")
    summary = build_dataset("cyto2", dataset, out)
    assert summary["written"] == 4 and summary["rejected"] == 0
    counts = {}
    for sample in wds.WebDataset(sorted(glob.glob(str(out / "cyto2" / "*.tar"))), shardshuffle=False):
        image, labels, flows, meta, _ = decode_sample(sample)
        assert image.shape[2] == 2 and meta.channel_names == ("cytoplasm", "nucleus")
        counts[meta.source] = int(labels.max())
    assert counts == {f"{k}_img.png": len(v) for k, v in CENTRES.items()}
