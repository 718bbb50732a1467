"""Tests for shardgen/datasets/neurips22.py: the NeurIPS 2022 CellSeg layout (datasets.md 2.8)."""

import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from shardgen.base import ItemError
from shardgen.datasets import neurips22
from tests.shardgen.datasets.helpers import (
    assert_layout_error, build_and_read, by_source, damage_file, disc_labels, max_labels, n_objects, write_image,
)

SHAPE = (40, 52)


def make_image(labels, kind):
    """An image of the given storage kind with the objects bright."""
    fg = labels > 0
    if kind == "rgb8":
        image = np.stack([fg * 200 + 10, fg * 90 + 40, fg * 30 + 70], axis=-1).astype(np.uint8)
    elif kind == "gray16":
        image = (fg * 30000 + 500).astype(np.uint16)
    elif kind == "gray_as_rgb8":
        image = np.repeat((fg * 180 + 20).astype(np.uint8)[..., None], 3, axis=-1)
    else:
        raise ValueError(kind)
    return image


# (images folder, labels folder, file name, storage kind, centres)
FILES = [
    ("Training-labeled/images", "Training-labeled/labels", "cell_00001.png", "rgb8", [(10, 10), (25, 30)]),
    ("Training-labeled/images", "Training-labeled/labels", "cell_00002.tif", "gray16", [(12, 40), (30, 12), (20, 25)]),
    ("Training-labeled/images", "Training-labeled/labels", "cell_00003.bmp", "gray_as_rgb8", [(20, 20)]),
    ("Training-labeled/images", "Training-labeled/labels", "cell_00004.jpg", "rgb8", [(15, 15), (28, 40)]),
    ("Tuning/images", "Tuning/labels", "cell_00001.tiff", "gray16", [(10, 40)]),
    ("Testing/Public/images", "Testing/Public/labels", "OpenTest_001.png", "rgb8", [(12, 12), (28, 28)]),
    ("Testing/Public/WSI", "Testing/Public/WSI-labels", "WSI_001.tif", "rgb8", [(20, 26)]),
]


@pytest.fixture
def dataset(tmp_path):
    for images, labels, name, kind, centres in FILES:
        label = disc_labels(centres, SHAPE, dtype=np.int16)  # int16, as the release ships them
        write_image(tmp_path / images / name, make_image(label, kind))
        write_image(tmp_path / labels / (name.rsplit(".", 1)[0] + "_label.tiff"), label)
    return tmp_path


def test_find_items_splits_subsets_order(dataset):
    train = neurips22.find_items(dataset, "train")
    assert [i.source for i in train] == [f"Training-labeled/images/{f[2]}" for f in FILES[:4]]
    assert {(i.split, i.subset) for i in train} == {("train", "")}
    tuning = neurips22.find_items(dataset, "tuning")
    assert [(i.source, i.split) for i in tuning] == [("Tuning/images/cell_00001.tiff", "tuning")]
    test = neurips22.find_items(dataset, "test")
    assert [(i.source, i.subset) for i in test] == [
        ("Testing/Public/images/OpenTest_001.png", ""),
        ("Testing/Public/WSI/WSI_001.tif", "wsi"),
    ]


def test_load_every_format(dataset):
    expected = {f"{f[0]}/{f[2]}": f for f in FILES}
    for split in neurips22.INFO.splits:
        for item in neurips22.find_items(dataset, split):
            loaded = neurips22.load(dataset, item)
            _, _, name, kind, centres = expected[item.source]
            assert n_objects(loaded.labels) == len(centres), item.source
            assert loaded.labels.dtype == np.uint16  # int16 on disk
            if kind == "rgb8":
                assert loaded.image.shape == SHAPE + (3,) and loaded.image.dtype == np.uint8
                assert loaded.channel_names == ("red", "green", "blue")
                if not name.endswith(".jpg"):  # lossless: channel order as stored
                    stored = np.asarray(Image.open(dataset / item.source))
                    np.testing.assert_array_equal(loaded.image, stored)
            else:
                assert loaded.image.shape == SHAPE + (1,) and loaded.channel_names == ("gray",)
                assert loaded.image.dtype == (np.uint16 if kind == "gray16" else np.uint8)


def test_train_labeled_folder_name_is_accepted(dataset):
    shutil.move(dataset / "Training-labeled", dataset / "Train_Labeled")
    train = neurips22.find_items(dataset, "train")
    assert [i.source for i in train][0] == "Train_Labeled/images/cell_00001.png"
    assert neurips22.load(dataset, train[0]).labels.max() == 2


def test_missing_label_and_orphan_label(dataset):
    (dataset / "Training-labeled/labels/cell_00002_label.tiff").unlink()
    (dataset / "Tuning/images/cell_00001.tiff").unlink()
    train = by_source(neurips22.find_items(dataset, "train"))
    tuning = neurips22.find_items(dataset, "tuning")
    assert "Training-labeled/images/cell_00002.tif" in train
    assert [i.source for i in tuning] == ["Tuning/labels/cell_00001_label.tiff"]
    with pytest.raises(ItemError, match="cell_00002.tif has no label file.*cell_00002_label.tiff"):
        neurips22.load(dataset, train["Training-labeled/images/cell_00002.tif"])
    with pytest.raises(ItemError, match="cell_00001_label.tiff has no image"):
        neurips22.load(dataset, tuning[0])


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_files_raise_naming_the_file(dataset, damage):
    for name in ("Training-labeled/images/cell_00001.png", "Training-labeled/labels/cell_00002_label.tiff"):
        damage_file(dataset / name, damage, junk=b"junk" * 4, divisor=3)
    items = neurips22.find_items(dataset, "train")
    assert len(items) == 4
    with pytest.raises(ValueError, match="cell_00001.png"):
        neurips22.load(dataset, items[0])
    with pytest.raises(ValueError, match="cell_00002_label.tiff"):
        neurips22.load(dataset, items[1])


def test_size_mismatch(dataset):
    write_image(dataset / "Tuning/labels/cell_00001_label.tiff", disc_labels([(5, 5)], (20, 20), dtype=np.int16))
    with pytest.raises(ItemError, match="cell_00001_label.tiff.*cell_00001.tiff"):
        neurips22.load(dataset, neurips22.find_items(dataset, "tuning")[0])


def test_wrong_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    assert_layout_error(neurips22.find_items, tmp_path, "train", match="Training-labeled")


def test_real_sample(shared_data):
    root = shared_data / "neurips22"
    items = neurips22.find_items(root, "train")
    assert len(items) == 3
    total = 0
    for item in items:
        loaded = neurips22.load(root, item)
        label_path = root / item.ref[1]
        stored = tifffile.imread(label_path)
        assert stored.dtype == np.int16  # as released
        count = n_objects(loaded.labels)
        assert count == n_objects(stored), item.source
        total += count
    assert total == 237  # shared/data/README.md


def test_build_end_to_end(dataset, shards_dir):
    built = build_and_read("neurips22", dataset, shards_dir)
    assert built.summary["written"] == len(FILES) and built.summary["rejected"] == 0
    for image, _, _, meta, _ in built.samples:
        assert len(meta.channel_names) == image.shape[2]
    counts = max_labels(built.samples)
    assert counts == {f"{f[0]}/{f[2]}": len(f[4]) for f in FILES}
