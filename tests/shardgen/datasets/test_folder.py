"""Tests for shardgen/datasets/folder.py: images/ + masks/ (+ list files), the layout users bring."""

import numpy as np
import pytest
from PIL import Image

from shardgen.base import ItemError
from shardgen.datasets import folder
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, damage_file, disc_labels, max_labels,
    n_objects, write_image,
)

SHAPE = (36, 48)


# image name -> (mask name, centres, mask kind); every mask suffix convention once
PAIRS = {
    "a.tif": ("a_masks.tif", [(10, 10), (25, 30)], "labels"),
    "b.png": ("b_mask.png", [(8, 8), (20, 20), (28, 40)], "binary255"),
    "c.png": ("c_label.tif", [(18, 24)], "labels"),
    "d.tif": ("d_labels.png", [(10, 40), (26, 10)], "binary1"),
    "e.png": ("e.png", [(12, 12), (24, 36)], "labels"),
}


def make_mask(centres, kind):
    labels = disc_labels(centres, SHAPE)
    if kind == "binary255":
        return ((labels > 0) * 255).astype(np.uint8)
    if kind == "binary1":
        return (labels > 0).astype(np.uint8)
    return labels


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    for image_name, (mask_name, centres, kind) in PAIRS.items():
        image = rng.integers(0, 255, SHAPE + (3,), dtype=np.uint8) if image_name == "c.png" else (
            (disc_labels(centres, SHAPE) > 0) * 1000 + 7
        ).astype(np.uint16 if image_name.endswith(".tif") else np.uint8)
        write_image(tmp_path / "images" / image_name, image)
        write_image(tmp_path / "masks" / mask_name, make_mask(centres, kind))
    return tmp_path


def test_pairs_by_name_without_list_files(dataset):
    items = folder.find_items(dataset, "train")
    assert [i.source for i in items] == [f"images/{name}" for name in sorted(PAIRS)]
    assert [i.ref[1] for i in items] == [f"masks/{PAIRS[name][0]}" for name in sorted(PAIRS)]
    assert folder.find_items(dataset, "test") == []


def test_load_counts_binary_and_label_masks(dataset):
    for item in folder.find_items(dataset, "train"):
        loaded = folder.load(dataset, item)
        _, centres, kind = PAIRS[item.source.removeprefix("images/")]
        assert n_objects(loaded.labels) == len(centres), item.source
        assert loaded.image.dtype in (np.uint8, np.uint16)
        assert len(loaded.channel_names) == loaded.image.shape[2]


def test_image_channels(dataset):
    items = by_source(folder.find_items(dataset, "train"))
    rgb = folder.load(dataset, items["images/c.png"])
    np.testing.assert_array_equal(rgb.image, np.asarray(Image.open(dataset / "images/c.png")))
    assert rgb.channel_names == ("channel_0", "channel_1", "channel_2")
    gray = folder.load(dataset, items["images/a.tif"])
    assert gray.image.shape == SHAPE + (1,) and gray.image.dtype == np.uint16
    # gray saved as RGB (identical channels) becomes one channel
    write_image(dataset / "images/e.png", np.repeat(np.full(SHAPE, 9, np.uint8)[..., None], 3, axis=-1))
    assert folder.load(dataset, items["images/e.png"]).image.shape == SHAPE + (1,)


def test_binary_mask_with_touching_objects_merges_and_label_mask_keeps_ids(dataset):
    labels = disc_labels([(18, 10), (18, 30)], SHAPE, radius=5)
    labels[18, 10:31] = 1  # a bridge joins the two discs
    write_image(dataset / "masks/b_mask.png", ((labels > 0) * 255).astype(np.uint8))
    loaded = folder.load(dataset, folder.find_items(dataset, "train")[1])
    assert loaded.labels.max() == 1  # connected components cannot split touching objects
    kept = folder.load(dataset, folder.find_items(dataset, "train")[0])
    np.testing.assert_array_equal(kept.labels, disc_labels(PAIRS["a.tif"][1], SHAPE))


def test_rgb_mask_with_identical_channels(dataset):
    mask = np.repeat(make_mask(PAIRS["b.png"][1], "binary255")[..., None], 3, axis=-1)
    write_image(dataset / "masks/b_mask.png", mask)
    assert folder.load(dataset, folder.find_items(dataset, "train")[1]).labels.max() == 3


def test_list_files(dataset):
    (dataset / "train_list.txt").write_text(
        "# image mask\n"
        "images/a.tif masks/a_masks.tif\n"
        "\n"
        "images/b.png, masks/b_mask.png\n"
        "images/missing.png masks/missing.png\n"
        "images/c.png\n"
    )
    (dataset / "test_list.txt").write_text("images/e.png\tmasks/e.png\n")
    train = folder.find_items(dataset, "train")
    assert [i.source for i in train] == ["images/a.tif", "images/b.png", "images/missing.png", "train_list.txt:6"]
    assert folder.load(dataset, train[0]).labels.max() == 2
    assert folder.load(dataset, train[1]).labels.max() == 3
    with pytest.raises(ItemError, match="train_list.txt line 5: image images/missing.png does not exist"):
        folder.load(dataset, train[2])
    with pytest.raises(ItemError, match="train_list.txt line 6: expected '<image> <mask>'"):
        folder.load(dataset, train[3])
    test = folder.find_items(dataset, "test")
    assert [i.source for i in test] == ["images/e.png"]
    assert folder.load(dataset, test[0]).labels.max() == 2


def test_test_list_alone_holds_its_pairs_out_of_train(dataset):
    (dataset / "test_list.txt").write_text("images/e.png masks/e.png\n")
    train = [i.source for i in folder.find_items(dataset, "train")]
    assert "images/e.png" not in train and len(train) == len(PAIRS) - 1
    assert not any(i.source == "masks/e.png" for i in folder.find_items(dataset, "train"))


def test_missing_ambiguous_and_orphan(dataset):
    (dataset / "masks/c_label.tif").unlink()
    write_image(dataset / "masks/a.tif", disc_labels([(5, 5)], SHAPE))  # a second candidate for images/a.tif
    write_image(dataset / "masks/zz_masks.png", disc_labels([(5, 5)], SHAPE).astype(np.uint8))
    items = by_source(folder.find_items(dataset, "train"))
    assert {"images/a.tif", "images/c.png", "masks/zz_masks.png"} <= set(items)
    assert_load_errors(folder.load, dataset, items, {
        "images/a.tif": "images/a.tif matches several masks",
        "images/c.png": "images/c.png has no mask",
        "masks/zz_masks.png": "masks/zz_masks.png has no image",
    }, error=ItemError)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_files_raise_naming_the_file(dataset, damage):
    for name in ("images/b.png", "masks/a_masks.tif"):
        damage_file(dataset / name, damage, junk=b"\x89PNX" + b"0" * 20)
    items = by_source(folder.find_items(dataset, "train"))
    assert len(items) == len(PAIRS)
    assert_load_errors(folder.load, dataset, items, {"images/b.png": "b.png", "images/a.tif": "a_masks.tif"})


def test_size_mismatch(dataset):
    write_image(dataset / "masks/e.png", disc_labels([(5, 5)], (20, 20)))
    item = folder.find_items(dataset, "train")[-1]
    with pytest.raises(ItemError, match="masks/e.png is 20x20 but image images/e.png"):
        folder.load(dataset, item)


def test_wrong_folder(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(folder.find_items, tmp_path, "train", match="images/")


def test_build_end_to_end(dataset, shards_dir):
    built = build_and_read("folder", dataset, shards_dir)
    assert built.summary["written"] == len(PAIRS) and built.summary["rejected"] == 0
    counts = max_labels(built.samples)
    assert counts == {f"images/{name}": len(pair[1]) for name, pair in PAIRS.items()}
