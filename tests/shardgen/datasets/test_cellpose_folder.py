"""Tests for shardgen/datasets/cellpose_folder.py: the training folders Cellpose users keep
(_img/_masks pairs, the GUI's _seg.npy, images/ + masks/), the held-out split, built to shards."""

from pathlib import Path

import numpy as np
import pytest

from infer.outputs import seg_record, write_seg
from shardgen.datasets import cellpose_folder
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, disc_labels, max_labels, write_image,
)

SHAPE = (36, 48)


def write_pair(folder: Path, image_name: str, labels_name: str, centres) -> np.ndarray:
    labels = disc_labels(centres, SHAPE)
    write_image(folder / image_name, ((labels > 0) * 900 + 50).astype(np.uint16))
    if labels_name.endswith("_seg.npy"):
        zeros = np.zeros((2, *SHAPE), np.float32)
        write_seg(folder / labels_name, seg_record(folder / image_name, labels, zeros, zeros[0], None))
    else:
        write_image(folder / labels_name, labels)
    return labels


@pytest.fixture
def mixed(tmp_path):
    """Every single-folder convention at once, plus a GUI file that overrides a stale mask."""
    write_pair(tmp_path, "a_img.tif", "a_masks.tif", [(10, 10), (25, 30)])
    write_pair(tmp_path, "b.png", "b_masks.png", [(12, 12)])
    write_pair(tmp_path, "c.tif", "c_seg.npy", [(10, 10), (20, 20), (28, 40)])
    write_pair(tmp_path, "d.tif", "d_masks.tif", [(10, 40)])  # the prediction infer wrote ...
    write_pair(tmp_path, "d.tif", "d_seg.npy", [(10, 10), (26, 30)])  # ... and the GUI correction
    write_image(tmp_path / "e.png", np.zeros(SHAPE, np.uint8))  # no labels
    write_image(tmp_path / "f_masks.png", disc_labels([(9, 9)], SHAPE))  # no image
    np.save(tmp_path / "d_flows.npy", np.zeros((2, *SHAPE), np.float32))  # an output, not an image
    return tmp_path


def test_every_layout_pairs_and_the_gui_file_wins(mixed):
    items = cellpose_folder.find_items(mixed, "train") + cellpose_folder.find_items(mixed, "test")
    refs = {item.source: item.ref[:2] for item in items}
    assert refs == {
        "a_img.tif": ("a_img.tif", "a_masks.tif"), "b.png": ("b.png", "b_masks.png"),
        "c.tif": ("c.tif", "c_seg.npy"), "d.tif": ("d.tif", "d_seg.npy"), "e.png": ("e.png", None),
        "f_masks.png": (None, "f_masks.png"),
    }
    assert cellpose_folder.label_sources(items) == {"seg": 2, "masks": 2, "unpaired": 2}
    loaded = cellpose_folder.load(mixed, by_source(items)["d.tif"])
    assert loaded.labels.max() == 2 and loaded.labels[10, 10] > 0 and loaded.labels[10, 40] == 0
    assert_load_errors(cellpose_folder.load, mixed, by_source(items), {
        "e.png": r"image e.png has no labels \(looked for e_masks.\*, e_seg.npy\)",
        "f_masks.png": "labels f_masks.png have no image",
    })


def test_fixed_fraction_is_held_out_by_name(mixed):
    test = cellpose_folder.find_items(mixed, "test")
    train = cellpose_folder.find_items(mixed, "train")
    # 4 usable pairs: round(0.2 * 4) = 1 held out; never an unusable one.
    assert len(test) == 1 and test[0].split == "test" and test[0].ref[2] is None
    assert {i.source for i in train} & {i.source for i in test} == set()
    # The choice depends on the names only.
    names = [f"{i:03d}.png" for i in range(20)]
    assert cellpose_folder.held_out(names) == cellpose_folder.held_out(names[::-1])
    assert len(cellpose_folder.held_out(names)) == 4 and cellpose_folder.held_out(names[:1]) == set()


def test_train_and_test_folders_and_images_masks_layout(tmp_path):
    write_pair(tmp_path / "train", "x_img.png", "x_masks.png", [(10, 10)])
    write_pair(tmp_path / "train", "y_img.png", "y_masks.png", [(10, 10)])
    write_pair(tmp_path / "test" / "images", "z.tif", "../masks/z.tif", [(20, 20)])
    assert [i.source for i in cellpose_folder.find_items(tmp_path, "train")] == ["train/x_img.png", "train/y_img.png"]
    (test,) = cellpose_folder.find_items(tmp_path, "test")
    assert test.ref[:2] == ("test/images/z.tif", "test/masks/z.tif")


def test_folder_without_pairs_is_a_layout_error_naming_what_is_there(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    assert_layout_error(cellpose_folder.find_items, tmp_path, "train", match="no images or labels found.*notes.txt")


def test_builds_shards_with_the_gui_labels(mixed, tmp_path):
    built = build_and_read("cellpose_folder", mixed, tmp_path / "out")
    assert built.summary["written"] == 4 and built.summary["rejected"] == 2
    assert max_labels(built.samples) == {"a_img.tif": 2, "b.png": 1, "c.tif": 3, "d.tif": 2}


def test_real_cellpose_cyto_folder(shared_data):
    root = shared_data / "cellpose_cyto"
    train = cellpose_folder.find_items(root, "train")
    test = cellpose_folder.find_items(root, "test")
    assert (len(train), len(test)) == (16, 4)  # 20 pairs in train/, no test/: 20% held out
    loaded = cellpose_folder.load(root, test[0])
    assert loaded.image.shape[:2] == loaded.labels.shape and loaded.labels.max() > 10
