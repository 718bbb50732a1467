"""Tests for shardgen/datasets/tnbc.py: Slide_NN/GT_NN pairs, binary masks, RGBA images."""

import numpy as np
import pytest

from shardgen.base import ItemError
from shardgen.datasets import tnbc
from shardgen.datasets.tnbc import find_items, load
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, max_labels, random_uint8,
    source_split_subset, write_image,
)

TOP = "TNBC_NucleiSegmentation"
SIZE = 40


def rgba(seed: int) -> np.ndarray:
    """RGBA uint8 with a varying alpha (the converter keeps the first 3 channels regardless)."""
    return random_uint8((SIZE, SIZE, 4), seed)


def binary_mask() -> np.ndarray:
    """Mode-L 0/255 mask: two touching blobs (one object after connected components) + one apart."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[2:10, 2:10] = 255
    mask[2:10, 10:18] = 255  # touches the first blob
    mask[25:35, 25:35] = 255
    return mask


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "tnbc"
    images = {
        "01_1.png": write_image(root / TOP / "Slide_01" / "01_1.png", rgba(1)),
        "02_1.png": write_image(root / TOP / "Slide_02" / "02_1.png", rgba(2)),
    }
    write_image(root / TOP / "GT_01" / "01_1.png", binary_mask())
    single = np.zeros((SIZE, SIZE), np.uint8)
    single[5:15, 20:30] = 255
    write_image(root / TOP / "GT_02" / "02_1.png", single)
    # Archive debris.
    (root / "__MACOSX" / TOP / "Slide_01").mkdir(parents=True)
    (root / "__MACOSX" / TOP / "Slide_01" / "._01_1.png").write_bytes(b"\x00\x05\x16\x07")
    (root / TOP / "Slide_01" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root, images


def test_find_items_pairs_slide_and_gt_files(dataset):
    root, _ = dataset
    items = find_items(root, "all")
    assert source_split_subset(items) == [
        (f"{TOP}/Slide_01/01_1.png", "all", ""), (f"{TOP}/Slide_02/02_1.png", "all", "")]
    assert items[0].ref == (f"{TOP}/Slide_01/01_1.png", f"{TOP}/GT_01/01_1.png")
    assert tnbc.INFO.splits == ("all",) and find_items(root, "train") == []


def test_load_drops_alpha_and_labels_connected_components(dataset):
    root, images = dataset
    loaded = load(root, find_items(root, "all")[0])
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(loaded.image, images["01_1.png"][:, :, :3])
    labels = loaded.labels
    assert labels.shape == (SIZE, SIZE)
    # Three blobs in the mask, two of them touching: 2 objects (the source's known weakness).
    assert len(np.unique(labels)) - 1 == 2
    assert labels[5, 5] == labels[5, 15] > 0 and labels[30, 30] not in (0, labels[5, 5])
    assert (labels > 0).sum() == (binary_mask() > 0).sum()
    assert len(np.unique(load(root, find_items(root, "all")[1]).labels)) - 1 == 1


def test_constant_alpha_and_rgb_images_load_too(dataset):
    root, _ = dataset
    rgb = write_image(root / TOP / "Slide_01" / "01_1.png", rgba(3)[:, :, :3])
    np.testing.assert_array_equal(load(root, find_items(root, "all")[0]).image, rgb)


def test_brain_variant_top_folder_is_read(dataset, tmp_path):
    root, _ = dataset
    (root / TOP).rename(root / "TNBC_and_Brain_dataset")
    items = find_items(root, "all")
    assert [i.source for i in items] == ["TNBC_and_Brain_dataset/Slide_01/01_1.png",
                                         "TNBC_and_Brain_dataset/Slide_02/02_1.png"]
    assert len(np.unique(load(root, items[0]).labels)) - 1 == 2


def test_missing_partner_files_are_items_rejected_with_the_name(dataset):
    root, _ = dataset
    write_image(root / TOP / "Slide_02" / "02_2.png", rgba(4))
    write_image(root / TOP / "GT_03" / "03_1.png", binary_mask())  # a GT folder without its slide
    items = by_source(find_items(root, "all"))
    assert f"{TOP}/Slide_02/02_2.png" in items and f"{TOP}/GT_03/03_1.png" in items
    assert len(items) == 4
    assert_load_errors(load, root, items, {
        f"{TOP}/Slide_02/02_2.png": "02_2.png has no mask",
        f"{TOP}/GT_03/03_1.png": "GT_03/03_1.png has no matching image",
    }, error=ItemError)


def test_corrupt_files_and_size_mismatch_are_rejected_naming_the_file(dataset):
    root, _ = dataset
    gt = root / TOP / "GT_01" / "01_1.png"
    gt.write_bytes(gt.read_bytes()[:50])
    with pytest.raises(ValueError, match="01_1.png"):
        load(root, find_items(root, "all")[0])
    write_image(root / TOP / "GT_02" / "02_1.png", np.zeros((SIZE, SIZE + 2), np.uint8))
    with pytest.raises(ItemError, match="GT_02/02_1.png.*Slide_02/02_1.png"):
        load(root, find_items(root, "all")[1])


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "Slide_01").mkdir()
    assert_layout_error(find_items, tmp_path, "all", match="TNBC_NucleiSegmentation")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    root, images = dataset
    write_image(root / TOP / "Slide_02" / "02_2.png", rgba(5))  # no mask: a reject
    built = build_and_read("tnbc", root, shards_dir)
    for image, _, _, meta, ignore in built.samples:
        assert image.shape == (SIZE, SIZE, 3) and meta.modality == "he" and ignore is None
        if meta.source.endswith("01_1.png"):
            np.testing.assert_array_equal(image, images["01_1.png"][:, :, :3])
    counts = max_labels(built.samples)
    assert counts == {f"{TOP}/Slide_01/01_1.png": 2, f"{TOP}/Slide_02/02_1.png": 1}
    assert [(r["source"], "has no mask" in r["reason"]) for r in built.rejects] == [(f"{TOP}/Slide_02/02_2.png", True)]
