"""Tests for shardgen/datasets/nuclei.py: the assumed Cellpose nuclei layout (datasets.md 2.2)."""

import glob

import numpy as np
import pytest
import tifffile
import webdataset as wds
from PIL import Image

from pipeline.shards import decode_sample
from shardgen.base import ItemError, LayoutError
from shardgen.datasets import nuclei

SHAPE = (36, 44)


def disc_labels(centres, radius=5, shape=SHAPE):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for index, (row, col) in enumerate(centres, 1):
        labels[(rows - row) ** 2 + (cols - col) ** 2 <= radius**2] = index
    return labels


def gray_from_labels(labels):
    return np.where(labels > 0, 200, 5).astype(np.uint8)


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


CENTRES = {"train/000": [(10, 10), (25, 30)], "train/001": [(18, 20)], "test/000": [(8, 8), (20, 20), (28, 36)]}


@pytest.fixture
def dataset(tmp_path):
    for name, centres in CENTRES.items():
        labels = disc_labels(centres)
        save_png(tmp_path / f"{name}_img.png", gray_from_labels(labels))
        save_png(tmp_path / f"{name}_masks.png", labels)
    return tmp_path


def test_find_items(dataset):
    train = nuclei.find_items(dataset, "train")
    assert [(i.source, i.split, i.subset) for i in train] == [
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
            assert len(np.unique(loaded.labels[loaded.labels > 0])) == len(CENTRES[item.source[:-8]])


@pytest.mark.parametrize(
    "layout, kept",
    [("rgb_equal", 0), ("green_only", 1), ("red_only", 0), ("red_green_equal_blue_empty", 0)],
)
def test_gray_packed_in_rgb_becomes_one_channel(dataset, layout, kept):
    gray = gray_from_labels(disc_labels(CENTRES["train/000"]))
    rgb = np.zeros(SHAPE + (3,), np.uint8)
    channels = {"rgb_equal": [0, 1, 2], "green_only": [1], "red_only": [0], "red_green_equal_blue_empty": [0, 1]}
    for c in channels[layout]:
        rgb[..., c] = gray
    save_png(dataset / "train/000_img.png", rgb)
    loaded = nuclei.load(dataset, nuclei.find_items(dataset, "train")[0])
    assert loaded.image.shape == SHAPE + (1,)
    np.testing.assert_array_equal(loaded.image[..., 0], rgb[..., kept])


def test_two_different_channels_rejected(dataset):
    rgb = np.zeros(SHAPE + (3,), np.uint8)
    rgb[..., 0] = 50
    rgb[..., 1] = gray_from_labels(disc_labels(CENTRES["train/000"]))
    save_png(dataset / "train/000_img.png", rgb)
    with pytest.raises(ItemError, match="000_img.png.*different"):
        nuclei.load(dataset, nuclei.find_items(dataset, "train")[0])


def test_tif_files_and_16bit_and_65535_background(dataset):
    labels = disc_labels([(12, 12), (24, 30)])
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
    path = dataset / "train/001_masks.png"
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" if damage == "corrupt" else data[: len(data) // 2])
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
    with pytest.raises(LayoutError, match="nuclei layout"):
        nuclei.find_items(tmp_path, "train")


def test_build_end_to_end(dataset, tmp_path_factory):
    from shardgen.build import build_dataset

    out = tmp_path_factory.mktemp("shards")
    summary = build_dataset("nuclei", dataset, out)
    assert summary["written"] == 3 and summary["rejected"] == 0
    counts = {}
    for sample in wds.WebDataset(sorted(glob.glob(str(out / "nuclei" / "*.tar"))), shardshuffle=False):
        image, labels, _, meta, _ = decode_sample(sample)
        assert image.shape[2] == 1 and meta.channel_names == ("nucleus",)
        counts[meta.source] = int(labels.max())
    assert counts == {f"{k}_img.png": len(v) for k, v in CENTRES.items()}
