"""Tests for shardgen/datasets/bccd.py: semantic masks to connected components."""

import numpy as np
import pytest
from PIL import Image

from shardgen.base import ItemError
from shardgen.datasets import bccd
from shardgen.datasets.bccd import find_items, load, mask_to_instances
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, max_labels, source_split_subset,
    write_image,
)

TOP = "BCCD Dataset with mask"
HEIGHT, WIDTH = 32, 48
TRAIN_NAME = "0a3b53c7-e7ab-4135-80aa-fd2079d727d6.png"
TEST_NAME = "0b2f7f6e-4c15-4d57-8f7b-2a2a1f3c9a10.png"


def rgb_mask() -> np.ndarray:
    """RGB 0/255 mask, anti-aliased: blobs A and B joined only by a faint (60) bridge, and blob C
    set in the red channel only. Foreground is > 127 on any channel: 3 objects."""
    mask = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    mask[4:12, 4:14] = 255
    mask[4:12, 20:30] = 255
    mask[7:9, 14:20] = 60  # anti-aliased bridge, below the threshold
    mask[3, 4:14] = 100  # anti-aliased edge, below the threshold
    mask[20:28, 34:44, 0] = 200
    return mask


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "bccd"
    rng = np.random.default_rng(0)
    images = {
        "train": write_image(root / TOP / "train" / "original" / TRAIN_NAME,
                             rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)),
        "test": write_image(root / TOP / "test" / "original" / TEST_NAME,
                            rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)),
    }
    write_image(root / TOP / "train" / "mask" / TRAIN_NAME, rgb_mask())
    gray = np.zeros((HEIGHT, WIDTH), np.uint8)
    gray[2:10, 2:10] = 255
    gray[20:30, 30:40] = 255
    write_image(root / TOP / "test" / "mask" / TEST_NAME, gray)
    (root / TOP / "train" / "original" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root, images


def test_find_items_pairs_original_and_mask_by_name(dataset):
    root, _ = dataset
    train = find_items(root, "train")
    assert source_split_subset(train) == [
        (f"{TOP}/train/original/{TRAIN_NAME}", "train", "")]
    assert train[0].ref == (f"{TOP}/train/original/{TRAIN_NAME}", f"{TOP}/train/mask/{TRAIN_NAME}")
    assert [i.source for i in find_items(root, "test")] == [f"{TOP}/test/original/{TEST_NAME}"]
    assert bccd.INFO.splits == ("train", "test") and bccd.INFO.modality == "brightfield"


def test_load_thresholds_rgb_antialiased_masks_above_127_on_any_channel(dataset):
    root, images = dataset
    loaded = load(root, find_items(root, "train")[0])
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(loaded.image, images["train"])
    labels = loaded.labels
    assert labels.shape == (HEIGHT, WIDTH)
    assert len(np.unique(labels)) - 1 == 3  # the faint bridge does not merge A and B
    assert labels[8, 16] == 0 and labels[3, 6] == 0
    assert labels[5, 5] != labels[5, 25] and labels[5, 5] > 0 and labels[24, 40] > 0


def test_gray_mask_gives_its_connected_components(dataset):
    root, _ = dataset
    labels = load(root, find_items(root, "test")[0]).labels
    assert len(np.unique(labels)) - 1 == 2
    assert (labels > 0).sum() == 64 + 100


def test_zero_one_masks_use_any_nonzero_as_foreground():
    mask = np.zeros((10, 10, 1), np.uint8)
    mask[1:3, 1:3] = 1
    mask[6:9, 6:9] = 1
    assert len(np.unique(mask_to_instances(mask))) - 1 == 2


def test_touching_cells_merge_a_limitation_of_semantic_masks():
    mask = np.zeros((10, 20, 3), np.uint8)
    mask[2:8, 2:10] = 255
    mask[2:8, 10:18] = 255  # touches the first blob
    assert len(np.unique(mask_to_instances(mask))) - 1 == 1


def test_image_without_mask_and_mask_without_image_are_rejected_with_names(dataset):
    root, _ = dataset
    write_image(root / TOP / "train" / "original" / "lonely.png", np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    write_image(root / TOP / "train" / "mask" / "orphan.png", np.zeros((HEIGHT, WIDTH), np.uint8))
    items = by_source(find_items(root, "train"))
    assert f"{TOP}/train/original/lonely.png" in items and f"{TOP}/train/mask/orphan.png" in items
    assert_load_errors(load, root, items, {
        f"{TOP}/train/original/lonely.png": "lonely.png has no mask",
        f"{TOP}/train/mask/orphan.png": "orphan.png has no matching image",
    }, error=ItemError)


def test_mask_with_another_extension_pairs_by_stem(dataset):
    root, _ = dataset
    mask = root / TOP / "test" / "mask" / TEST_NAME
    Image.open(mask).save(mask.with_suffix(".tif"))
    mask.unlink()
    items = find_items(root, "test")
    assert len(items) == 1 and items[0].ref[1].endswith(".tif")
    assert len(np.unique(load(root, items[0]).labels)) - 1 == 2


def test_corrupt_files_and_size_mismatch_are_rejected_naming_the_file(dataset):
    root, _ = dataset
    mask = root / TOP / "train" / "mask" / TRAIN_NAME
    mask.write_bytes(mask.read_bytes()[:60])
    with pytest.raises(ValueError, match=TRAIN_NAME):
        load(root, find_items(root, "train")[0])
    write_image(root / TOP / "test" / "mask" / TEST_NAME, np.zeros((HEIGHT + 1, WIDTH), np.uint8))
    with pytest.raises(ItemError, match=f"mask/{TEST_NAME}.*original/{TEST_NAME}"):
        load(root, find_items(root, "test")[0])


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "train").mkdir()
    assert_layout_error(find_items, tmp_path, "train", match="BCCD Dataset with mask")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    root, images = dataset
    built = build_and_read("bccd", root, shards_dir)
    for image, _, _, meta, _ in built.samples:
        assert image.shape == (HEIGHT, WIDTH, 3) and meta.modality == "brightfield"
        np.testing.assert_array_equal(image, images[meta.split])
    counts = max_labels(built.samples, key=lambda meta: (meta.split, meta.source))
    assert counts == {("train", f"{TOP}/train/original/{TRAIN_NAME}"): 3,
                      ("test", f"{TOP}/test/original/{TEST_NAME}"): 2}
